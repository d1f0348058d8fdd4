"""Gold-judge evaluation: generate on the world's held-out prompts and score every answer.

    alignkit eval model=runs/sft/model world=runs/world out=runs/eval-sft
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

from alignkit.atomic import write_text_atomic
from alignkit.config import required


@dataclass(frozen=True)
class Config:
    """Gold evaluation settings."""

    model: str = required()
    """Local model directory."""
    world: str = required()
    """World directory written by `alignkit world` (eval_prompts.jsonl and world.json)."""
    out: str | None = None
    """Where to write responses.jsonl and scores.json (None: don't write)."""
    max_new_tokens: int = 32
    """Longest answer sampled."""
    temperature: float = 0.0
    """0 means greedy decoding."""
    top_p: float = 1.0
    """Nucleus sampling mass when temperature > 0."""
    limit: int = 0
    """Evaluate only the first N prompts (0: all)."""
    batch_size: int = 64
    """Prompts generated together."""
    seed: int = 0
    """Sampling seed."""


def write_jsonl_atomic(path: Path, rows: list[dict]) -> None:
    """One JSON object per line, written atomically."""
    write_text_atomic(path, "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows))


def score_responses(world, prompts: list[str], responses: list[str]) -> tuple[dict, list[dict]]:
    """Gold scores: overall mean, per-category means, and one row per answer."""
    rows = []
    by_cat: dict[str, list[float]] = defaultdict(list)
    for prompt, response in zip(prompts, responses):
        v = world.judge(prompt, response)
        rows.append({"prompt": prompt, "response": response, "score": v.total, "category": v.category})
        by_cat[v.category].append(v.total)
    scores = [r["score"] for r in rows]
    summary = {
        "gold_score": sum(scores) / len(scores),
        "per_category": {c: sum(s) / len(s) for c, s in sorted(by_cat.items())},
        "n": len(scores),
    }
    return summary, rows


def evaluate(model, tokenizer, world, prompts: list[str], cfg: Config) -> tuple[dict, list[dict]]:
    from alignkit.models.generate import SamplingParams, generate_text

    params = SamplingParams(
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature if cfg.temperature > 0 else 1.0,
        top_p=cfg.top_p,
        greedy=cfg.temperature <= 0,
        seed=cfg.seed,
    )
    responses = generate_text(model, tokenizer, prompts, params)
    return score_responses(world, prompts, responses)


def spread(items: list, limit: int) -> list:
    """`limit` items spread evenly over `items`, so that every block of a category-ordered file
    (the world's eval prompts) keeps its share; all of them when `limit` is 0 or too large."""
    if not limit or limit >= len(items):
        return list(items)
    stride = len(items) / limit
    return [items[int(i * stride)] for i in range(limit)]


def read_eval_prompts(world_dir: str | Path, limit: int = 0) -> list[str]:
    """The world's held-out prompts; `limit` of them spread over every category (0: all)."""
    from alignkit.data.load import load_records

    records = load_records(Path(world_dir) / "eval_prompts.jsonl", kind="prompt").records
    return spread([r.prompt for r in records], limit)


def run(cfg: Config) -> dict:
    from alignkit.config import ConfigError
    from alignkit.models.load import load_model, load_tokenizer
    from alignkit.world import load_world

    if not cfg.model or not cfg.world:
        raise ConfigError("config keys 'model' and 'world' are required")
    world = load_world(cfg.world)
    prompts = read_eval_prompts(cfg.world, cfg.limit)
    torch.manual_seed(cfg.seed)
    model = load_model(cfg.model)
    tokenizer = load_tokenizer(cfg.model)
    summary, rows = evaluate(model, tokenizer, world, prompts, cfg)
    if cfg.out:
        out = Path(cfg.out)
        write_jsonl_atomic(out / "responses.jsonl", rows)
        write_text_atomic(out / "scores.json", json.dumps(summary, indent=2))
    return summary
