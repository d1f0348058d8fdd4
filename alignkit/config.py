"""Typed configs: one dataclass per stage, filled from a YAML file plus dotted overrides.

    cfg = load_config(SFTConfig, "configs/sft.yaml", ["train.lr=3e-4", "data.path=x.jsonl"])

Unknown or ill-typed keys are a `ConfigError` that names the key and the closest valid key.
A config is built once and never mutated afterwards; derived values live in properties.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

T = TypeVar("T")

REQUIRED: Any = None  # marks a field the user must set; checked by `check_required`


class ConfigError(ValueError):
    """A bad config key or value; the message names the key."""


@dataclass(frozen=True)
class ModelConfig:
    """Which model to train and how to build it."""

    path: str | None = None
    """Local directory of a Hugging Face causal LM; None builds a tiny model from `preset`."""
    tokenizer: str | None = None
    """Local tokenizer directory; defaults to `path`."""
    preset: str = "tiny"
    """Size preset for a model built from scratch (see alignkit.models.load.PRESETS)."""
    lora_r: int = 0
    """LoRA rank; 0 trains all weights."""
    lora_alpha: int = 16
    """LoRA scaling numerator (effective scale is alpha / r)."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA branch."""
    lora_targets: str = "all-linear"
    """Comma-separated module names for LoRA, or 'all-linear'."""


@dataclass(frozen=True)
class DataConfig:
    """Where the training data comes from and how it is cut."""

    path: str | None = None
    """A .jsonl / .json / .gz / .parquet file."""
    eval_path: str | None = None
    """Optional held-out file of the same kind."""
    on_error: Literal["raise", "skip"] = "raise"
    """A malformed record stops the run ('raise') or is counted, reported and skipped."""
    max_prompt_len: int = 256
    """Prompt tokens kept (the oldest are cut first)."""
    max_len: int = 512
    """Prompt + response tokens kept (the response's end is cut)."""
    limit: int = 0
    """Use only the first N records (0: all)."""
    max_no_signal: float = 0.5
    """Preference stages stop before training when more than this fraction of pairs carry no signal
    (empty, identical or near-identical responses, as `alignkit data lint` flags them); 1: never."""


@dataclass(frozen=True)
class TrainConfig:
    """Settings of the one training loop (alignkit.train.loop)."""

    lr: float = 1e-4
    """Peak learning rate of AdamW."""
    weight_decay: float = 0.0
    """AdamW weight decay (not applied to biases and norms)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warm-up."""
    warmup_steps: int = 0
    """Linear warm-up steps (optimizer steps)."""
    batch_size: int = 8
    """Examples per optimizer step, over all processes and accumulation steps (global batch)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step and process."""
    epochs: int = 1
    """Passes over the data (ignored when max_steps > 0)."""
    max_steps: int = 0
    """Optimizer steps to run; 0 means `epochs` full passes."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this (0 disables)."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """'auto' is bf16 on a GPU that supports it, fp32 otherwise."""
    seed: int = 0
    """Seed of the data order and initialisation."""
    save_every: int = 0
    """Checkpoint every N optimizer steps, in the RL stages every N iterations (0: only at the end)."""
    keep_checkpoints: int = 1
    """How many step checkpoints to keep."""
    log_every: int = 10
    """Write metrics every N optimizer steps."""
    resume: bool = False
    """Continue from the last checkpoint in the output directory."""
    overwrite: bool = False
    """A fresh run where an earlier run left checkpoints replaces them (otherwise: an error)."""
    progress: bool = True
    """Show progress on stderr: a bar on a terminal, a plain line every 15 s in a log file."""
    tensorboard: bool = True
    """Also write the metrics as TensorBoard event files (OUT/tb)."""
    report_to: tuple[Literal["tensorboard", "wandb", "mlflow", "trackio"], ...] = ()
    """Experiment trackers that also get the metrics, e.g. [wandb, mlflow] (each an optional extra:
    pip install 'alignkit[wandb]'); see alignkit/train/trackers.py."""
    strategy: Literal["ddp", "fsdp2", "deepspeed"] = "ddp"
    """How several processes share the model: ddp (replicas), fsdp2 (torch fully_shard) or deepspeed (ZeRO)."""
    zero_stage: Literal[2, 3] = 3
    """DeepSpeed ZeRO stage: 2 shards gradients and optimizer states, 3 also the parameters."""
    offload: bool = False
    """Keep optimizer states (and with ZeRO-3 / FSDP2 the parameters) in CPU memory."""
    logprob_chunk: int = 1024
    """Tokens per LM-head chunk when computing log-probs and the SFT loss (0: full logits)."""
    packing: bool = False
    """SFT and the DPO family (KTO too): each micro-batch's sequences in one row, no padding (alignkit.data.packing)."""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


# Hugging Face TrainingArguments / TRL spellings -> alignkit's key (and what differs)
HF_NAMES = {
    "learning_rate": ("train.lr", ""),
    "num_train_epochs": ("train.epochs", ""),
    "per_device_train_batch_size": (
        "train.batch_size",
        "the GLOBAL batch: per-device batch x processes x train.grad_accum",
    ),
    "train_batch_size": ("train.batch_size", "the global batch"),
    "gradient_accumulation_steps": ("train.grad_accum", ""),
    "max_steps": ("train.max_steps", ""),
    "warmup_steps": ("train.warmup_steps", ""),
    "weight_decay": ("train.weight_decay", ""),
    "max_grad_norm": ("train.max_grad_norm", ""),
    "lr_scheduler_type": ("train.schedule", "cosine, linear or constant"),
    "save_steps": ("train.save_every", ""),
    "logging_steps": ("train.log_every", ""),
    "save_total_limit": ("train.keep_checkpoints", ""),
    "seed": ("train.seed", ""),
    "bf16": ("train.precision", "set train.precision=bf16"),
    "resume_from_checkpoint": ("train.resume", "true resumes from OUT's newest checkpoint"),
    "output_dir": ("out", ""),
    "model_name_or_path": ("model.path", "a local directory"),
    "max_length": ("data.max_len", ""),
    "max_prompt_length": ("data.max_prompt_len", ""),
}


def _closest(key: str, options: list[str], prefix: str = "") -> str:
    if key in HF_NAMES:
        target, note = HF_NAMES[key]
        return f" (Hugging Face's '{key}' is alignkit's '{target}'{': ' + note if note else ''})"
    match = difflib.get_close_matches(key, options, n=1, cutoff=0.6)
    if match:
        return f" (did you mean '{prefix}{match[0]}'?)"
    return f" (valid keys: {', '.join(prefix + o for o in options)})"


def _show_type(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(str(a) for a in typing.get_args(tp))
    return _type_name(tp)


def field_docs(cls: type) -> dict[str, str]:
    """The one-line docstrings under each field of dataclass `cls` (and its dataclass bases),
    read from the source: Python keeps no attribute docstrings at run time."""
    import ast
    import inspect
    import textwrap

    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for a, b in zip(body, body[1:]):
            if (isinstance(a, ast.AnnAssign) and isinstance(a.target, ast.Name) and isinstance(b, ast.Expr)
                    and isinstance(b.value, ast.Constant) and isinstance(b.value.value, str)):
                docs[a.target.id] = " ".join(b.value.value.split())
    return docs


def describe(cls: type, prefix: str = "") -> list[dict[str, Any]]:
    """Every key of config class `cls`, nested sections flattened to dotted names: one dict per
    key with `key`, `type`, `default`, `required` and `doc`."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    rows: list[dict[str, Any]] = []
    for f in dataclasses.fields(cls):
        default = _default(f)
        if dataclasses.is_dataclass(hints[f.name]):
            # a stage says what it needs of a shared section in the section's docstring:
            # "`data.path`: preference pairs (required)"
            notes = dict(re.findall(r"`" + f.name + r"\.(\w+)`:? ?([^`]*)", docs.get(f.name, "")))
            for row in describe(hints[f.name], f"{prefix}{f.name}."):
                note = notes.get(row["key"].rsplit(".", 1)[1], "")
                if note:
                    row["required"] = row["required"] or "(required)" in note
                    row["doc"] = " ".join(note.replace("(required)", "").split()).rstrip(" ;.") + ". " + row["doc"]
                rows.append(row)
            continue
        rows.append({
            "key": prefix + f.name,
            "type": _show_type(hints[f.name]),
            "default": default,
            "required": bool(f.metadata.get("required")),
            "doc": docs.get(f.name, ""),
        })
    return rows


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML / CLI value to the annotated type, or raise ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"config key '{key}': expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"config key '{key}': expected one of {list(args)}, got {value!r}")
        return value
    if origin in (tuple, list):
        if isinstance(value, str):
            value = [v.strip() for v in value.strip("()[]").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"config key '{key}': expected {len(args)} values, got {len(value)}")
            return tuple(_coerce(v, a, key) for v, a in zip(value, args))
        inner = args[0] if args else Any
        return origin(_coerce(v, inner, key) for v in value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a mapping, got {value!r}")
        return build(tp, value, prefix=f"{key}.")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"config key '{key}': expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"config key '{key}': expected a string, got {value!r}")
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a mapping, got {value!r}")
        return value
    return value


# Allowed ranges of numeric keys, by field name (the same name means the same thing in every
# stage): (low, high, low_inclusive, high_inclusive); None is unbounded. A numeric key missing
# here must be in UNBOUNDED (tests/test_config_ranges.py walks every stage's config).
_POS = (0, None, False, False)
_NONNEG = (0, None, True, False)
_ONE = (1, None, True, False)
_UNIT = (0, 1, True, True)
RANGES: dict[str, tuple] = {
    **dict.fromkeys(("lr", "beta", "lora_alpha", "kl_horizon", "value_lr", "queue_timeout_s", "num_cpus",
                     "placement_timeout_s", "request_timeout_s", "read_deadline_s", "disagreement_ratio_max"), _POS),
    **dict.fromkeys(("batch_size", "grad_accum", "epochs", "eval_batch_size", "forward_batch_size",
                     "generation_batch_size", "iterations", "max_len", "max_prompt_len", "max_n",
                     "max_new_tokens", "max_tokens_limit", "max_concurrency", "max_connections",
                     "max_body_bytes", "max_pending", "n_boot", "n_rounds", "new_pairs_repeat", "patience", "ppo_epochs",
                     "prompts_per_round", "prompts_per_step", "reference_batch_size", "rollout_batch",
                     "rounds", "seq_len", "updates_per_rollout", "window", "default_max_tokens",
                     "sweep_steps", "group_size", "vocab_size", "workers", "object_store_mb", "vllm_kv_cache_mb"), _ONE),
    **dict.fromkeys(("center_coef", "clip", "clip_eps", "clip_eps_high", "clip_eps_value",
                     "critique_temperature", "temperature", "ent_coef", "ensemble_coef", "eval_every",
                     "eval_limit", "eval_max_new_tokens", "initial_pairs", "keep_checkpoints", "kl_coef",
                     "kl_target", "limit", "log_every", "logprob_chunk", "lora_r", "max_grad_norm", "mismatched_pairs",
                     "missing_eos_penalty", "n_principles", "save_every", "stats_pairs", "stop_approx_kl",
                     "vf_coef", "warmup_steps", "weight_decay", "warmup", "kl_growth_max", "num_gpus",
                     "reward_num_cpus", "reward_num_gpus", "reference_num_cpus", "reference_num_gpus", "judge_pairs",
                     "vllm_engines", "vllm_num_cpus", "vllm_num_gpus",
                     "judge_drop_max", "proxy_gap_rise_max", "number_negatives", "copy_negatives", "ref_logprob_coef",
                     "ref_surprise_coef"), _NONNEG),
    **dict.fromkeys(("label_noise", "max_no_signal", "lam", "gamma", "entropy_ratio_min", "refusal_rise_max",
                     "repetition_rise_max", "judge_agreement_min", "ref_surprise_rise_max"), _UNIT),
    "lora_dropout": (0, 1, True, False),
    "confidence": (0, 1, False, False),
    "ref_surprise_prob": (0, 1, False, False),
    "top_p": (0, 1, False, True),
    "vllm_gpu_memory_utilization": (0, 1, False, True),
    "train.betas": (0, 1, True, False),  # AdamW's; compare's `betas` are DPO betas (> 0)
    "betas": _POS,
    "length_corr_max": (-1, 1, True, True),
    "max_steps": (-1, None, True, False),
    "port": (0, 65535, True, True),
}
UNBOUNDED = {"seed"}


def _range_text(rule: tuple) -> str:
    lo, hi, lo_in, hi_in = rule
    if hi is None:
        return f"{'>=' if lo_in else '>'} {lo}"
    return f"in {'[' if lo_in else '('}{lo}, {hi}{']' if hi_in else ')'}"


def check_range(key: str, name: str, value: Any) -> None:
    """ConfigError naming `key` when a number (or each number of a tuple) is NaN, infinite or
    outside RANGES[key] (a dotted key, when one name means two things) or RANGES[name]."""
    rule = RANGES.get(key, RANGES.get(name))
    values = value if isinstance(value, (tuple, list)) else (value,)
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if not math.isfinite(v):
            raise ConfigError(f"config key '{key}': expected a finite number, got {v!r}")
        if rule is None:
            continue
        lo, hi, lo_in, hi_in = rule
        bad = (lo is not None and (v < lo or (v == lo and not lo_in))) or \
              (hi is not None and (v > hi or (v == hi and not hi_in)))
        if bad:
            raise ConfigError(f"config key '{key}': expected {_range_text(rule)}, got {v!r}")


def _check_fields(obj: Any, prefix: str) -> None:
    for f in dataclasses.fields(obj):
        check_range(prefix + f.name, f.name, getattr(obj, f.name))
    max_len, max_prompt = getattr(obj, "max_len", None), getattr(obj, "max_prompt_len", None)
    if isinstance(max_len, int) and isinstance(max_prompt, int) and max_len < max_prompt:
        raise ConfigError(f"config key '{prefix}max_len' ({max_len}) must be >= {prefix}max_prompt_len "
                          f"({max_prompt}): prompt + response tokens cannot be fewer than prompt tokens")


def build(cls: type[T], values: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass `cls` from a (nested) mapping, checking every key and type."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(f"unknown config key '{prefix}{key}'{_closest(key, list(fields), prefix)}")
        default = _default(fields[key])
        if isinstance(value, dict) and dataclasses.is_dataclass(default):
            # a partial section keeps the stage's own defaults for the keys it does not set
            value = {**{f.name: getattr(default, f.name) for f in dataclasses.fields(default)}, **value}
        kwargs[key] = _coerce(value, hints[key], prefix + key)
    obj = cls(**kwargs)
    _check_fields(obj, prefix)
    return obj


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _set_dotted(tree: dict, dotted: str, value: Any, cls: type) -> None:
    parts = dotted.split(".")
    node, node_cls = tree, cls
    for i, part in enumerate(parts):
        names = [f.name for f in dataclasses.fields(node_cls)] if dataclasses.is_dataclass(node_cls) else []
        if part not in names:
            where = ".".join(parts[:i])
            raise ConfigError(f"unknown config key '{dotted}'{_closest(part, names, where + '.' if where else '')}")
        if i == len(parts) - 1:
            node[part] = value
        else:
            node_cls = typing.get_type_hints(node_cls)[part]
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"config key '{'.'.join(parts[: i + 1])}' is not a section")


def parse_override(text: str) -> tuple[str, Any]:
    """'train.lr=3e-4' -> ('train.lr', 0.0003); the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key=value (for example train.lr=3e-4)")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Read `cls` from an optional YAML file, then apply dotted `key=value` overrides."""
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: expected a mapping of config keys at the top level")
        tree = loaded
    for text in overrides or []:
        key, value = parse_override(text)
        _set_dotted(tree, key, value, cls)
    try:
        return build(cls, tree)
    except ConfigError as e:
        if path is not None:
            raise ConfigError(f"{path}: {e}") from None
        raise


def to_dict(cfg: Any) -> dict:
    """A plain, YAML-safe mapping of a config (tuples become lists)."""

    def plain(v: Any) -> Any:
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg))


def check_required(cfg: Any, prefix: str = "") -> None:
    """Raise ConfigError for the first field still set to REQUIRED (None with no default use)."""
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            check_required(v, prefix + f.name + ".")
        elif v is REQUIRED and f.metadata.get("required"):
            raise ConfigError(f"config key '{prefix}{f.name}' is required")


def required() -> Any:
    """A dataclass field the user must set (checked by `check_required`)."""
    return field(default=None, metadata={"required": True})
