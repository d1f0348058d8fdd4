"""Data parallelism for the RL stages (PPO, GRPO, RLOO) under torchrun: N ranks, one global batch.

    torchrun --nproc_per_node 2 -m alignkit.cli grpo --config configs/grpo.yaml ...

The shape of one iteration on N ranks (docs/distributed-rl.md):
  1. every rank draws the same global prompt batch and keeps its contiguous share (`shard`);
     a GRPO/RLOO group is sampled on the rank that owns its prompt;
  2. each rank samples, scores and runs the old/reference/value passes for its rows only; row r
     of the global batch samples with its own seed (`row_seeds`), so which rank draws it does not
     change its tokens;
  3. `gather_rollout` all-gathers the rows (re-padded to the global widths), so every rank holds
     the global batch in the order one process would have: advantages, whitening, the KL
     controller and every metric are computed over the global batch, identically on all ranks;
  4. each minibatch of the (shared) shuffled order is split evenly across ranks (`my_rows`);
     gradients are summed over ranks (`all_reduce_grads`, one flat all-reduce per optimizer step),
     so the optimizer step equals the one-process step on the whole minibatch.

`Dist()` with no process group (a plain `python` run) is one rank and every call is a no-op.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
import torch.distributed as tdist


@dataclass(frozen=True)
class Dist:
    """This process's place in the data-parallel group."""

    rank: int = 0
    """Global rank (0 writes metrics, checkpoints and the final model)."""
    world: int = 1
    """Number of ranks."""
    local_rank: int = 0
    """Rank on this machine (picks the GPU)."""

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


SINGLE = Dist()
"""One process, no group."""


def init_dist() -> Dist:
    """Join the torchrun process group (NCCL on GPU, gloo on CPU) when WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if not tdist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(local)
        tdist.init_process_group("nccl" if cuda else "gloo")
    return Dist(tdist.get_rank(), tdist.get_world_size(), local)


def check_rl_strategy(strategy: str, stage: str, lora: bool = False, shared_critic: bool = False) -> None:
    """The RL stages replicate the policy (ddp, the scheme above) or shard it (fsdp2, deepspeed):
    `alignkit.train.rl_shard`. Under DeepSpeed PPO's policy and critic are two engines, each
    clipping its own gradients as the one-process step does, so the critic must be a model of its
    own (a value head on the policy's backbone would need one engine clipping two groups apart). A
    LoRA policy's reference is the policy itself with the adapter off, which the sharded passes do
    not provide."""
    from alignkit.config import ConfigError

    if strategy == "deepspeed" and shared_critic:
        raise ConfigError(
            "config key 'train.strategy' is 'deepspeed' with value_model=shared: ppo on DeepSpeed needs "
            "value_model=separate (policy and critic are an engine each) or train.strategy=fsdp2 (docs/distributed-rl.md)")
    if strategy != "ddp" and lora:
        raise ConfigError(
            f"config key 'train.strategy' is {strategy!r} with a LoRA policy (model.lora_r > 0): {stage} shards full "
            "policies only; a LoRA policy's trainable part is small, run it with train.strategy=ddp")


def device_for(d: Dist) -> torch.device:
    return torch.device(f"cuda:{d.local_rank}") if torch.cuda.is_available() else torch.device("cpu")


def barrier(d: Dist) -> None:
    if d.active:
        tdist.barrier()


def shard(items: Sequence, d: Dist) -> tuple[list, int]:
    """This rank's contiguous share of `items` (whose length the caller made a multiple of the
    world size) and the global index of its first item."""
    n = len(items)
    if n % d.world:
        raise ValueError(f"{n} items do not split evenly over {d.world} ranks")
    k = n // d.world
    return list(items[d.rank * k : (d.rank + 1) * k]), d.rank * k


def share(n: int, d: Dist) -> tuple[int, int]:
    """This rank's contiguous share [start, stop) of n items; sizes differ by at most one (any n,
    a rank may get none). For work whose result is gathered back in order (sampling, labelling)."""
    return n * d.rank // d.world, n * (d.rank + 1) // d.world


def broadcast_object(obj, d: Dist):
    """Rank 0's `obj` (any picklable value) on every rank: one decision, whatever each rank saw."""
    if not d.active:
        return obj
    box = [obj if d.main else None]
    tdist.broadcast_object_list(box, src=0)
    return box[0]


def row_seeds(seed: int, iteration: int, first_row: int, rows: int) -> tuple[int, ...]:
    """One sampling seed per global row of an iteration's batch: rank-independent, so N ranks
    sample the tokens one process samples."""
    base = (seed * 100003 + iteration) * 1_000_003
    return tuple((base + first_row + r) % (2**63 - 1) for r in range(rows))


def all_gather_padded(x: torch.Tensor, d: Dist, pad: float | int = 0, left: bool = False) -> torch.Tensor:
    """Concatenate every rank's (b, ...) `x` along dim 0, in rank order; dim 1 (if any) is padded to
    the widest rank's width, on the left with `left` (prompts) else on the right (responses).

    Every rank must hold the same number of rows b.
    """
    if not d.active:
        return x
    if x.dim() >= 2:
        width = torch.tensor([x.shape[1]], device=x.device)
        tdist.all_reduce(width, op=tdist.ReduceOp.MAX)
        extra = int(width) - x.shape[1]
        if extra:
            filler = torch.full((x.shape[0], extra, *x.shape[2:]), pad, dtype=x.dtype, device=x.device)
            x = torch.cat([filler, x] if left else [x, filler], dim=1)
    parts = [torch.empty_like(x) for _ in range(d.world)]
    tdist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def all_gather_list(items: list, d: Dist) -> list:
    """Concatenate every rank's python list, in rank order."""
    if not d.active:
        return list(items)
    parts: list = [None] * d.world
    tdist.all_gather_object(parts, list(items))
    return [x for p in parts for x in p]


def gather_rollout(ro, d: Dist, pad_id: int):
    """The global Rollout from every rank's share (rank order = global row order), re-padded to
    the global prompt width P (left) and response width T (right), as one process would build it."""
    if not d.active:
        return ro
    left = {"prompt_ids", "prompt_mask"}
    out = {}
    for f in fields(ro):
        v = getattr(ro, f.name)
        if isinstance(v, torch.Tensor):
            out[f.name] = all_gather_padded(v, d, pad_id if f.name.endswith("_ids") else 0, left=f.name in left)
        elif isinstance(v, list):
            out[f.name] = all_gather_list(v, d)
        else:
            out[f.name] = v
    return type(ro)(**out)


def my_rows(idx: torch.Tensor, d: Dist) -> torch.Tensor:
    """This rank's contiguous share of a minibatch's row indices (possibly empty)."""
    return idx.tensor_split(d.world)[d.rank] if d.active else idx


def micro_batches(rows: torch.Tensor, accum: int, d: Dist, lockstep: bool = False) -> list[tuple[torch.Tensor, float]]:
    """This rank's share of a minibatch's `rows` (`my_rows`) in up to `accum` micro-batches, each
    with weight 1. `lockstep` (a sharded model: every rank must run the same forward and backward
    passes) pads the list to the most micro-batches any rank has with copies of `rows[:1]` of
    weight 0, whose gradients and statistics count nothing."""
    mine = my_rows(rows, d)
    out = [(c, 1.0) for c in (mine.chunk(accum) if len(mine) else ())]
    if lockstep and d.active:
        most = max(len(part.chunk(accum)) if len(part) else 0 for part in rows.tensor_split(d.world))
        out += [(rows[:1], 0.0)] * (most - len(out))
    return out


def all_reduce_grads(params: Sequence[torch.nn.Parameter], d: Dist) -> None:
    """Sum the gradients of `params` over ranks (each rank's loss already carries its global
    weight), as one flat all-reduce; a parameter without a gradient counts as 0."""
    if not d.active:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    tdist.all_reduce(flat)
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(p).to(p.dtype)
        offset += n


def all_reduce_sums(stats: dict[str, float], d: Dist) -> dict[str, float]:
    """Sum each value over ranks (the keys must be the same, in the same order, on every rank)."""
    if not d.active or not stats:
        return stats
    keys = sorted(stats)
    t = torch.tensor([stats[k] for k in keys], dtype=torch.float64, device=device_for(d))
    tdist.all_reduce(t)
    return dict(zip(keys, t.tolist()))


def all_reduce_tensor(x: torch.Tensor, d: Dist) -> torch.Tensor:
    """Elementwise sum of `x` over ranks."""
    if d.active:
        x = x.clone()
        tdist.all_reduce(x)
    return x
