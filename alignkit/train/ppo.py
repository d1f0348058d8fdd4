"""Stage 3a, RLHF with PPO (InstructGPT-style): maximise a reward model's score minus a
per-token KL penalty to the frozen SFT reference.

    alignkit ppo --config configs/ppo.yaml model.path=runs/sft/final reward.model=runs/reward/final \
        world=runs/world out=runs/ppo

One iteration (docs/ppo.md has the details and the metrics):
  1. rollout: sample one response per prompt (KV cache), record old log-probs, reference
     log-probs and values, score with the reward source (rollout.py);
  2. rewards: -beta * kl_t per token, plus the score on the last token (Ziegler et al. 2019);
  3. GAE advantages and returns, advantages whitened over the batch;
  4. `ppo_epochs` passes over shuffled minibatches of the rollout: clipped surrogate + clipped
     value loss (Schulman et al. 2017), optional early stop when approx_kl passes a threshold;
  5. the KL controller (fixed or adaptive) sets beta for the next rollout.

Metrics go to OUT/metrics.jsonl, one line per rollout batch; the policy to OUT/final;
checkpoints for an exact `train.resume=true` to OUT/checkpoints (docs/ppo.md).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from alignkit.atomic import read_jsonl
from alignkit.config import ConfigError, DataConfig, ModelConfig, TrainConfig, to_dict
from alignkit.eval.monitor import Monitor, MonitorConfig, observe_rollout, reference_surprise
from alignkit.losses.advantages import explained_variance, gae, masked_mean, masked_whiten
from alignkit.losses.kl import AdaptiveKLController, FixedKLController, kl_penalized_rewards
from alignkit.losses.policy import entropy_from_logits, ppo_policy_loss, ppo_value_loss
from alignkit.models.chunked import DEFAULT_CHUNK, response_stats
from alignkit.train import checkpoint as ckpt
from alignkit.train.distributed import (
    SINGLE,
    Dist,
    all_reduce_sums,
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
    gather_logprobs,
    reference_feature_metrics,
    reference_features,
    response_logits,
)


@dataclass(frozen=True)
class Config:
    """PPO-RLHF settings. `train.batch_size` is the minibatch (responses per optimizer step)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """`model.path`: the SFT policy (required); lora_r > 0 trains LoRA and the reference is the adapter-free model."""
    data: DataConfig = field(default_factory=lambda: DataConfig(max_prompt_len=128))
    """`data.path`: prompts (any prompt format); default WORLD/train_prompts.jsonl."""
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=1e-5, batch_size=16, schedule="constant"))
    """Optimizer settings: lr, betas, weight_decay, schedule, warmup_steps, batch_size (minibatch), grad_accum, max_grad_norm, precision, seed; checkpoints: save_every (iterations), keep_checkpoints, resume, overwrite."""
    reward: RewardConfig = field(default_factory=RewardConfig)
    """Reward source: a reward model (normalised with its stats), the gold judge, or module:function."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """Sampling settings."""
    world: str | None = None
    """World directory: enables gold-score metrics and the final win rate against the reference."""
    out: str = "runs/ppo"
    """Output directory: metrics.jsonl, eval.json, checkpoints/ (resume), final/ (the policy)."""
    reference: str | None = None
    """KL reference model directory (None: model.path, the model PPO starts from; must be None with LoRA)."""
    iterations: int = 40
    """Rollout batches (each followed by ppo_epochs of updates)."""
    rollout_batch: int = 64
    """Prompts (= responses) per rollout batch."""
    ppo_epochs: int = 4
    """Passes over each rollout batch."""
    clip_eps: float = 0.2
    """Policy ratio clip range."""
    clip_eps_value: float | None = 0.2
    """Value clip range in return units (None: unclipped value loss)."""
    vf_coef: float = 0.5
    """Weight of the value loss."""
    ent_coef: float = 0.0
    """Weight of the entropy bonus."""
    gamma: float = 1.0
    """GAE discount."""
    lam: float = 0.95
    """GAE lambda."""
    whiten_advantages: bool = True
    """Normalise advantages to mean 0, std 1 over the rollout's tokens."""
    kl_coef: float = 0.05
    """KL penalty coefficient beta (the initial one when kl_target is set)."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    """Per-token KL estimator in the reward (k1: log pi - log pi_ref, as InstructGPT)."""
    kl_target: float | None = None
    """Adaptive KL (Ziegler et al. 2019): steer beta toward this KL per response, in nats (None: fixed beta)."""
    kl_horizon: float = 10000.0
    """Adaptive KL horizon (responses)."""
    stop_approx_kl: float = 0.0
    """Stop a rollout's remaining updates once a minibatch's approx_kl exceeds this (0: never)."""
    value_model: Literal["separate", "shared"] = "separate"
    """'separate': own backbone (from value_init); 'shared': a value head on the policy's backbone."""
    value_init: str | None = None
    """Backbone of a separate value model: default reward.model when the source is a reward model, else model.path."""
    value_lr: float | None = None
    """Learning rate of the value parameters (None: train.lr)."""
    loss_agg: Literal["token-mean", "seq-mean-token-mean"] = "token-mean"
    """How per-token policy losses are averaged (policy.LOSS_AGGREGATIONS)."""
    eval_every: int = 0
    """Also measure greedy gold score and win rate on held-out prompts every N iterations (0: only at the end)."""
    eval_limit: int = 0
    """Held-out prompts used for the gold evaluation (0: all)."""
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    """Reward-hacking monitors and their alarm rule (`monitor.stop=true` stops at the first alarm
    and keeps the last checkpoint saved before it)."""
    launcher: Literal["torchrun", "ray"] = "torchrun"
    """'torchrun': this process is the run (or one of torchrun's ranks); 'ray': place ray.workers ranks as Ray actors."""
    ray: RayConfig = field(default_factory=RayConfig)
    """Ray placement (launcher=ray only): trainer ranks and their resources, the cluster, a reward actor."""


JUDGE_SEED = 7919
"""Offset of the sampling seeds of the monitor's fresh pairs from train.seed (other draws than the rollout's)."""


class ValueHead(nn.Module):
    """A scalar per position on a hidden state (B, T, H) -> (B, T); starts at exactly 0.

    Zero initial values equal the mean of normalised scores, so the critic's first targets are
    not dominated by an arbitrary offset.
    """

    def __init__(self, hidden_size: int):
        super().__init__()
        self.proj = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.proj(hidden.to(self.proj.weight.dtype)).squeeze(-1)


def policy_token_stats(
    policy: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_ids: torch.Tensor,
    temperature: float, chunk: int, entropy: bool, entropy_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, T) log-probs and entropies (None unless `entropy`) of the response tokens under `policy`:
    chunked where the head splits off, else from the full (B, T, V) logits."""
    got = response_stats(policy, input_ids, attention_mask, response_ids, temperature=temperature,
                         chunk=chunk, entropy=entropy, entropy_grad=entropy_grad)
    if got is not None:
        return got.logprobs, got.entropy
    logits = response_logits(policy, input_ids, attention_mask, response_ids.shape[1], temperature)
    ent = entropy_from_logits(logits if entropy_grad else logits.detach()) if entropy else None
    return gather_logprobs(logits, response_ids), ent


def critic_values(value_model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, T: int) -> torch.Tensor:
    """(B, T) values of a separate value model at the positions that predict the T response tokens."""
    return value_model(input_ids, attention_mask, per_token=True)[:, -(T + 1) : -1]


class ActorCritic(nn.Module):
    """The policy and its critic, evaluated together on [prompt; response] rows.

    value_model: a `RewardModel` used per token (its own backbone), or None for a value head on
    the policy's last hidden state (`head`, shared backbone: the value loss also trains it).
    """

    def __init__(self, policy: nn.Module, value_model: nn.Module | None, head: ValueHead | None, temperature: float = 1.0):
        super().__init__()
        if (value_model is None) == (head is None):
            raise ValueError("give exactly one of value_model (separate) and head (shared)")
        self.policy = policy
        self.value_model = value_model
        self.head = head
        self.temperature = temperature

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L), (B, L), (B, T) -> logits (B, T, V) over response positions, values (B, T)."""
        T = response_ids.shape[1]
        if self.head is not None:
            from alignkit.models.logprobs import position_ids_from_mask

            out = self.policy(
                input_ids=input_ids, attention_mask=attention_mask,
                position_ids=position_ids_from_mask(attention_mask), use_cache=False,
                logits_to_keep=T + 1, output_hidden_states=True,
            )
            logits = out.logits[:, -(T + 1) : -1]  # (B, T, V)
            if self.temperature != 1.0:
                logits = logits / self.temperature
            values = self.head(out.hidden_states[-1][:, -(T + 1) : -1])  # (B, T)
            return logits, values
        logits = response_logits(self.policy, input_ids, attention_mask, T, self.temperature)
        return logits, critic_values(self.value_model, input_ids, attention_mask, T)

    def route(self, part: nn.Module, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """`fn(part, ...)`: one pass of a part (the policy, the separate value model). Under
        train.strategy=deepspeed each part has an engine of its own and this is replaced by one that
        goes through it (rl_shard.ZeRO)."""
        return fn(part, *args, **kwargs)

    def token_stats(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_ids: torch.Tensor,
        chunk: int = DEFAULT_CHUNK, entropy: bool = True, entropy_grad: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(B, T) log-probs, values and entropies of the response tokens (entropies None unless
        `entropy`; with a gradient only with `entropy_grad`). With `chunk` > 0 and a policy whose head splits off
        the (B, T, V) logits are never built (`alignkit.models.chunked.response_stats`; the
        shared value head reads the same final hidden states); otherwise from the full logits."""
        if self.head is None:
            logp, ent = self.route(self.policy, policy_token_stats, input_ids, attention_mask, response_ids,
                                   self.temperature, chunk, entropy, entropy_grad)
            values = self.route(self.value_model, critic_values, input_ids, attention_mask, response_ids.shape[1])
            return logp, values, ent
        got = response_stats(self.policy, input_ids, attention_mask, response_ids, temperature=self.temperature,
                             chunk=chunk, entropy=entropy, entropy_grad=entropy_grad)
        if got is None:
            logits, values = self(input_ids, attention_mask, response_ids)
            ent = entropy_from_logits(logits if entropy_grad else logits.detach()) if entropy else None
            return gather_logprobs(logits, response_ids), values, ent
        return got.logprobs, self.head(got.hidden), got.entropy

    def value_parameters(self) -> list[nn.Parameter]:
        owner = self.head if self.head is not None else self.value_model
        return [p for p in owner.parameters() if p.requires_grad]

    def policy_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.policy.parameters() if p.requires_grad]


@dataclass
class Batch:
    """A rollout with its advantages: what one PPO update reads. All (B, T) unless noted."""

    input_ids: torch.Tensor
    """(B, L)"""
    attention_mask: torch.Tensor
    """(B, L)"""
    response_ids: torch.Tensor
    mask: torch.Tensor
    old_logprobs: torch.Tensor
    old_values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor

    def rows(self, idx: torch.Tensor) -> Batch:
        return Batch(**{f.name: getattr(self, f.name)[idx] for f in dataclasses.fields(self)})


def make_batch(ro: Rollout, beta: float, cfg: Config) -> tuple[Batch, torch.Tensor, torch.Tensor]:
    """KL-penalised rewards -> GAE -> (whitened) advantages. Returns the batch, per-token
    rewards (B, T) and per-token kl (B, T)."""
    mask = ro.response_mask
    scores = ro.scores + reference_features(ro, cfg.reward)
    rewards, kl = kl_penalized_rewards(scores, ro.logprobs, ro.ref_logprobs, mask, beta, cfg.kl_estimator)
    adv, returns = gae(rewards, ro.values, mask, cfg.gamma, cfg.lam)
    if cfg.whiten_advantages:
        adv = masked_whiten(adv, mask)
    batch = Batch(ro.input_ids, ro.attention_mask, ro.response_ids, mask, ro.logprobs, ro.values, adv, returns)
    return batch, rewards, kl


def ppo_update(
    ac: ActorCritic,
    batch: Batch,
    cfg: Config,
    optimizers: list[torch.optim.Optimizer],
    schedulers: list[Any],
    generator: torch.Generator,
    dist: Dist = SINGLE,
    engine: Replicated | None = None,
) -> dict[str, float]:
    """`cfg.ppo_epochs` passes of shuffled minibatches (train.batch_size rows, split into
    train.grad_accum micro-batches whose losses are weighted to give the exact minibatch mean).
    Returns the means of the per-minibatch statistics.

    `batch` is the global batch (the same on every rank); under `dist` each rank computes its share
    of every minibatch with the minibatch's global weights and the gradients are summed over
    ranks, so every step is the one-process step. `engine`: how the model is reached and its
    gradients reduced (`rl_shard`; None: `ac` replicated)."""
    engine = engine if engine is not None else Replicated(ac, ac.policy, dist)
    n = batch.mask.shape[0]
    mb = max(1, min(cfg.train.batch_size, n))
    accum = max(1, cfg.train.grad_accum)
    policy_params, value_params = ac.policy_parameters(), ac.value_parameters()
    sums: dict[str, float] = {}
    count, stopped = 0, False
    autocast = autocast_for(cfg.train.precision, batch.mask.device)
    for _ in range(cfg.ppo_epochs):
        order = torch.randperm(n, generator=generator).to(batch.mask.device)
        for start in range(0, n, mb):
            idx = order[start : start + mb]
            sub = batch.rows(idx)
            tokens = sub.mask.sum().clamp(min=1)
            for o in optimizers:
                o.zero_grad(set_to_none=True)
            stats = dict.fromkeys(("policy_loss", "value_loss", "entropy", "clipfrac", "approx_kl", "ratio_mean", "vf_clipfrac"), 0.0)
            micro_list = micro_batches(torch.arange(len(idx), device=idx.device), accum, dist, engine.sharded)
            for i, (chunk, keep) in enumerate(micro_list):
                micro = sub.rows(chunk)
                token_w = keep * float(micro.mask.sum() / tokens)
                row_w = keep * len(chunk) / len(idx)
                with autocast:
                    logp, values, ent_tok = engine(ActorCritic.token_stats, micro.input_ids, micro.attention_mask,
                                                   micro.response_ids, cfg.train.logprob_chunk,
                                                   entropy_grad=cfg.ent_coef != 0)
                pl, pst = ppo_policy_loss(logp, micro.old_logprobs, micro.advantages, micro.mask, cfg.clip_eps, loss_agg=cfg.loss_agg)
                vl, vclip = ppo_value_loss(values.float(), micro.old_values, micro.returns, micro.mask, cfg.clip_eps_value)
                ent = masked_mean(ent_tok, micro.mask)
                policy_w = token_w if cfg.loss_agg == "token-mean" else row_w
                # the policy's and the critic's parts (one engine each under DeepSpeed; summed elsewhere)
                losses = (policy_w * pl - token_w * cfg.ent_coef * ent, token_w * cfg.vf_coef * vl)
                engine.backward(losses, last=i == len(micro_list) - 1)
                part = {
                    "policy_loss": policy_w * pl.item(), "value_loss": token_w * vl.item(),
                    "entropy": token_w * ent.item(), "clipfrac": token_w * float(pst.clipfrac),
                    "approx_kl": token_w * float(pst.approx_kl), "ratio_mean": token_w * float(pst.ratio_mean),
                    "vf_clipfrac": token_w * float(vclip),
                }
                for k, v in part.items():
                    stats[k] += v
            norm = engine.step([(policy_params, optimizers[0]), (value_params, optimizers[1])], cfg.train.max_grad_norm)
            stats = all_reduce_sums(stats, dist)
            if norm is not None:
                stats["grad_norm"] = norm
            for s in schedulers:
                s.step()
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + v
            count += 1
            if cfg.stop_approx_kl > 0 and stats["approx_kl"] > cfg.stop_approx_kl:
                stopped = True
                break
        if stopped:
            break
    out = {k: v / max(count, 1) for k, v in sums.items()}
    out["updates"] = float(count)
    out["early_stopped"] = float(stopped)
    return out


def _check(cfg: Config) -> None:
    if not cfg.model.path:
        raise ConfigError("config key 'model.path' is required (the SFT policy directory)")
    if not cfg.data.path and not cfg.world:
        raise ConfigError("set data.path (a prompt file) or world (uses WORLD/train_prompts.jsonl)")
    if cfg.iterations <= 0 or cfg.rollout_batch <= 0 or cfg.ppo_epochs <= 0:
        raise ConfigError("iterations, rollout_batch and ppo_epochs must be positive")
    if cfg.reference and cfg.model.lora_r > 0:
        raise ConfigError("config key 'reference' must be unset with model.lora_r > 0 (the reference is the adapter-free policy)")
    check_rl_strategy(cfg.train.strategy, "ppo", cfg.model.lora_r > 0, shared_critic=cfg.value_model == "shared")


def build_value_model(cfg: Config, policy: nn.Module, device: torch.device) -> tuple[nn.Module | None, ValueHead | None]:
    """The critic: a RewardModel on its own backbone (separate) or a head on the policy (shared)."""
    from alignkit.models.heads import RewardModel

    if cfg.value_model == "shared":
        core = policy.get_base_model() if hasattr(policy, "get_base_model") else policy
        text = core.config.get_text_config() if hasattr(core.config, "get_text_config") else core.config
        return None, ValueHead(int(text.hidden_size)).to(device)
    init = cfg.value_init or (cfg.reward.model if cfg.reward.source == "model" else cfg.model.path)
    if not init:
        raise ConfigError("value_model=separate needs value_init, reward.model or model.path")
    vm = RewardModel.from_pretrained(init, mode="full")
    if vm.head is None:
        raise ConfigError(f"value_init {init!r}: a value model needs a decoder backbone (pooling 'last')")
    nn.init.zeros_(vm.head.weight)  # see ValueHead: start at V = 0
    if vm.head.bias is not None:
        nn.init.zeros_(vm.head.bias)
    return vm.to(device), None


def _metrics_row(it: int, ro: Rollout, batch: Batch, rewards: torch.Tensor, kl: torch.Tensor, beta: float,
                 stats: dict[str, float], lr: float, rollout_s: float, iteration_s: float) -> dict[str, Any]:
    """One iteration's metrics line (docs/ppo.md): rollout statistics of the global batch and the
    update's means. rewards, kl: the (B, T) per-token rewards and KL of `make_batch`."""
    kl_seq = ((ro.logprobs - ro.ref_logprobs) * ro.response_mask).sum(-1)  # (B,) k1 KL per response
    return {
        "step": it,
        "reward": float(ro.scores.mean()),
        "reward_raw": float(ro.raw_scores.mean()),
        "kl": float(kl_seq.mean()),
        "kl_penalty": float((beta * kl.sum(-1)).mean()),
        "total_reward": float(rewards.sum(-1).mean()),
        **{k: stats[k] for k in ("entropy", "clipfrac", "approx_kl", "ratio_mean", "policy_loss", "value_loss",
                                 "vf_clipfrac")},
        "explained_variance": float(explained_variance(ro.values, batch.returns, ro.response_mask)),
        "response_length": float(ro.response_length.mean()),
        "truncated_fraction": float((~ro.finished).float().mean()),
        "beta": beta,
        "grad_norm": stats.get("grad_norm", float("nan")),
        "updates": stats["updates"],
        "lr": lr,
        "rollout_s": rollout_s,
        "iteration_s": iteration_s,
    }


def _judge_agreement(engine: Replicated, tokenizer: Any, prompt_ids: list, prompt_texts: list, reward: RewardSource,
                     judge: RewardSource | None, cfg: Config, iteration: int) -> dict[str, float]:
    """The monitor's reward-vs-judge agreement on fresh pairs of the current policy (collective:
    a sharded policy is gathered on every rank); {} when there is nothing to compare."""
    from alignkit.train.distributed import row_seeds
    from alignkit.train.rollout import fresh_pair_agreement

    with engine.gathered() as sampler:
        agreement = fresh_pair_agreement(
            sampler, tokenizer, prompt_ids, prompt_texts, reward, judge, cfg.rollout,
            row_seeds(cfg.train.seed + JUDGE_SEED, iteration, 0, 2 * len(prompt_ids)), cfg.reward.missing_eos_penalty)
    if agreement is None:
        return {}
    return {"monitor/judge_agreement": agreement[0], "monitor/judge_pairs": float(agreement[1])}


def _optimizers(cfg: Config, ac: ActorCritic, engine: Replicated, modules: tuple[nn.Module, nn.Module],
                total_steps: int) -> tuple[list, list]:
    """([policy's, value's] AdamW, their schedulers), attached to the engine with their `modules`
    (the policy; the value model or the shared head); the value side takes `value_lr` when given."""
    from alignkit.train.loop import build_optimizer, build_scheduler

    opt_p = build_optimizer(ac.policy_parameters(), cfg.train)
    vtrain = dataclasses.replace(cfg.train, lr=cfg.value_lr if cfg.value_lr is not None else cfg.train.lr)
    opt_v = build_optimizer(ac.value_parameters(), vtrain)
    engine.attach([(modules[0], opt_p), (modules[1], opt_v)])
    return [opt_p, opt_v], [build_scheduler(opt_p, cfg.train, total_steps), build_scheduler(opt_v, vtrain, total_steps)]


def _observe(mon: Monitor, it: int, row: dict, ro: Rollout, reward: RewardSource, judge: RewardSource | None,
             engine: Replicated, tokenizer: Any, picked: tuple[list, list], cfg: Config) -> list[str]:
    """The monitor's statistics of iteration `it` into `row` (judge agreement on fresh pairs of the
    `picked` (ids, texts) prompts, the reference's surprise, the held-out judge's scores), then its
    alarm rules; returns the rules that fired."""
    from alignkit.train.rollout import judge_scores

    members = getattr(reward, "last_member_scores", None)  # before the fresh pairs reset it
    if cfg.monitor.judge_pairs > 0 and (judge is not None or cfg.reward.ensemble):
        row.update(_judge_agreement(engine, tokenizer, *picked, reward, judge, cfg, it))
    if ro.ref_logprobs is not None:
        row.update(reference_surprise(ro.ref_logprobs, ro.response_mask))
    if judge is not None:  # the held-out judge's view of this rollout
        row.update(judge_scores(judge, ro, cfg.reward.missing_eos_penalty))
    return observe_rollout(mon, it, row, ro.scores, ro.response_ids, ro.response_mask, ro.responses, members)


def _stop_at_alarm(out: Path, it: int, fired: list[str], ac: ActorCritic, optimizers: list, engine: Replicated) -> dict:
    """monitor.stop: the policy goes back to the last checkpoint before the alarm (when there is one)."""
    from alignkit.train.rollout import restore_weights

    stopped: dict[str, Any] = {"iteration": it, "rules": fired, "restored": None}
    before = ckpt.latest(out / ckpt.CHECKPOINTS)
    if before is not None:
        restore_weights(before, ac, optimizers, engine)
        stopped["restored"] = str(before)
    return stopped


def run(cfg: Config) -> dict:
    """Train, here (one process or a torchrun rank) or, with launcher=ray, on Ray actors."""
    return run_here_or_on_ray(train, cfg)


def train(cfg: Config, reward: RewardSource | None = None, reference: Any = None) -> dict:
    """This process's part of the run. reward: a source built elsewhere (Ray's reward actor);
    None builds cfg.reward here. reference: the KL reference built elsewhere (Ray's reference
    actor, ray_launch.RemoteReference); None builds it here (rollout.build_reference)."""
    from alignkit.memory import PeakMemory
    from alignkit.train.distributed import barrier, gather_rollout, row_seeds, shard
    from alignkit.train.rl_run import eval_due, finish_run, gold_eval, load_policy_and_prompts, start_run
    from alignkit.train.rollout import (
        baseline_prompt_ids,
        build_monitor_judge,
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
    run = start_run(cfg, "rollout_batch", cfg.rollout_batch)
    dist, out, metrics_path, resume_from, device, world = (run.dist, run.out, run.metrics_path, run.resume_from,
                                                           run.device, run.world)
    with PeakMemory() as mem:
        tokenizer, prompt_ids, prompt_texts, policy = load_policy_and_prompts(cfg, device)
        value_model, head = build_value_model(cfg, policy, device)
        ac = ActorCritic(policy, value_model, head, cfg.rollout.temperature)
        ac.eval()
        engine = rl_engine(cfg.train, dist, ac, policy, device)  # before the optimizers: sharding swaps parameters
        # loaded once the policy is sharded (a smaller peak) and, under fsdp2, sharded itself
        reference = reference or build_reference(policy, cfg.reference or cfg.model.path, cfg.model.lora_r > 0, device)
        reference = shard_reference(reference, engine, dist, device)
        reward = reward if reward is not None else build_reward_source(cfg.reward, world, device)
        gold = gold_fn(world) if world is not None else None
        judge = build_monitor_judge(cfg.monitor.judge, world, device) if cfg.monitor.enabled else None

        n_mb = -(-cfg.rollout_batch // max(1, min(cfg.train.batch_size, cfg.rollout_batch)))
        total_steps = cfg.iterations * cfg.ppo_epochs * n_mb
        value_module = value_model if value_model is not None else head
        optimizers, schedulers = _optimizers(cfg, ac, engine, (policy, value_module), total_steps)
        controller = (
            AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
            if cfg.kl_target is not None else FixedKLController(cfg.kl_coef)
        )
        gen = torch.Generator().manual_seed(cfg.train.seed)
        batches = prompt_batches(len(prompt_ids), cfg.rollout_batch, cfg.train.seed)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

        chunk = cfg.train.logprob_chunk

        def logprob_fn(ids, mask, r_ids):
            logp, values, _ = engine(ActorCritic.token_stats, ids, mask, r_ids, chunk, entropy=False)
            return logp, values.float()

        def ref_fn(ids, mask, r_ids):
            return reference.logprobs(ids, mask, r_ids, cfg.rollout.temperature, chunk)

        trainable = {id(p) for p in ac.policy_parameters() + ac.value_parameters()}
        base_ids = baseline_prompt_ids(tokenizer, prompt_texts, cfg.reward.ref_logprob_baseline)
        done, evals, ref_cache = 0, [], {}  # ref_cache: the reference's greedy eval responses
        mon, stopped = (Monitor(cfg.monitor) if cfg.monitor.enabled else None), None
        if resume_from is not None:
            state = load_iteration(
                resume_from, ac, optimizers, schedulers, gen, cfg.train, total_steps, metrics_path, batches,
                main=dist.main, engine=engine,
            )
            done, evals = state["step"], state["evals"]
            controller.load_state_dict(state["kl_controller"])
        last: dict[str, Any] = (read_jsonl(metrics_path, missing_ok=True) or [{}])[-1]
        log, bar = open_reports("ppo", cfg, out, len(prompt_ids), f"{cfg.rollout_batch} responses x {cfg.ppo_epochs} epochs per iteration", done, dist, device)
        for it in range(done + 1, cfg.iterations + 1):
            t_it = time.perf_counter()
            global_idx = next(batches)
            idx, first = shard(global_idx, dist)  # this rank's prompts
            with engine.gathered() as sampler:
                ro = collect_rollout(
                    sampler, tokenizer, [prompt_ids[i] for i in idx], [prompt_texts[i] for i in idx], reward,
                    cfg.rollout, logprob_fn=logprob_fn, ref_logprob_fn=ref_fn,
                    baseline_ids=None if base_ids is None else [base_ids[i] for i in idx],
                    missing_eos_penalty=cfg.reward.missing_eos_penalty,
                    row_seeds=row_seeds(cfg.train.seed, it, first, len(idx)),
                    autocast=autocast_for(cfg.train.precision, device),
                )
            ro = gather_rollout(ro, dist, pad_id)  # the global batch, on every rank
            t_roll = time.perf_counter() - t_it
            beta = controller.beta
            batch, rewards, kl = make_batch(ro, beta, cfg)
            stats = ppo_update(ac, batch, cfg, optimizers, schedulers, gen, dist, engine)
            controller.update(float(kl.sum(-1).mean()), n_steps=len(ro))
            row = _metrics_row(it, ro, batch, rewards, kl, beta, stats, schedulers[0].get_last_lr()[0], t_roll,
                               time.perf_counter() - t_it)
            row.update(reference_feature_metrics(ro, cfg.reward))
            pick = global_idx[: cfg.monitor.judge_pairs]  # the same on every rank
            fired = [] if mon is None else _observe(
                mon, it, row, ro, reward, judge, engine, tokenizer,
                ([prompt_ids[i] for i in pick], [prompt_texts[i] for i in pick]), cfg)
            if gold is not None and dist.main:
                row["gold"] = sum(gold(ro.prompts, ro.responses)) / len(ro)
            if eval_due(cfg, run, it) and (ev := gold_eval(engine, reference, tokenizer, run, cfg, ref_cache)):
                row["gold_eval"], row["win_rate"] = ev["gold"], ev["win_rate"]
                evals.append({"step": it, **{k: ev[k] for k in ("gold", "gold_ref", "win_rate")}})
            log.write(row)
            bar.update(1, reward=row["reward"], kl=row["kl"], s_per_it=f"{row['iteration_s']:.1f}")
            last = row
            if fired and cfg.monitor.stop:
                stopped = _stop_at_alarm(out, it, fired, ac, optimizers, engine)
                break
            if save_due(it, cfg.iterations, cfg.train):
                save_iteration(out, it, ac, trainable, optimizers, schedulers, gen, {
                    "prompt_batches": it, "kl_controller": controller.state_dict(), "evals": evals,
                    "config": to_dict(cfg),
                }, cfg.train.keep_checkpoints, dist=dist, engine=engine)
        bar.close()
        log.close()

        result: dict[str, Any] = {"model": str(out / "final"), "iterations": cfg.iterations}
        result.update(finish_run(engine, reference, tokenizer, run, cfg, evals, ref_cache))
    barrier(dist)  # the other ranks wait for rank 0's final model and evaluation
    result.update(
        reward=last.get("reward"), kl=last.get("kl"), beta=controller.beta,
        gold_train=last.get("gold"), wall_s=time.perf_counter() - run.t0, peak_mem_mb=mem.peak_mb,
        value_model=cfg.value_model, lora=cfg.model.lora_r > 0, metrics=str(metrics_path),
    )
    if mon is not None:
        result["monitor"] = {"first_alarm": mon.first_alarm, "stopped": stopped}
    return result
