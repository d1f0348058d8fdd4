"""Standard capability and safety benchmarks on local files in their official formats.

    alignkit bench NAME --model PATH --data PATH [--limit N] [--shots K] [--out FILE]

    from alignkit.eval.bench import BENCHMARKS, run_bench
    result = run_bench("mmlu", "runs/sft/model", "data/mmlu", limit=20, out="runs/mmlu.json", shots=5)
    result["metrics"]["accuracy"]

Every benchmark is one function in `BENCHMARKS`,

    run_fn(model, tokenizer, data_path, limit=0, **opts) -> {"metrics": {...}, "records": [...]}

where `model` is a transformers causal LM (with its tokenizer) or any object with the two
methods of `common.BenchLM` (then `tokenizer` may be None). Metric definitions and the exact
protocol of each are in its module docstring and in docs/evaluation.md.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from alignkit.config import ConfigError
from alignkit.eval.bench import bbq, gsm8k, humaneval, mmlu, toxicity, truthfulqa
from alignkit.eval.bench.common import write_json_atomic

BENCHMARKS: dict[str, Callable[..., dict]] = {
    "gsm8k": gsm8k.run,
    "mmlu": mmlu.run,
    "truthfulqa": truthfulqa.run,
    "bbq": bbq.run,
    "humaneval": humaneval.run,
    "toxicity": toxicity.run,
}

DESCRIPTIONS = {
    "gsm8k": "grade-school maths, chain-of-thought few-shot, exact match of the final number",
    "mmlu": "57-subject multiple choice by log-likelihood of the answer letter",
    "truthfulqa": "TruthfulQA MC1 accuracy and MC2 probability mass on true answers",
    "bbq": "BBQ accuracy (ambiguous / disambiguated) and bias scores",
    "humaneval": "Python function synthesis, tests run in a sandboxed process, pass@k",
    "toxicity": "toxicity of continuations, offline lexicon scorer",
}


def options(name: str) -> dict[str, Any]:
    """The options benchmark `name` accepts beyond `limit`, with their defaults."""
    fn = _lookup(name)
    skip = {"model", "tokenizer", "data_path", "limit"}
    return {k: p.default for k, p in inspect.signature(fn).parameters.items() if k not in skip}


def _lookup(name: str) -> Callable[..., dict]:
    if name not in BENCHMARKS:
        raise ConfigError(f"unknown benchmark '{name}' (valid: {', '.join(BENCHMARKS)})")
    return BENCHMARKS[name]


def check_options(name: str, opts: dict[str, Any]) -> None:
    """An option the benchmark does not take is an error naming the valid ones."""
    valid = options(name)
    for key in opts:
        if key not in valid:
            raise ConfigError(f"benchmark '{name}' has no option '{key}' (valid: {', '.join(valid)})")


def parse_options(name: str, pairs: list[str]) -> dict[str, Any]:
    """`["n_samples=5", "temperature=0.8"]` -> {"n_samples": 5, "temperature": 0.8}, each value
    converted to the type of the option's default (text when the default is None)."""
    valid = options(name)
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"expected key=value, got '{pair}'")
        check_options(name, {key: None})
        kind = type(valid[key]) if valid[key] is not None else str
        try:
            out[key] = kind(text)
        except ValueError:
            raise ConfigError(
                f"option '{key}' of '{name}' needs a value of type {kind.__name__}, got '{text}'"
            ) from None
    return out


def run_bench(
    name: str,
    model_path: str | Path,
    data_path: str | Path,
    limit: int = 0,
    out: str | Path | None = None,
    **opts: Any,
) -> dict:
    """Load the model and tokenizer from `model_path`, run benchmark `name` on `data_path` and,
    when `out` is given, write the whole result (metrics and per-item records) there as JSON,
    atomically. Options set to None are left at the benchmark's default. The global torch seed is
    set from the `seed` option (0 when the benchmark has none).

    Returns {"benchmark", "model", "data", "limit", "options", "metrics", "records", "seconds"}.
    """
    import torch

    from alignkit.models.load import load_model, load_tokenizer

    fn = _lookup(name)
    opts = {k: v for k, v in opts.items() if v is not None}
    check_options(name, opts)
    if limit < 0:
        raise ConfigError(f"limit must be >= 0 (0: all), got {limit}")
    if not Path(data_path).exists():
        raise FileNotFoundError(f"{name} data not found: {data_path}")
    model = load_model(model_path)
    tokenizer = load_tokenizer(model_path)
    model.eval()
    torch.manual_seed(int(opts.get("seed", 0)))
    start = time.monotonic()
    result = fn(model, tokenizer, str(data_path), limit=limit, **opts)
    full = {
        "benchmark": name,
        "model": str(model_path),
        "data": str(data_path),
        "limit": limit,
        "options": {**options(name), **opts},
        "metrics": result["metrics"],
        "records": result["records"],
        "seconds": round(time.monotonic() - start, 3),
    }
    if out is not None:
        write_json_atomic(out, full)
    return full


__all__ = ["BENCHMARKS", "DESCRIPTIONS", "options", "check_options", "parse_options", "run_bench"]
