"""Scalar heads on a transformer: the reward model (one score per sequence) and per-token values.

Legend: B batch (rows), T tokens, H hidden size.

    rm = RewardModel.from_pretrained("runs/sft/final", mode="head")   # any local causal LM
    r = rm(input_ids, attention_mask)                                  # (B,) one reward per row
    v = rm(input_ids, attention_mask, per_token=True)                  # (B, T) PPO-style values
    save_reward_model(rm, tokenizer, "runs/reward/final", stats)       # HF backbone + head + stats
    rm = load_reward_model("runs/reward/final"); rm.normalize(r)       # (r - mean) / std

Two backbones sit behind the same interface:

- `pooling="last"`: the base (decoder) model of any causal LM, called directly so the LM head's
  (B, T, V) logits are never computed, plus `nn.Linear(H, 1)` on the hidden state of the LAST
  NON-PADDING token. The token is found from the attention mask and positions are counted over real
  tokens only, so the reward does not depend on the padding side or amount. A Hugging Face
  `...ForSequenceClassification` decoder (it keeps its head in `.score`) is read the same way,
  with its own `score` layer as the head: its built-in pooling looks for the last token that is
  not `pad_token_id`, which is wrong when pad == eos.
- `pooling="model"`: an encoder `AutoModelForSequenceClassification` with `num_labels=1` (BERT
  style: pooler on the first token + classifier). Rows are moved to right padding first so the
  first token is real, then the model's own logits are the rewards.

The head starts at N(0, 1/(H+1)) with a zero bias, as in Ziegler et al. 2019
(github.com/openai/lm-human-preferences, `lm_human_preferences/language/model.py`, reward head
init), so the initial rewards are small and of order 1.
"""

from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from alignkit.config import ModelConfig
from alignkit.models.chunked import custom_mask_for
from alignkit.models.logprobs import position_ids_from_mask

MODES = ("head", "full", "lora")
BACKBONES = ("auto", "causal_lm", "seq_cls")
REWARD_CONFIG = "reward_config.json"
REWARD_STATS = "reward_stats.json"
HEAD_FILE = "head.safetensors"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class RewardStats:
    """Reward statistics on a reference set, for normalising rewards in RL: (r - mean) / std.

    mean, std: of the rewards of the reference responses. n: how many responses were scored.
    """

    mean: float
    std: float
    n: int

    @classmethod
    def of(cls, rewards: torch.Tensor) -> RewardStats:
        """Stats of (N,) rewards; std is the population std (N in the denominator)."""
        if rewards.numel() == 0:
            raise ValueError("reward statistics need at least one reward")
        r = rewards.detach().double().flatten()
        return cls(mean=float(r.mean()), std=float(r.std(unbiased=False)), n=int(r.numel()))


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,) index of the rightmost real token of each row: works for left, right or no padding.

    Each row must hold at least one real token (an empty row gives 0).
    """
    t = attention_mask.shape[-1]
    positions = torch.arange(t, device=attention_mask.device)
    return (positions * attention_mask.long()).argmax(-1)  # (B,)


def right_align(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Move every row's real tokens to the front (keeping their order) and its padding to the end."""
    # a stable sort on "is padding" keeps the real tokens' order
    order = torch.sort((attention_mask == 0).to(torch.int8), dim=-1, stable=True).indices  # (B, T)
    return input_ids.gather(-1, order), attention_mask.gather(-1, order)


def _hidden_size(config: Any) -> int:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("hidden_size", "d_model", "n_embd", "dim"):
        if getattr(text, name, None):
            return int(getattr(text, name))
    raise ValueError(f"cannot find the hidden size in the model config ({type(config).__name__})")


def _init_head(head: nn.Linear, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=g) / math.sqrt(head.in_features + 1))
        if head.bias is not None:
            head.bias.zero_()


def _decoder_head(model: nn.Module) -> nn.Linear | None:
    """The `score` layer of a decoder-style ForSequenceClassification model, if it has one."""
    score = getattr(model, "score", None)
    return score if isinstance(score, nn.Linear) and score.out_features == 1 else None


class RewardModel(nn.Module):
    """A backbone plus a scalar head: `forward(input_ids, attention_mask) -> (B,)` rewards.

    backbone: with pooling "last", a base model whose output has `last_hidden_state` (B, T, H);
        with pooling "model", a whole ForSequenceClassification model with one label.
    head: nn.Linear(H, 1) for pooling "last"; None for pooling "model" (the model holds it).
    stats: reward statistics stored with the model (None until computed).
    """

    def __init__(
        self, backbone: nn.Module, head: nn.Linear | None, pooling: Literal["last", "model"] = "last"
    ):
        super().__init__()
        if pooling not in ("last", "model"):
            raise ValueError(f"unknown pooling '{pooling}' (expected 'last' or 'model')")
        if (pooling == "last") != (head is not None):
            raise ValueError("pooling 'last' needs a head; pooling 'model' uses the model's own head")
        self.backbone = backbone
        self.head = head
        self.pooling = pooling
        self.mode: str = "full"
        self.stats: RewardStats | None = None
        # the peft wrapper of a LoRA backbone; kept out of the module tree (its weights ARE the
        # backbone's) and used only to merge the adapters when saving
        self._peft: list[Any] = []

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_model(cls, model: nn.Module, seed: int = 0) -> RewardModel:
        """Wrap a loaded causal LM or ForSequenceClassification model (num_labels=1)."""
        if hasattr(model, "merge_and_unload"):  # a causal LM loaded with a LoRA adapter
            model = model.merge_and_unload()
        config = getattr(model, "config", None)
        arch = type(model).__name__
        if arch.endswith("ForSequenceClassification"):
            if getattr(config, "num_labels", 1) != 1:
                raise ValueError(f"a reward model needs num_labels=1, the {arch} has {config.num_labels}")
            score = _decoder_head(model)
            if score is not None:
                return cls(model.base_model, score, "last")
            return cls(model, None, "model")
        base = getattr(model, "base_model", model)
        if base is model and not hasattr(model, "get_input_embeddings"):
            raise ValueError(f"cannot find the base model of {arch}")
        head = nn.Linear(_hidden_size(config), 1)
        _init_head(head, seed)
        return cls(base, head, "last")

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        mode: str = "full",
        backbone: str = "auto",
        lora: ModelConfig | None = None,
        seed: int = 0,
        dtype: str | torch.dtype | None = None,
    ) -> RewardModel:
        """Build a reward model to train from a local directory.

        path: a causal LM (the usual case: the SFT model), a ForSequenceClassification model, or
            a saved reward model (training continues from it).
        mode: "head" (backbone frozen), "full" (everything trains) or "lora" (LoRA adapters on
            the backbone plus the head; rank etc. from `lora`, which needs lora_r > 0).
        backbone: "auto" reads config.json (a *ForSequenceClassification architecture loads as
            seq_cls, anything else as a causal LM); "causal_lm" or "seq_cls" force it.
        """
        if mode not in MODES:
            raise ValueError(f"unknown reward model mode '{mode}' (valid: {', '.join(MODES)})")
        if backbone not in BACKBONES:
            raise ValueError(f"unknown reward backbone '{backbone}' (valid: {', '.join(BACKBONES)})")
        p = Path(path)
        if (p / REWARD_CONFIG).is_file():
            model = load_reward_model(p, dtype=dtype)
        else:
            model = cls.from_model(_load_backbone_source(p, backbone, dtype), seed=seed)
        return model.set_mode(mode, lora)

    def set_mode(self, mode: str, lora: ModelConfig | None = None) -> RewardModel:
        """Choose what trains (see `from_pretrained`); returns self."""
        if mode not in MODES:
            raise ValueError(f"unknown reward model mode '{mode}' (valid: {', '.join(MODES)})")
        if self._peft:
            raise ValueError("this reward model already has LoRA adapters")
        self.mode = mode
        if mode == "lora":
            if lora is None or lora.lora_r <= 0:
                raise ValueError("reward model mode 'lora' needs model.lora_r > 0")
            self._add_lora(lora)
        else:
            self.backbone.requires_grad_(mode == "full")
        if self.head is not None:
            self.head.requires_grad_(True)
        if mode == "head":
            self.backbone.eval()
        return self

    def _add_lora(self, lora: ModelConfig) -> None:
        from alignkit.models.load import apply_lora

        # apply_lora wants a causal LM; the backbone is wrapped in place, so the LoRA layers land
        # inside self.backbone
        peft_model = apply_lora(_AsCausalLM(self.backbone), lora)
        if self.pooling == "model":
            # an encoder's classifier is new: it trains in full, like the "last" pooling head
            for name in ("classifier", "score"):
                layer = getattr(self.backbone, name, None)
                if isinstance(layer, nn.Module):
                    layer.requires_grad_(True)
        self._peft = [peft_model]

    def train(self, mode: bool = True) -> RewardModel:
        super().train(mode)
        if self.mode == "head":
            self.backbone.eval()  # a frozen backbone keeps its dropout off
        return self

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        per_token: bool = False,
        position_ids: torch.Tensor | None = None,
        last_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Rewards (B,) from the last real token of each row; with `per_token`, (B, T) scalars
        at every position (0 on padding): the value head PPO needs.

        input_ids, attention_mask: (B, T), padding on either side; every row needs a real token.
        Several sequences per row (`alignkit.data.packing.SharedPromptPairs`): attention_mask
        (B, 1, T, T) bool, their `position_ids` (B, T), and `last_index` (S,) row-major indices
        of the tokens to score; returns (S,).
        """
        if self.pooling == "model":
            if per_token or last_index is not None:
                raise ValueError("per_token values and several sequences per row need pooling 'last' (a decoder)")
            ids, mask = right_align(input_ids, attention_mask)
            return self.backbone(input_ids=ids, attention_mask=mask).logits.squeeze(-1)  # (B,)
        grad = torch.is_grad_enabled() and self.mode != "head"
        if position_ids is None:
            position_ids = position_ids_from_mask(attention_mask)
        with torch.set_grad_enabled(grad):
            hidden = self.backbone(
                input_ids=input_ids,
                attention_mask=custom_mask_for(self.backbone, attention_mask),
                position_ids=position_ids,
                use_cache=False,
            ).last_hidden_state  # (B, T, H)
        head = self.head
        if last_index is not None:
            picked = hidden.reshape(-1, hidden.shape[-1]).index_select(0, last_index)  # (S, H)
            return head(picked.to(head.weight.dtype)).squeeze(-1)
        if per_token:
            values = head(hidden.to(head.weight.dtype)).squeeze(-1)  # (B, T)
            return values * attention_mask.to(values.dtype)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        last = hidden[rows, last_token_index(attention_mask)]  # (B, H)
        return head(last.to(head.weight.dtype)).squeeze(-1)  # (B,)

    def normalize(self, rewards: torch.Tensor) -> torch.Tensor:
        """(r - mean) / std with the stored reference statistics."""
        if self.stats is None:
            raise ValueError(
                "this reward model has no reward_stats (train it with alignkit, or compute them)"
            )
        return (rewards - self.stats.mean) / max(self.stats.std, 1e-8)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def plain_backbone(self) -> nn.Module:
        """The backbone with any LoRA adapters merged, as a copy; the model itself is untouched."""
        if not self._peft:
            return self.backbone
        with torch.no_grad():
            merged = copy.deepcopy(self._peft[0]).merge_and_unload()
        return merged.inner if isinstance(merged, _AsCausalLM) else merged


class _AsCausalLM(nn.Module):
    """A base model dressed as a causal LM just long enough for peft to add LoRA layers to it.

    peft's CAUSAL_LM wrapper only needs `config` and the module tree; the LoRA layers it injects
    live in `inner`, i.e. in the reward model's backbone.
    """

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.config = inner.config

    def prepare_inputs_for_generation(self, *args, **kwargs):  # peft looks this up; never called
        raise NotImplementedError

    def forward(self, *args, **kwargs):
        return self.inner(*args, **kwargs)


def _read_config_json(path: Path) -> dict:
    try:
        return json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise FileNotFoundError(f"{path}: cannot read config.json: {e}") from None


def _load_backbone_source(path: Path, backbone: str, dtype: str | torch.dtype | None) -> nn.Module:
    """Load the model a new reward model starts from (see `RewardModel.from_pretrained`)."""
    from alignkit.models.load import _check_model_dir, _parse_dtype, load_model

    if not path.exists():
        raise FileNotFoundError(f"model path does not exist: {path}")
    if backbone == "auto":
        archs = (
            (_read_config_json(path).get("architectures") or []) if (path / "config.json").is_file() else []
        )
        backbone = "seq_cls" if any(a.endswith("ForSequenceClassification") for a in archs) else "causal_lm"
    if backbone == "causal_lm":
        return load_model(path, dtype=dtype)
    from transformers import AutoModelForSequenceClassification

    _check_model_dir(path)
    kwargs: dict[str, Any] = {"local_files_only": True, "num_labels": 1}
    if dtype is not None:
        kwargs["dtype"] = _parse_dtype(dtype)
    return AutoModelForSequenceClassification.from_pretrained(str(path), **kwargs)


# ---------------------------------------------------------------------- save / load
def write_reward_dir(
    model: RewardModel,
    tokenizer: Any,
    out_dir: str | os.PathLike,
    stats: RewardStats | None = None,
    extra: dict | None = None,
) -> None:
    """Write the files of a reward model into the existing directory `out_dir` (not atomic: use
    `save_reward_model`, or call this inside a temporary directory that is renamed afterwards).

    Files: the backbone in Hugging Face format (config.json + model.safetensors, LoRA merged),
    the tokenizer, head.safetensors (pooling "last"), reward_stats.json {mean, std, n} when
    stats are known, and reward_config.json {format_version, pooling, mode, head_bias,
    hidden_size, ...extra}.
    """
    from safetensors.torch import save_file

    from alignkit.models.load import save_model

    out = Path(out_dir)
    stats = stats if stats is not None else model.stats
    save_model(model.plain_backbone(), tokenizer, out)
    info = {"format_version": FORMAT_VERSION, "pooling": model.pooling, "mode": model.mode}
    if model.head is not None:
        head = {
            k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.head.state_dict().items()
        }
        save_file(head, str(out / HEAD_FILE))
        info.update(head_bias=model.head.bias is not None, hidden_size=model.head.in_features)
    info.update(extra or {})
    (out / REWARD_CONFIG).write_text(json.dumps(info, indent=1) + "\n")
    if stats is not None:
        (out / REWARD_STATS).write_text(json.dumps(asdict(stats), indent=1) + "\n")


def save_reward_model(
    model: RewardModel,
    tokenizer: Any,
    out_dir: str | os.PathLike,
    stats: RewardStats | None = None,
    extra: dict | None = None,
) -> Path:
    """Write a reward model directory atomically (see `write_reward_dir` for the files)."""
    from alignkit.train.checkpoint import atomic_dir

    with atomic_dir(Path(out_dir)) as tmp:
        write_reward_dir(model, tokenizer, tmp, stats, extra)
    return Path(out_dir)


def write_reward_stats(out_dir: str | os.PathLike, stats: RewardStats) -> None:
    """Replace reward_stats.json in a saved reward model directory (atomic rename)."""
    path = Path(out_dir) / REWARD_STATS
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(asdict(stats), indent=1) + "\n")
    os.replace(tmp, path)


def read_reward_stats(path: str | os.PathLike) -> RewardStats | None:
    """The stats in a reward model directory, or None when it has none."""
    f = Path(path) / REWARD_STATS
    if not f.is_file():
        return None
    try:
        d = json.loads(f.read_text())
        return RewardStats(mean=float(d["mean"]), std=float(d["std"]), n=int(d["n"]))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{f}: not a valid reward_stats.json ({type(e).__name__}: {e})") from None


def load_reward_model(path: str | os.PathLike, dtype: str | torch.dtype | None = None) -> RewardModel:
    """Load a directory written by `save_reward_model` (never the network); mode is "full"."""
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoModelForSequenceClassification

    from alignkit.models.load import _check_model_dir, _parse_dtype

    p = Path(path)
    if not (p / REWARD_CONFIG).is_file():
        raise FileNotFoundError(f"{p} is not a reward model directory: {REWARD_CONFIG} is missing")
    try:
        info = json.loads((p / REWARD_CONFIG).read_text())
        pooling = info["pooling"]
    except (json.JSONDecodeError, KeyError) as e:
        raise ValueError(
            f"{p / REWARD_CONFIG}: not a valid reward config ({type(e).__name__}: {e})"
        ) from None
    _check_model_dir(p)
    kwargs: dict[str, Any] = {"local_files_only": True}
    if dtype is not None:
        kwargs["dtype"] = _parse_dtype(dtype)
    if pooling == "model":
        model = RewardModel(
            AutoModelForSequenceClassification.from_pretrained(str(p), num_labels=1, **kwargs), None, "model"
        )
    elif pooling == "last":
        if not (p / HEAD_FILE).is_file():
            raise FileNotFoundError(f"{p} is not a reward model directory: {HEAD_FILE} is missing")
        backbone = AutoModel.from_pretrained(str(p), **kwargs)
        head = nn.Linear(int(info["hidden_size"]), 1, bias=bool(info.get("head_bias", True)))
        tensors = load_file(str(p / HEAD_FILE))
        try:
            head.load_state_dict(tensors)
        except RuntimeError as e:
            raise ValueError(f"{p / HEAD_FILE}: does not fit the head: {e}") from None
        model = RewardModel(backbone, head, "last")
    else:
        raise ValueError(f"{p / REWARD_CONFIG}: unknown pooling {pooling!r} (expected 'last' or 'model')")
    model.stats = read_reward_stats(p)
    return model
