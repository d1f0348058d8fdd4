"""The RL stages' trainable model on N ranks: replicated (`train.strategy=ddp`), sharded with
torch FSDP2 (`fsdp2`) or by DeepSpeed ZeRO engines (`deepspeed`), behind one
small interface the stages call.

    engine = rl_engine(cfg.train, dist, module=ac, policy=policy, device=device)
    optimizer = build_optimizer(ac.parameters()); engine.attach([(ac, optimizer)])
    logp, values, _ = engine(ActorCritic.token_stats, ids, mask, r_ids)    # a pass through the model
    with engine.gathered() as sampler:                                     # a whole, plain policy
        ro = collect_rollout(sampler, ...)
    engine.backward(loss, last=...)                                        # each micro-batch
    norm = engine.step([(params, optimizer)], max_norm)                    # after a minibatch

Replicated (`Replicated`): every call runs on the module itself; gradients are summed over ranks
with one flat all-reduce (docs/distributed-rl.md).

Sharded (`Sharded`): every block of repeated layers (of the policy and of a separate value model)
is its own FSDP2 unit and a thin root module (`Entry`) holds the rest (embeddings, final norm,
LM head, value head). The stages reach the model through more than its forward (the chunked
log-prob pass calls the decoder and multiplies by the head's weight itself), so every pass goes
through `Entry.forward(fn, ...)`, which runs `fn(module, ...)` while FSDP2 has the root's
parameters gathered; the blocks gather their own. Parameters, gradients and AdamW states are
1/N per rank. Generation needs the whole policy at every step of the sampler, so `gathered()`
all-gathers the policy's parameters once into an unsharded copy (built on the meta device, so it
costs no memory between rollouts), as TRL gathers ZeRO-3 weights for generation and OpenRLHF /
verl push them into their vLLM engines. FSDP2's reduce-scatter averages over ranks;
`reduce_grads` multiplies by N so the step is the one of the summed global-batch gradient, as in
the replicated case. Every rank must make the same passes: the update pads a rank's micro-batches
with zero-weight copies (`distributed.micro_batches`).

DeepSpeed (`ZeRO`): see the class. Checkpoints of a sharded run hold torch.distributed.checkpoint
shards (one file per rank) of the model and the optimizers in `step-N/shards` (DeepSpeed's own
layout under ZeRO); the final model is written whole, from `gathered()`.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from alignkit.train.distributed import Dist, all_reduce_grads, barrier
from alignkit.train.strategy import SHARDS, MetaTwin, _is_dtensor, repeated_blocks


@contextlib.contextmanager
def _on_twin(twin: MetaTwin, full: dict[str, torch.Tensor], device: torch.device) -> Iterator[nn.Module]:
    """`twin` holding the gathered weights `full` on `device`, in eval mode, for the block; `full`
    is the caller's only reference to them: the twin takes them over (`MetaTwin.materialise`)."""
    model = twin.materialise(full, device).eval()
    full.clear()
    try:
        yield model
    finally:
        twin.release()


class Replicated:
    """The whole model on every rank (and the one-process case)."""

    sharded = False

    def __init__(self, module: nn.Module, policy: nn.Module, dist: Dist):
        self.module, self.policy, self.dist = module, policy, dist

    def __call__(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return fn(self.module, *args, **kwargs)

    @contextlib.contextmanager
    def gathered(self) -> Iterator[nn.Module]:
        yield self.policy

    def attach(self, pairs: Sequence[tuple[nn.Module, torch.optim.Optimizer]]) -> None:
        """Hand over the (module, optimizer) pairs once they are built (DeepSpeed wraps them)."""

    def backward(self, loss: torch.Tensor | Sequence[torch.Tensor], last: bool) -> None:
        """Backward of one micro-batch's loss (`last`: the minibatch's last micro-batch on this rank);
        a sequence: one loss per attached part (their sum here; ZeRO hands each to its engine)."""
        (loss if isinstance(loss, torch.Tensor) else sum(loss)).backward()

    def step(self, groups: Sequence[tuple[Sequence[nn.Parameter], torch.optim.Optimizer]], max_norm: float) -> float | None:
        """End a minibatch: sum the gradients over ranks, clip each group's to `max_norm` (0: no
        clipping) and step each optimizer. Returns the first group's pre-clip norm (None: no clipping)."""
        self.reduce_grads([p for params, _ in groups for p in params])
        norms = [self.clip(params, max_norm) if max_norm > 0 else None for params, _ in groups]
        for _, optimizer in groups:
            optimizer.step()
        return norms[0]

    def reduce_grads(self, params: Sequence[nn.Parameter]) -> None:
        all_reduce_grads(params, self.dist)

    def clip(self, params: Sequence[nn.Parameter], max_norm: float) -> float:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))

    def barrier(self) -> None:
        barrier(self.dist)


class Entry(nn.Module):
    """FSDP2's root: `forward(fn, *args)` runs `fn(inner, *args)` with the root's parameters gathered."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return fn(self.inner, *args, **kwargs)


class Sharded(Replicated):
    """torch FSDP2 (`fully_shard`) per block and on an `Entry` root around `module`."""

    sharded = True

    def __init__(self, module: nn.Module, policy: nn.Module, dist: Dist, device: torch.device, offload: bool = False):
        from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

        super().__init__(module, policy, dist)
        self.device = device
        self.twin = MetaTwin(policy)  # every rank samples, so every rank keeps one
        offload_policy = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if offload else OffloadPolicy()
        for block in repeated_blocks(module):
            fully_shard(block, offload_policy=offload_policy)
        self.entry = fully_shard(Entry(module), offload_policy=offload_policy)

    def __call__(self, fn, *args, **kwargs):
        with warnings.catch_warnings():
            # FSDP2 warns that an in-place op on a returned view would skip its pre-backward hook;
            # the stages only read the log-probs and values they get back
            warnings.filterwarnings("ignore", message="FSDP2-wrapped module")
            out = self.entry(fn, *args, **kwargs)
        if not torch.is_grad_enabled():  # FSDP2 keeps the root gathered after a forward, for its backward
            self.entry.reshard()
        return out

    @contextlib.contextmanager
    def gathered(self):
        """The policy whole on every rank for the block (collective: every rank enters)."""
        self.entry.reshard()
        with torch.no_grad():
            full = {n: (p.full_tensor() if _is_dtensor(p) else p).detach() for n, p in self.policy.named_parameters()}
        with _on_twin(self.twin, full, self.device) as model:
            yield model

    def reduce_grads(self, params):
        """FSDP2 reduce-scattered the mean over ranks; the stages' losses carry global weights,
        so the sum is wanted."""
        for p in params:
            if p.grad is not None:
                p.grad.mul_(self.dist.world)

    def clip(self, params, max_norm):
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
        return float(norm.full_tensor() if _is_dtensor(norm) else norm)

    # -- checkpoints ----------------------------------------------------------------------------
    def save_shards(self, tmp: Path, optimizers: Sequence[torch.optim.Optimizer]) -> None:
        """Every rank writes its shard of the model and the optimizers into `tmp` (collective)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.entry, list(optimizers))
        dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(tmp))

    def load_shards(self, path: Path, optimizers: Sequence[torch.optim.Optimizer]) -> None:
        """Load what `save_shards` wrote into checkpoint `path` (collective)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_sd, optim_sd = get_state_dict(self.entry, list(optimizers))
        state = {"model": model_sd, "optimizer": optim_sd}
        dcp.load(state, checkpoint_id=str(path / SHARDS))
        set_state_dict(self.entry, list(optimizers), model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"])


class ZeRO(Replicated):
    """DeepSpeed ZeRO-2/3 engines around the model's trainable parts, each with its torch optimizer:
    GRPO and RLOO hand over the policy (one engine); PPO its policy and its separate value model (two
    engines, as OpenRLHF runs actor and critic: each clips its own gradients, as the one-process
    step does). ZeRO-3 gathers each submodule's parameters in its own forward hooks; the passes
    still go through the engines' forward (around an `Entry`), which is where DeepSpeed 0.19
    counts micro-batches: called past it, a second micro-batch's gradients would overwrite the
    first's instead of adding to them. With two engines the model routes each part's pass through
    its engine (`module.route`, see ppo.ActorCritic). The engines own the gradient reduction,
    clipping (`gradient_clipping` = train.max_grad_norm over each part) and the optimizer steps."""

    sharded = True

    def __init__(self, module: nn.Module, policy: nn.Module, dist: Dist, device: torch.device, train: Any):
        super().__init__(module, policy, dist)
        self.train, self.device = train, device
        self.twin = MetaTwin(policy) if train.zero_stage == 3 else None
        self.engines: list[Any] = []

    def attach(self, pairs):
        from alignkit.train.strategy import ds_config, import_deepspeed, share_fp32_master

        parts = [m for m, _ in pairs]
        if parts != [self.module] and not (len(parts) > 1 and hasattr(self.module, "route")
                                           and all(any(m is c for c in self.module.children()) for m in parts)):
            raise ValueError("train.strategy=deepspeed wraps the module with its optimizer, or its parts when "
                             "the module routes their passes (route)")
        bf16 = self.train.precision == "bf16" or (
            self.train.precision == "auto" and torch.cuda.is_available() and torch.cuda.is_bf16_supported())
        for part, optimizer in pairs:
            ds, *_ = import_deepspeed().initialize(model=Entry(part), optimizer=optimizer,
                                                   config=ds_config(self.train, bf16), dist_init_required=False)
            share_fp32_master(getattr(ds, "optimizer", None))
            self.engines.append(ds)
        if len(pairs) > 1:
            by_part = {id(part): ds for part, ds in zip(parts, self.engines)}
            self.module.route = lambda part, fn, *args, **kwargs: by_part[id(part)](fn, *args, **kwargs)

    def __call__(self, fn, *args, **kwargs):
        if len(self.engines) == 1:
            return self.engines[0](fn, *args, **kwargs)
        return fn(self.module, *args, **kwargs)  # each part's pass goes through its engine (route)

    @contextlib.contextmanager
    def gathered(self):
        if self.twin is None:  # ZeRO-2 keeps whole parameters on every rank
            yield self.policy
            return
        from alignkit.train.strategy import import_deepspeed

        with import_deepspeed().zero.GatheredParameters(list(self.policy.parameters())), torch.no_grad():
            full = {n: p.detach().clone() for n, p in self.policy.named_parameters()}
        with _on_twin(self.twin, full, self.device) as model:
            yield model

    def backward(self, loss, last):
        losses = [loss] if isinstance(loss, torch.Tensor) else list(loss)
        if len(losses) != len(self.engines):
            raise ValueError(f"{len(self.engines)} DeepSpeed engines need one loss each, got {len(losses)}")
        for ds, part_loss in zip(self.engines, losses):
            ds.set_gradient_accumulation_boundary(last)
            ds.backward(part_loss * self.dist.world, scale_wrt_gas=False)  # the engine averages over ranks

    def step(self, groups, max_norm):
        norms = []
        for ds in self.engines:
            ds.set_gradient_accumulation_boundary(True)
            ds.step()
            norms.append(ds.get_global_grad_norm())
        return (float(norms[0]) if norms[0] is not None else float("nan")) if max_norm > 0 else None

    def _tags(self) -> list[str]:
        return ["zero"] if len(self.engines) == 1 else [f"zero-{i}" for i in range(len(self.engines))]

    def save_shards(self, tmp, optimizers):
        for ds, tag in zip(self.engines, self._tags()):
            ds.save_checkpoint(str(tmp), tag=tag, save_latest=False)

    def load_shards(self, path, optimizers):
        for ds, tag in zip(self.engines, self._tags()):
            ds.load_checkpoint(str(path / SHARDS), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=False)


def rl_engine(train: Any, dist: Dist, module: nn.Module, policy: nn.Module, device: torch.device) -> Replicated:
    """`Sharded` for train.strategy=fsdp2 and `ZeRO` for deepspeed on 2+ ranks, else `Replicated`.
    Build the optimizers after this call (sharding replaces the parameters), then `attach` them."""
    if train.strategy == "fsdp2" and dist.active:
        return Sharded(module, policy, dist, device, offload=train.offload)
    if train.strategy == "deepspeed" and dist.active:
        return ZeRO(module, policy, dist, device, train)
    return Replicated(module, policy, dist)


class ShardedReference:
    """The frozen reference model sharded by FSDP2 like the policy (`train.strategy=fsdp2`): 1/N
    of its weights per rank. Its log-prob passes run on every rank in step (each rank scores as
    many rows); `whole()` gathers it for greedy answers (collective: every rank enters)."""

    def __init__(self, model: nn.Module, dist: Dist, device: torch.device):
        model.requires_grad_(False)
        model.eval()
        self.engine = Sharded(model, model, dist, device)

    @torch.no_grad()
    def logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_ids: torch.Tensor,
                 temperature: float = 1.0, chunk: int = 0, share_prompt_prefix: bool = False) -> torch.Tensor:
        from alignkit.train.rollout import response_token_stats

        def fn(model, ids, mask, r_ids):
            return response_token_stats(model, ids, mask, r_ids, temperature, chunk, share_prompt_prefix=share_prompt_prefix)[0]

        return self.engine(fn, input_ids, attention_mask, response_ids)

    @contextlib.contextmanager
    def whole(self) -> Iterator[Any]:
        """A plain `rollout.Reference` around the gathered model, for the block."""
        from alignkit.train.rollout import Reference

        with self.engine.gathered() as model:
            yield Reference(model, model)


def shard_reference(reference: Any, engine: Replicated, dist: Dist, device: torch.device) -> Any:
    """`reference` sharded like the policy when `engine` is FSDP2 and the reference is a model of
    its own (not a LoRA policy's adapter-free self, nor a Ray actor); else `reference` itself."""
    model = getattr(reference, "model", None)
    if isinstance(engine, Sharded) and isinstance(model, nn.Module):
        return ShardedReference(model, dist, device)
    return reference


@contextlib.contextmanager
def whole_reference(reference: Any) -> Iterator[Any]:
    """The reference ready for greedy answers on one rank: a sharded one gathered (collective),
    any other as it is."""
    if isinstance(reference, ShardedReference):
        with reference.whole() as ref:
            yield ref
    else:
        yield reference
