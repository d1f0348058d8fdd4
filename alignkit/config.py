"""Typed configs: one dataclass per stage, filled from a YAML file plus dotted overrides.

    cfg = load_config(SFTConfig, "configs/sft.yaml", ["train.lr=3e-4", "data.path=x.jsonl"])

Unknown or ill-typed keys are a `ConfigError` that names the key and the closest valid key.
A config is built once and never mutated afterwards; derived values live in properties.
"""

from __future__ import annotations

import dataclasses
import difflib
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
    """Show a progress bar."""
    tensorboard: bool = True
    """Also write TensorBoard event files."""
    logprob_chunk: int = 1024
    """Tokens per LM-head chunk when computing log-probs and the SFT loss (0: full logits)."""
    packing: bool = False
    """SFT: concatenate each micro-batch's sequences into one row, no padding (alignkit.data.packing)."""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _closest(key: str, options: list[str], prefix: str = "") -> str:
    match = difflib.get_close_matches(key, options, n=1, cutoff=0.4)
    if match:
        return f" (did you mean '{prefix}{match[0]}'?)"
    return f" (valid keys: {', '.join(prefix + o for o in options)})"


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
    return cls(**kwargs)


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
