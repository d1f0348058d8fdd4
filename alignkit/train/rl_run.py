"""What PPO, GRPO and RLOO share around their iterations: the run's start (ranks, run folder,
resume check, device, world, tokenizer, prompts, policy), the gold evaluations during training
and the final export. The stage files keep what differs: their models, updates and metrics.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from alignkit.atomic import write_json_atomic
from alignkit.config import ConfigError, to_dict
from alignkit.train import checkpoint as ckpt
from alignkit.train.distributed import Dist, barrier, device_for, init_dist
from alignkit.train.rl_shard import Replicated, whole_reference
from alignkit.train.rollout import check_resume, final_gold_eval, load_prompts, pick_device


@dataclass
class RunStart:
    """This process's place in the run, before any model is loaded."""

    dist: Dist
    out: Path
    metrics_path: Path
    resume_from: Path | None
    """The checkpoint to resume from (train.resume=true), or None."""
    device: torch.device
    world: Any
    """The built-in world (gold judge, eval prompts), or None."""
    t0: float


def start_run(cfg: Any, per_step_key: str, per_step: int) -> RunStart:
    """Join the ranks (`per_step`, config key `per_step_key`, must split evenly over them), prepare
    the run folder, refuse a resume with another run's settings, seed, and load the world."""
    dist = init_dist()
    if per_step % dist.world:
        raise ConfigError(f"config key '{per_step_key}' ({per_step}) must be a multiple of the {dist.world} ranks")
    t0 = time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    resume_from = ckpt.prepare_run_dir(out, cfg.train.resume, cfg.train.overwrite, main=dist.main)
    barrier(dist)
    if resume_from is not None:
        check_resume(resume_from, to_dict(cfg), cfg.iterations)
    device = device_for(dist) if dist.active else pick_device()
    torch.manual_seed(cfg.train.seed)
    world = None
    if cfg.world:
        from alignkit.world import load_world

        world = load_world(cfg.world)
    return RunStart(dist, out, out / "metrics.jsonl", resume_from, device, world, t0)


def load_policy_and_prompts(cfg: Any, device: torch.device) -> tuple[Any, list, list, Any]:
    """(tokenizer, prompt ids, prompt texts, policy in eval mode: no dropout, so the probability
    ratio is exactly 1 before the first update)."""
    from alignkit.models.load import apply_lora, load_model, load_tokenizer

    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.path)
    prompt_path = cfg.data.path or str(Path(cfg.world) / "train_prompts.jsonl")
    prompt_ids, prompt_texts = load_prompts(prompt_path, tokenizer, cfg.data.max_prompt_len, cfg.data.limit, cfg.data.on_error)
    policy = apply_lora(load_model(cfg.model.path), cfg.model).to(device)
    policy.eval()
    return tokenizer, prompt_ids, prompt_texts, policy


def gold_eval(engine: Replicated, reference: Any, tokenizer: Any, run: RunStart, cfg: Any, cache: dict) -> dict | None:
    """`final_gold_eval` of the current policy on rank 0 (None elsewhere). Collective: a sharded
    policy and reference are gathered on every rank first."""
    with engine.gathered() as current, whole_reference(reference) as ref:
        if run.dist.main:
            return final_gold_eval(current, ref, tokenizer, run.world, cfg.world, cfg.eval_limit,
                                   cfg.rollout.max_new_tokens, cache)
    return None


def eval_due(cfg: Any, run: RunStart, iteration: int) -> bool:
    """A gold evaluation after this iteration (every `eval_every`; the last one is the final eval)."""
    return run.world is not None and bool(cfg.eval_every) and iteration % cfg.eval_every == 0 and iteration < cfg.iterations


def finish_run(engine: Replicated, reference: Any, tokenizer: Any, run: RunStart, cfg: Any, evals: list,
               cache: dict) -> dict:
    """Write OUT/final (a plain Hugging Face directory) and, with a world, OUT/eval.json (rank 0);
    return the result's gold figures. Collective."""
    from alignkit.models.load import save_model

    result: dict[str, Any] = {}
    with engine.gathered() as trained, whole_reference(reference) as ref:
        if not run.dist.main:
            return result
        save_model(trained, tokenizer, run.out / "final")
        if run.world is not None:
            ev = final_gold_eval(trained, ref, tokenizer, run.world, cfg.world, cfg.eval_limit,
                                 cfg.rollout.max_new_tokens, cache)
            ev["during_training"] = evals
            write_json_atomic(run.out / "eval.json", ev)
            result.update(gold_score=ev["gold"], gold_ref=ev["gold_ref"], win_rate=ev["win_rate"],
                          win_rate_ci=ev["win_rate_ci"])
    return result
