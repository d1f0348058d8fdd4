"""The demo pipeline on the built-in world: world -> tokenizer + pre-training -> SFT -> eval.

Each stage reads its preset from configs/, runs in this process, and adds an entry to
OUT/summary.json (`{"stages": {"base": {...}, "sft": {...}}}`) and a row to OUT/report.md.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from alignkit.config import load_config
from alignkit.memory import PeakMemory

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# --quick: small enough for the test suite
QUICK = {
    "pretrain": ["train.max_steps=60", "vocab_size=512", "model.preset=nano", "train.log_every=20"],
    "sft": ["train.max_steps=40", "train.log_every=20"],
    "eval": ["limit=48", "max_new_tokens=24"],
}


def write_json_atomic(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _preset(name: str):
    path = CONFIGS / f"{name}.yaml"
    if not path.is_file():
        raise FileNotFoundError(path)
    return path


def _timed(fn, *args, **kwargs):
    start = time.perf_counter()
    with PeakMemory() as mem:
        result = fn(*args, **kwargs)
    return result, time.perf_counter() - start, mem.peak_mb


def render_report(summary: dict) -> str:
    stages = summary["stages"]
    cats = sorted({c for s in stages.values() for c in s.get("per_category", {})})
    lines = [
        "# alignkit demo report",
        "",
        f"World seed {summary['seed']}, {'quick' if summary['quick'] else 'full'} run on {summary['machine']}.",
        "Gold score: mean score of the gold judge over held-out prompts (0 worst, 1 best).",
        "",
        "| stage | gold score | " + " | ".join(cats) + " | wall s | peak MB |",
        "|---|---|" + "---|" * len(cats) + "---|---|",
    ]
    for name, s in stages.items():
        per = s.get("per_category", {})
        cells = " | ".join(f"{per[c]:.3f}" if c in per else "" for c in cats)
        lines.append(f"| {name} | {s['gold_score']:.3f} | {cells} | {s['wall_s']:.1f} | {s['peak_mem_mb']:.0f} |")
    lines += ["", "Training wall time and peak memory are for the stage that made the model; "
              "'base' is the pre-trained model, 'sft' the fine-tuned one.", ""]
    return "\n".join(lines)


def demo(out: str | Path, quick: bool = False, seed: int = 0) -> dict:
    """Run the pipeline; returns the summary (also written to OUT/summary.json)."""
    from alignkit.eval import gold
    from alignkit.train import pretrain, sft
    from alignkit.world import load_world, write_world

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))
    summary: dict = {
        "seed": seed,
        "quick": quick,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs" + (", CUDA" if torch.cuda.is_available() else ""),
        "stages": {},
        "report": str(out / "report.md"),
    }

    def save() -> None:
        write_json_atomic(out / "summary.json", summary)
        (out / "report.md").write_text(render_report(summary))

    world_dir = out / "world"
    world_info, world_s, _ = _timed(write_world, world_dir, seed=seed, n_pairs=2000 if quick else 10000)
    summary["world"] = {"wall_s": world_s, "dir": str(world_dir)}
    world = load_world(world_dir)
    prompts = gold.read_eval_prompts(world_dir)  # all; --quick keeps an even subset below

    def q(stage: str) -> list[str]:
        return QUICK[stage] if quick else []

    eval_cfg = load_config(gold.Config, _preset("eval"), [f"model={out}", f"world={world_dir}"] + q("eval"))
    if eval_cfg.limit and eval_cfg.limit < len(prompts):
        stride = len(prompts) / eval_cfg.limit  # every category keeps its share
        prompts = [prompts[int(i * stride)] for i in range(eval_cfg.limit)]

    def evaluate(model_dir: Path) -> dict:
        from alignkit.models.load import load_model, load_tokenizer

        model, tok = load_model(model_dir), load_tokenizer(model_dir)
        scores, rows = gold.evaluate(model, tok, world, prompts, eval_cfg)
        gold.write_jsonl_atomic(model_dir.parent / "eval_responses.jsonl", rows)
        return scores

    pre_cfg = load_config(
        pretrain.Config,
        _preset("pretrain"),
        [f"corpus={world_dir / 'pretrain.jsonl'}", f"out={out / 'base'}", f"train.seed={seed}",
         "train.overwrite=true"] + q("pretrain"),
    )
    pre, wall, mem = _timed(pretrain.run, pre_cfg)
    summary["stages"]["base"] = {**evaluate(Path(pre["model"])), "wall_s": wall, "peak_mem_mb": mem,
                                 "train_loss": pre.get("final_loss")}
    save()

    sft_cfg = load_config(
        sft.Config,
        _preset("sft"),
        [f"model.path={pre['model']}", f"data.path={world_dir / 'sft.jsonl'}", f"out={out / 'sft'}",
         f"train.seed={seed}", "train.overwrite=true"] + q("sft"),
    )
    res, wall, mem = _timed(sft.run, sft_cfg)
    summary["stages"]["sft"] = {**evaluate(Path(res["model"])), "wall_s": wall + 0.0, "peak_mem_mb": mem,
                                "train_loss": res.get("final_loss"), "padding_fraction": res.get("padding_fraction")}
    summary["world"]["counts"] = {k: v for k, v in world_info.items() if isinstance(v, int)}
    save()
    return summary
