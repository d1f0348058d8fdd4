"""Stage 3b, critic-free RL: GRPO (Shao et al. 2024) and RLOO (Ahmadian et al. 2024).

    alignkit grpo --config configs/grpo.yaml model.path=runs/sft/final world=runs/world out=runs/grpo
    alignkit rloo --config configs/grpo.yaml model.path=runs/sft/final world=runs/world out=runs/rloo

Per iteration: sample `group_size` responses for each of `prompts_per_step` prompts, score
them with any reward source, turn the scores into one advantage per response with the
estimator named by `advantage` (a registry, ADVANTAGES), and update with the clipped surrogate.
The KL to the frozen reference sits either in the loss (`kl_in: loss`, the k3 term of
DeepSeekMath Eq. 3) or in the reward (`kl_in: reward`: score - beta * sum_t kl_t before the
baseline, as RLOO does). No value model. docs/grpo.md has the details and the metrics;
checkpoints in OUT/checkpoints make `train.resume=true` exact.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from alignkit.atomic import read_jsonl
from alignkit.config import ConfigError, DataConfig, ModelConfig, TrainConfig, to_dict
from alignkit.losses.advantages import group_advantages, masked_mean, rloo_advantages
from alignkit.losses.kl import get_kl_estimator
from alignkit.losses.policy import grpo_loss
from alignkit.train.distributed import (
    SINGLE,
    Dist,
    all_reduce_sums,
    all_reduce_tensor,
    check_rl_strategy,
    micro_batches,
)
from alignkit.train.ray_launch import RayConfig, run_here_or_on_ray
from alignkit.train.rl_shard import Replicated, rl_engine, shard_reference
from alignkit.train.rollout import (
    RewardConfig,
    RewardSource,
    Rollout,
    RolloutConfig,
    autocast_for,
    reference_feature_metrics,
    reference_features,
    response_token_stats,
)

ADVANTAGES: dict[str, Callable[[torch.Tensor, int], torch.Tensor]] = {
    # (r - mean_group) / std_group: Shao et al. 2024, Sec. 4.1.2
    "grpo": lambda r, g: group_advantages(r, g, normalize_std=True),
    # r - mean_group, no std division: Liu et al. 2025 ("Dr. GRPO")
    "dr_grpo": lambda r, g: group_advantages(r, g, normalize_std=False),
    # r_i - mean_{j != i} r_j: Kool et al. 2019; Ahmadian et al. 2024
    "rloo": rloo_advantages,
}
"""Sequence advantage estimators: (B*G,) scores with groups contiguous, G -> (B*G,) advantages."""


@dataclass(frozen=True)
class Config:
    """GRPO / RLOO settings. `train.batch_size` is the minibatch (responses per optimizer step)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """`model.path`: the SFT policy (required); lora_r > 0 trains LoRA and the reference is the adapter-free model."""
    data: DataConfig = field(default_factory=lambda: DataConfig(max_prompt_len=128))
    """`data.path`: prompts (any prompt format); default WORLD/train_prompts.jsonl."""
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=1e-5, batch_size=64, schedule="constant"))
    """Optimizer settings: lr, betas, weight_decay, schedule, warmup_steps, batch_size (minibatch), grad_accum, max_grad_norm, precision, seed; checkpoints: save_every (iterations), keep_checkpoints, resume, overwrite."""
    reward: RewardConfig = field(default_factory=lambda: RewardConfig(source="gold"))
    """Reward source: the gold judge (default), a reward model, or module:function."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """Sampling settings."""
    world: str | None = None
    """World directory: gold reward / metrics and the final win rate against the reference."""
    out: str = "runs/grpo"
    """Output directory: metrics.jsonl, eval.json, checkpoints/ (resume), final/ (the policy)."""
    iterations: int = 40
    """Rollout batches."""
    prompts_per_step: int = 8
    """Prompts per rollout batch; the batch holds prompts_per_step * group_size responses."""
    group_size: int = 8
    """Responses sampled per prompt (G >= 2)."""
    advantage: Literal["grpo", "dr_grpo", "rloo"] = "grpo"
    """Advantage estimator, a key of ADVANTAGES."""
    kl_coef: float = 0.04
    """KL coefficient beta (DeepSeekMath: 0.04)."""
    kl_in: Literal["loss", "reward"] = "loss"
    """'loss': beta * k3 per token in the loss; 'reward': score - beta * sum_t kl_t before the baseline."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    """Per-token estimator when kl_in is 'reward' (the loss always uses k3, Shao et al. Eq. 4)."""
    share_prompt_prefix: bool = True
    """Run each distinct prompt once per forward (KV cache shared by its G responses) in the
    reference, old-log-prob and update passes; same numbers, fewer tokens. False: full rows."""
    updates_per_rollout: int = 1
    """Passes over each rollout batch (GRPO's mu); with 1 and one minibatch the ratio is 1."""
    clip_eps: float = 0.2
    """Lower ratio clip range (and the upper one unless clip_eps_high is set)."""
    clip_eps_high: float | None = None
    """Upper ratio clip range (DAPO clip-higher); None: clip_eps."""
    loss_agg: Literal["token-mean", "seq-mean-token-mean"] = "token-mean"
    """How per-token losses are averaged (policy.LOSS_AGGREGATIONS)."""
    eval_every: int = 0
    """Also measure greedy gold score and win rate on held-out prompts every N iterations (0: only at the end)."""
    eval_limit: int = 0
    """Held-out prompts used for the gold evaluation (0: all)."""
    launcher: Literal["torchrun", "ray"] = "torchrun"
    """'torchrun': this process is the run (or one of torchrun's ranks); 'ray': place ray.workers ranks as Ray actors."""
    ray: RayConfig = field(default_factory=RayConfig)
    """Ray placement (launcher=ray only): trainer ranks and their resources, the cluster, a reward actor."""


def needs_old_logprobs(cfg: Config) -> bool:
    """Old log-probs need their own forward pass unless each rollout feeds exactly one
    optimizer step (then old_logp = logp.detach() in that step, exact) and the KL is not in
    the reward (which needs the sampling policy's log-probs before the update)."""
    batch = cfg.prompts_per_step * cfg.group_size
    return cfg.kl_in == "reward" or cfg.updates_per_rollout > 1 or cfg.train.batch_size < batch


def sequence_rewards(ro: Rollout, cfg: Config) -> torch.Tensor:
    """(B,) the reward the baseline sees: the score (plus the reference's features, `reference_features`), minus
    beta * sum_t kl_t when kl_in is 'reward'."""
    scores = ro.scores + reference_features(ro, cfg.reward)
    if cfg.kl_in != "reward" or cfg.kl_coef == 0:
        return scores
    kl = get_kl_estimator(cfg.kl_estimator)(ro.logprobs, ro.ref_logprobs) * ro.response_mask  # (B, T)
    return scores - cfg.kl_coef * kl.sum(-1)


def grpo_update(
    policy: Any,
    ro: Rollout,
    advantages: torch.Tensor,
    cfg: Config,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    generator: torch.Generator,
    dist: Dist = SINGLE,
    engine: Replicated | None = None,
) -> tuple[dict[str, float], torch.Tensor]:
    """`updates_per_rollout` passes over shuffled minibatches; returns mean statistics and the
    (B, T) detached log-probs of the first pass (those of the sampling policy when no separate
    old-log-prob pass was made).

    `ro` is the global batch (the same on every rank); under `dist` each rank computes its share
    of every minibatch with the minibatch's global weights and the gradients are summed over
    ranks, so the step is the one-process step. `engine`: how the policy is reached and its
    gradients reduced (`rl_shard`; None: replicated)."""
    engine = engine if engine is not None else Replicated(policy, policy, dist)
    n = len(ro)
    mb = max(1, min(cfg.train.batch_size, n))
    accum = max(1, cfg.train.grad_accum)
    old_pass = needs_old_logprobs(cfg)
    beta_loss = cfg.kl_coef if cfg.kl_in == "loss" else 0.0
    input_ids, attention_mask = ro.input_ids, ro.attention_mask
    params = [p for p in policy.parameters() if p.requires_grad]
    first_logp = torch.zeros_like(ro.response_mask)
    sums: dict[str, float] = {}
    count = 0
    autocast = autocast_for(cfg.train.precision, ro.response_mask.device)
    for epoch in range(cfg.updates_per_rollout):
        order = torch.randperm(n, generator=generator).to(ro.response_mask.device)
        for start in range(0, n, mb):
            # sorted, so a prompt's G rows share micro-batches (and their prompt forward)
            idx = order[start : start + mb].sort().values
            tokens = ro.response_mask[idx].sum().clamp(min=1)
            optimizer.zero_grad(set_to_none=True)
            stats = dict.fromkeys(("loss", "clipfrac", "approx_kl", "kl_k3", "entropy"), 0.0)
            micro_list = micro_batches(idx, accum, dist, engine.sharded)
            for i, (rows, keep) in enumerate(micro_list):
                mask = ro.response_mask[rows]
                r_ids = ro.response_ids[rows]
                with autocast:
                    logp, ent_tok = engine(
                        response_token_stats, input_ids[rows], attention_mask[rows], r_ids, cfg.rollout.temperature,
                        cfg.train.logprob_chunk, share_prompt_prefix=cfg.share_prompt_prefix, entropy=True)  # (b, T)
                old = ro.logprobs[rows] if old_pass else logp.detach()
                ref = ro.ref_logprobs[rows] if ro.ref_logprobs is not None else None
                loss, st = grpo_loss(logp, old, ref, advantages[rows], mask, cfg.clip_eps, beta_loss, cfg.loss_agg, cfg.clip_eps_high)
                w = keep * (float(mask.sum() / tokens) if cfg.loss_agg == "token-mean" else len(rows) / len(idx))
                engine.backward(w * loss, last=i == len(micro_list) - 1)
                if epoch == 0 and keep:
                    first_logp[rows] = logp.detach() * mask
                ent = masked_mean(ent_tok, mask)
                tw = keep * float(mask.sum() / tokens)
                part = {"loss": w * loss.item(), "clipfrac": tw * float(st.clipfrac), "approx_kl": tw * float(st.approx_kl),
                        "kl_k3": tw * float(st.kl), "entropy": tw * float(ent)}
                for k, v in part.items():
                    stats[k] += v
            norm = engine.step([(params, optimizer)], cfg.train.max_grad_norm)
            stats = all_reduce_sums(stats, dist)
            if norm is not None:
                stats["grad_norm"] = norm
            scheduler.step()
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + v
            count += 1
    return {k: v / max(count, 1) for k, v in sums.items()}, all_reduce_tensor(first_logp, dist)


def _metrics_row(it: int, ro: Rollout, logp: torch.Tensor, stats: dict[str, float], cfg: Config, lr: float,
                 rollout_s: float, iteration_s: float) -> dict[str, Any]:
    """One iteration's metrics line (docs/grpo.md): rollout and group statistics of the global batch
    and the update's means. logp: (B, T) the sampling policy's log-probs of the responses."""
    kl_seq = ((logp - ro.ref_logprobs) * ro.response_mask).sum(-1)  # (B,) k1 KL per response
    groups = ro.scores.view(-1, cfg.group_size)
    return {
        "step": it,
        "reward": float(ro.scores.mean()),
        "reward_raw": float(ro.raw_scores.mean()),
        "reward_std_in_group": float(groups.std(dim=1).mean()),
        "zero_std_groups": float((groups.std(dim=1) == 0).float().mean()),
        "kl": float(kl_seq.mean()),
        **{k: stats[k] for k in ("kl_k3", "loss", "entropy", "clipfrac", "approx_kl")},
        "response_length": float(ro.response_length.mean()),
        "truncated_fraction": float((~ro.finished).float().mean()),
        "beta": cfg.kl_coef,
        "grad_norm": stats.get("grad_norm", float("nan")),
        "lr": lr,
        "rollout_s": rollout_s,
        "iteration_s": iteration_s,
    }


def _check(cfg: Config) -> None:
    if not cfg.model.path:
        raise ConfigError("config key 'model.path' is required (the SFT policy directory)")
    if not cfg.data.path and not cfg.world:
        raise ConfigError("set data.path (a prompt file) or world (uses WORLD/train_prompts.jsonl)")
    if cfg.group_size < 2:
        raise ConfigError(f"config key 'group_size' must be >= 2 for a group baseline, got {cfg.group_size}")
    if cfg.iterations <= 0 or cfg.prompts_per_step <= 0 or cfg.updates_per_rollout <= 0:
        raise ConfigError("iterations, prompts_per_step and updates_per_rollout must be positive")
    if cfg.advantage not in ADVANTAGES:
        raise ConfigError(f"config key 'advantage': unknown {cfg.advantage!r} (valid: {', '.join(ADVANTAGES)})")
    check_rl_strategy(cfg.train.strategy, "rloo" if cfg.advantage == "rloo" else "grpo", cfg.model.lora_r > 0)


def run(cfg: Config) -> dict:
    """Train, here (one process or a torchrun rank) or, with launcher=ray, on Ray actors."""
    return run_here_or_on_ray(train, cfg)


def train(cfg: Config, reward: RewardSource | None = None, reference: Any = None) -> dict:
    """This process's part of the run. reward: a source built elsewhere (Ray's reward actor);
    None builds cfg.reward here. reference: the KL reference built elsewhere (Ray's reference
    actor, ray_launch.RemoteReference); None builds it here (rollout.build_reference)."""
    from alignkit.memory import PeakMemory
    from alignkit.train.distributed import barrier, gather_rollout, row_seeds, shard
    from alignkit.train.loop import build_optimizer, build_scheduler
    from alignkit.train.rl_run import eval_due, finish_run, gold_eval, load_policy_and_prompts, start_run
    from alignkit.train.rollout import (
        baseline_prompt_ids,
        build_reference,
        build_reward_source,
        collect_rollout,
        gold_fn,
        load_iteration,
        open_reports,
        prompt_batches,
        save_due,
        save_iteration,
    )

    _check(cfg)
    run = start_run(cfg, "prompts_per_step", cfg.prompts_per_step)
    dist, out, metrics_path, resume_from, device, world = (run.dist, run.out, run.metrics_path, run.resume_from,
                                                           run.device, run.world)
    advantage_fn = ADVANTAGES[cfg.advantage]

    with PeakMemory() as mem:
        tokenizer, prompt_ids, prompt_texts, policy = load_policy_and_prompts(cfg, device)
        engine = rl_engine(cfg.train, dist, policy, policy, device)  # before the optimizer: sharding swaps parameters
        # loaded once the policy is sharded (a smaller peak) and, under fsdp2, sharded itself
        reference = reference or build_reference(policy, cfg.model.path, cfg.model.lora_r > 0, device)
        reference = shard_reference(reference, engine, dist, device)
        reward = reward if reward is not None else build_reward_source(cfg.reward, world, device)
        gold = gold_fn(world) if world is not None else None

        batch = cfg.prompts_per_step * cfg.group_size
        steps_per_it = cfg.updates_per_rollout * -(-batch // max(1, min(cfg.train.batch_size, batch)))
        params = [p for p in policy.parameters() if p.requires_grad]
        total_steps = cfg.iterations * steps_per_it
        optimizer = build_optimizer(params, cfg.train)
        engine.attach([(policy, optimizer)])
        scheduler = build_scheduler(optimizer, cfg.train, total_steps)
        gen = torch.Generator().manual_seed(cfg.train.seed)
        batches = prompt_batches(len(prompt_ids), cfg.prompts_per_step, cfg.train.seed)
        temperature, share = cfg.rollout.temperature, cfg.share_prompt_prefix
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        chunk = cfg.train.logprob_chunk
        old_fn = None
        if needs_old_logprobs(cfg):
            def old_fn(ids, mask, r_ids):
                return engine(response_token_stats, ids, mask, r_ids, temperature, chunk, share_prompt_prefix=share)[0], None

        def ref_fn(ids, mask, r_ids):
            return reference.logprobs(ids, mask, r_ids, temperature, chunk, share_prompt_prefix=share)

        base_ids = baseline_prompt_ids(tokenizer, prompt_texts, cfg.reward.ref_logprob_baseline)
        done, evals, ref_cache = 0, [], {}  # ref_cache: the reference's greedy eval responses
        if resume_from is not None:
            state = load_iteration(
                resume_from, policy, [optimizer], [scheduler], gen, cfg.train, total_steps, metrics_path, batches,
                main=dist.main, engine=engine,
            )
            done, evals = state["step"], state["evals"]
        last: dict[str, Any] = (read_jsonl(metrics_path, missing_ok=True) or [{}])[-1]
        log, bar = open_reports(type(cfg).__module__.rsplit(".", 1)[-1], cfg, out, len(prompt_ids), f"{cfg.prompts_per_step} prompts x {cfg.group_size} samples per iteration", done, dist, device)
        for it in range(done + 1, cfg.iterations + 1):
            t_it = time.perf_counter()
            idx, first = shard(next(batches), dist)  # this rank's prompts; their groups stay here
            G = cfg.group_size
            with engine.gathered() as sampler:
                ro = collect_rollout(
                    sampler, tokenizer, [prompt_ids[i] for i in idx], [prompt_texts[i] for i in idx], reward,
                    cfg.rollout, logprob_fn=old_fn, ref_logprob_fn=ref_fn, group_size=G,
                    baseline_ids=None if base_ids is None else [base_ids[i] for i in idx],
                    missing_eos_penalty=cfg.reward.missing_eos_penalty,
                    row_seeds=row_seeds(cfg.train.seed, it, first * G, len(idx) * G),
                    autocast=autocast_for(cfg.train.precision, device),
                )
            ro = gather_rollout(ro, dist, pad_id)  # the global batch, on every rank
            t_roll = time.perf_counter() - t_it
            seq_reward = sequence_rewards(ro, cfg)
            adv = advantage_fn(seq_reward, cfg.group_size)  # (B,)
            stats, first_logp = grpo_update(policy, ro, adv, cfg, optimizer, scheduler, gen, dist, engine)
            logp = ro.logprobs if old_fn is not None else first_logp
            row = _metrics_row(it, ro, logp, stats, cfg, scheduler.get_last_lr()[0], t_roll, time.perf_counter() - t_it)
            row.update(reference_feature_metrics(ro, cfg.reward))
            if gold is not None and dist.main:
                row["gold"] = sum(gold(ro.prompts, ro.responses)) / len(ro)
            if eval_due(cfg, run, it) and (ev := gold_eval(engine, reference, tokenizer, run, cfg, ref_cache)):
                row["gold_eval"], row["win_rate"] = ev["gold"], ev["win_rate"]
                evals.append({"step": it, **{k: ev[k] for k in ("gold", "gold_ref", "win_rate")}})
            log.write(row)
            bar.update(1, reward=row["reward"], kl=row["kl"], s_per_it=f"{row['iteration_s']:.1f}")
            last = row
            if save_due(it, cfg.iterations, cfg.train):
                save_iteration(out, it, policy, {id(p) for p in params}, [optimizer], [scheduler], gen, {
                    "prompt_batches": it, "evals": evals, "config": to_dict(cfg),
                }, cfg.train.keep_checkpoints, dist=dist, engine=engine)
        bar.close()
        log.close()

        result: dict[str, Any] = {"model": str(out / "final"), "iterations": cfg.iterations, "advantage": cfg.advantage,
                                  "reward_source": cfg.reward.source}
        result.update(finish_run(engine, reference, tokenizer, run, cfg, evals, ref_cache))
    barrier(dist)  # the other ranks wait for rank 0's final model and evaluation
    result.update(
        reward=last.get("reward"), kl=last.get("kl"), gold_train=last.get("gold"),
        wall_s=time.perf_counter() - run.t0, peak_mem_mb=mem.peak_mb, lora=cfg.model.lora_r > 0,
        metrics=str(metrics_path),
    )
    return result
