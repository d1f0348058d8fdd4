"""What a run folder records about itself, so it can be re-run and shared: the resolved config
(OUT/config.yaml, which `alignkit STAGE --config OUT/config.yaml` reads back), the command line
and the library versions (OUT/run.json), and a short model card in OUT/final/README.md."""

from __future__ import annotations

import datetime
import os
import shlex
import subprocess
from pathlib import Path
from typing import Any

from alignkit.atomic import write_json_atomic, write_text_atomic
from alignkit.console import is_main_process

VERSIONED = ("alignkit", "torch", "transformers", "accelerate", "peft", "tokenizers", "deepspeed", "vllm")


def versions() -> dict[str, str]:
    """Installed versions of the libraries a run's numbers depend on (absent ones left out)."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in VERSIONED:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found


def git_commit() -> str | None:
    """The commit of the alignkit source tree, when it is a git checkout (None otherwise)."""
    root = Path(__file__).resolve().parents[1]
    if not (root / ".git").exists():
        return None
    try:
        done = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() or None if done.returncode == 0 else None


def launch(cfg: Any = None) -> dict[str, Any]:
    """How many processes run this job and what started them: torchrun, accelerate or a plain
    process (from the environment the launchers set), or Ray (`launcher: ray` in the config: the
    driver records `ray.workers` trainer ranks; how many machines Ray spreads them over is its
    choice, so `nnodes` is None)."""
    if getattr(cfg, "launcher", None) == "ray":
        return {"world_size": int(cfg.ray.workers), "nnodes": None, "launcher": "ray"}
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if any(k.startswith("ACCELERATE_") for k in os.environ) and world > 1:
        by = "accelerate"
    elif "TORCHELASTIC_RUN_ID" in os.environ:
        by = "torchrun"
    else:
        by = "python"
    return {"world_size": world, "nnodes": int(os.environ.get("GROUP_WORLD_SIZE", "1")) if world > 1 else 1,
            "launcher": by}


def write_run_record(out: Path, cfg: Any, command: list[str] | None, rerun: str) -> None:
    """OUT/config.yaml (every key, resolved) and OUT/run.json (command, versions, commit, time)."""
    if not is_main_process():
        return
    import yaml

    from alignkit.config import to_dict

    header = f"# resolved config of this run; re-run it with:\n#   {rerun}\n"
    write_text_atomic(out / "config.yaml", header + yaml.safe_dump(to_dict(cfg), sort_keys=False))
    write_json_atomic(out / "run.json", {
        "command": shlex.join(command) if command else None,
        "rerun": rerun,
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
        "git_commit": git_commit(),
        "launch": launch(cfg),
    }, indent=2)


def _numbers(result: Any, prefix: str = "") -> dict[str, float]:
    """The top-level and one-level-nested numbers of a stage's result dict."""
    rows: dict[str, float] = {}
    if not isinstance(result, dict):
        return rows
    for k, v in result.items():
        if isinstance(v, bool):
            continue
        if isinstance(v, (int, float)):
            rows[prefix + str(k)] = v
        elif isinstance(v, dict) and not prefix:
            rows.update(_numbers(v, f"{k}/"))
    return rows


def write_model_card(out: Path, stage: str, cfg: Any, result: Any) -> None:
    """OUT/final/README.md: what the model is, what it was trained from, how, and its figures."""
    final = out / "final"
    if not is_main_process() or not final.is_dir():
        return
    model = getattr(getattr(cfg, "model", None), "path", None)
    data = getattr(getattr(cfg, "data", None), "path", None)
    lines = [f"# {final.resolve()}", "", f"Trained by `alignkit {stage}`.", ""]
    lines += [f"- started from: `{model}`" if model else "- started from: a model built from a config",
              f"- data: `{data}`" if data else "- data: the stage's default"]
    lines += ["- full config: `../config.yaml`; command, versions and commit: `../run.json`", "",
              "Load it with `transformers.AutoModelForCausalLM.from_pretrained` on this folder.", ""]
    figures = _numbers(result)
    if figures:
        lines += ["| figure | value |", "|---|---|"]
        lines += [f"| {k} | {v:.6g} |" for k, v in list(figures.items())[:40]]
    write_text_atomic(final / "README.md", "\n".join(lines) + "\n")
