"""Models and tokenizers: load from a local directory, build a tiny one, add LoRA, save.

    tok = load_tokenizer("runs/base")
    model = build_model(ModelConfig(path="runs/base", lora_r=8), tok)
    save_model(model, tok, "runs/sft")        # LoRA merged, safetensors, atomic

Nothing here reaches the network: every `from_pretrained` call is `local_files_only=True`, and a
missing or incomplete directory is an error that names the path and the missing file.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from alignkit.atomic import file_problem, share_tree
from alignkit.config import ModelConfig

PRESETS: dict[str, dict[str, Any]] = {
    "nano": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256),
    "tiny": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512),
    "small": dict(hidden_size=256, num_hidden_layers=6, num_attention_heads=8, intermediate_size=1024),
}
"""Llama-style sizes for models trained from scratch on CPU. All share max_position_embeddings=512
and tied input/output embeddings (at these sizes the embedding is most of the parameters)."""

MAX_POSITIONS = 512

_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def tiny_llama(
    preset: str,
    vocab_size: int | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    seed: int = 0,
) -> LlamaForCausalLM:
    """A freshly initialised Llama of size `preset` (see PRESETS).

    `vocab_size` defaults to `len(tokenizer)`; bos/eos/pad ids come from the tokenizer when given.
    The initialisation depends only on `seed` and leaves the global torch RNG untouched.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset '{preset}' (valid: {', '.join(PRESETS)})")
    if vocab_size is None:
        if tokenizer is None:
            raise ValueError("tiny_llama needs vocab_size or a tokenizer")
        vocab_size = len(tokenizer)
    if tokenizer is not None and len(tokenizer) > vocab_size:
        raise ValueError(f"vocab_size {vocab_size} is smaller than the tokenizer ({len(tokenizer)} tokens)")
    ids = {}
    if tokenizer is not None:
        ids = dict(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    config = LlamaConfig(
        vocab_size=vocab_size,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=True,
        **PRESETS[preset],
        **ids,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model


def _check_model_dir(path: Path) -> None:
    if not path.exists():
        raise FileNotFoundError(f"model path does not exist: {path}")
    if not path.is_dir():
        raise FileNotFoundError(f"model path is not a directory: {path}")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a model directory: config.json is missing")
    if not any((path / name).is_file() for name in _WEIGHT_FILES):
        raise FileNotFoundError(
            f"{path} is not a model directory: no weights found (expected one of {', '.join(_WEIGHT_FILES)})"
        )


def _parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | str | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {
        "fp32": torch.float32,
        "float32": torch.float32,
        "bf16": torch.bfloat16,
        "bfloat16": torch.bfloat16,
        "fp16": torch.float16,
        "float16": torch.float16,
        "auto": "auto",
    }
    if dtype not in names:
        raise ValueError(f"unknown dtype '{dtype}' (valid: {', '.join(names)})")
    return names[dtype]


def load_model(path: str | os.PathLike, dtype: str | torch.dtype | None = None) -> PreTrainedModel:
    """Load a causal LM from a local Hugging Face directory (never the network).

    A directory holding only a LoRA adapter (adapter_config.json, as written by
    `save_model(..., adapter_only=True)`) is loaded onto its base model, which must be local.
    """
    p = Path(path)
    kwargs: dict[str, Any] = {"local_files_only": True}
    if dtype is not None:
        kwargs["dtype"] = _parse_dtype(dtype)
    if p.is_dir() and (p / "adapter_config.json").is_file() and not (p / "config.json").is_file():
        from peft import PeftModel

        base = json.loads((p / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if not base or not Path(base).is_dir():
            raise FileNotFoundError(
                f"{p} holds a LoRA adapter whose base model is not a local directory: {base!r}"
            )
        _check_model_dir(Path(base))
        return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, **kwargs), str(p))
    _check_model_dir(p)
    try:
        return AutoModelForCausalLM.from_pretrained(str(p), **kwargs)
    except Exception as e:  # a corrupt or truncated weights file: safetensors' own error type, or an OSError
        if type(e).__name__ == "SafetensorError" or isinstance(e, (OSError, EOFError)):
            raise file_problem(p, "cannot load the model", e) from None
        raise


def load_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerBase:
    """Load a tokenizer from a local directory (never the network).

    A tokenizer without a pad token gets pad = eos (the usual choice for Llama-style models).
    Padding is then only recognisable through the attention mask, which is what alignkit's
    collators and losses use; never mask by `input_ids == pad_token_id`.
    """
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"tokenizer path does not exist or is not a directory: {p}")
    if not any((p / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        raise FileNotFoundError(
            f"{p} is not a tokenizer directory: tokenizer.json / tokenizer_config.json missing"
        )
    tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


def apply_lora(model: PreTrainedModel, model_cfg: ModelConfig):
    """Wrap `model` in a peft LoRA model when `model_cfg.lora_r > 0`; otherwise return it unchanged.

    `lora_targets` is 'all-linear' (every linear layer but the output head) or a comma list of
    module names such as 'q_proj,v_proj'.
    """
    if model_cfg.lora_r <= 0:
        return model
    from peft import LoraConfig, get_peft_model

    targets: str | list[str] = model_cfg.lora_targets.strip()
    if targets != "all-linear":
        targets = [t.strip() for t in targets.split(",") if t.strip()]
        if not targets:
            raise ValueError("model.lora_targets is empty (use 'all-linear' or names like 'q_proj,v_proj')")
    config = LoraConfig(
        r=model_cfg.lora_r,
        lora_alpha=model_cfg.lora_alpha,
        lora_dropout=model_cfg.lora_dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def build_model(model_cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase, seed: int = 0, lora: bool = True):
    """The model a stage trains: loaded from `model_cfg.path`, or a fresh `preset` sized to the
    tokenizer; wrapped in LoRA when `model_cfg.lora_r > 0` and `lora` is true."""
    if model_cfg.path is not None:
        model = load_model(model_cfg.path)
    else:
        model = tiny_llama(model_cfg.preset, len(tokenizer), tokenizer, seed=seed)
    return apply_lora(model, model_cfg) if lora else model


def _is_peft(model: Any) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def save_model(
    model: Any,
    tokenizer: PreTrainedTokenizerBase | None,
    out_dir: str | os.PathLike,
    adapter_only: bool = False,
) -> Path:
    """Save in Hugging Face format (safetensors) so `from_pretrained(out_dir)` loads it.

    A peft model is saved with its LoRA weights merged into a plain model, from a copy, so the
    caller's model keeps training with its adapters; `adapter_only=True` writes just the adapter.
    The directory appears atomically: everything is written to a temporary sibling, and an
    existing `out_dir` is swapped out only once the new one is complete.
    """
    out = Path(out_dir).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        if _is_peft(model) and not adapter_only:
            with torch.no_grad():
                merged = copy.deepcopy(model).merge_and_unload()
            merged.save_pretrained(tmp)
        elif adapter_only and not _is_peft(model):
            raise ValueError("adapter_only=True needs a peft model (lora_r > 0)")
        else:
            model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        share_tree(tmp)
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Rename `tmp` to `out`. A directory cannot be replaced in one rename, so an old `out` is
    first moved aside and deleted only after the new one is in place (restored on failure)."""
    if not out.exists():
        os.replace(tmp, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.rmdir(old)
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)
