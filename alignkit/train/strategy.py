"""How the one training loop spreads a model over processes: `train.strategy` = ddp | fsdp2 | deepspeed.

    strat = make_strategy(cfg, accelerator)        # after the process group exists
    model, optimizer = strat.prepare(model, params, build_optimizer)
    for i, batch in micro-batches:
        with strat.sync(i == last): loss = step(model, batch); strat.backward(loss, scale)
    grad_norm = strat.step(global_scale, max_norm)  # grads -> d(global sum)/d(theta) / weight, clip, update

- ddp: accelerate's DistributedDataParallel (plain in one process). Gradients are averaged over
  ranks, then rescaled by the loop so the update is that of the global batch.
- fsdp2: torch's own `fully_shard` on every block of repeated layers and on the root, so
  parameters, gradients and AdamW states are split over ranks (Zhao et al. 2023, PyTorch FSDP).
  Gradients are reduce-scattered as averages, rescaled like DDP's. Checkpoints are sharded with
  torch.distributed.checkpoint (one file per rank).
- deepspeed: a DeepSpeed engine (ZeRO stage 2 or 3, optional CPU offload; Rajbhandari et al.
  2020) around torch's AdamW. The engine owns accumulation, averaging and clipping, so the loop
  scales each micro-batch's loss by world / global weight BEFORE backward: the stage gives the
  weight of a collated batch up front (`weight_fn`). Checkpoints are DeepSpeed's own (sharded).

The final model is always exported whole: a sharded run gathers the full state dict and writes
it through an unsharded twin of the model kept on the meta device (rank 0).
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

SHARDS = "shards"


def _is_dtensor(t: Any) -> bool:
    return type(t).__name__ == "DTensor"


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks to shard one by one: the elements of every ModuleList of 2+ items
    whose elements all have the same type (HF decoders keep theirs in `model.layers`)."""
    blocks: list[nn.Module] = []
    for m in model.modules():
        if isinstance(m, nn.ModuleList) and len(m) > 1 and len({type(x) for x in m}) == 1:
            if not any(b is m or any(b is x for x in m.modules()) for b in blocks):
                blocks.extend(m)
    return blocks


class MetaTwin:
    """An unsharded copy of the model's structure on the meta device (no memory), plus its
    buffers, to export a gathered full state dict with the stage's own save function."""

    def __init__(self, model: nn.Module):
        self.buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
        # deepcopy with every parameter and buffer pre-mapped to a meta tensor of its shape: the
        # structure is copied, the weights never are (a plain deepcopy would hold a second full
        # model in memory for a moment); tied parameters stay tied
        memo: dict[int, Any] = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
                                for p in model.parameters()}
        memo.update({id(b): torch.empty_like(b, device="meta") for b in model.buffers()})
        self.module = copy.deepcopy(model, memo)

    def materialise(self, full_state: dict[str, torch.Tensor], device: Any = "cpu") -> nn.Module:
        """The module with `full_state`'s weights on `device` (the same module object every time).
        A tensor already on `device` in its parameter's dtype becomes that parameter (taken over,
        not copied: the caller hands its gathered tensors over, so one full copy is in memory
        rather than two); any other is copied in."""
        m = self.module.to_empty(device=device)  # uninitialised: pages a taken-over tensor replaces are never touched
        with torch.no_grad():
            for name, b in self.buffers.items():
                m.get_buffer(name).copy_(b)
        params, dev = dict(m.named_parameters()), torch.device(device)
        taken = {k: v for k, v in full_state.items() if k in params and v.dtype == params[k].dtype and v.device == dev}
        m.load_state_dict(taken, strict=False, assign=True)
        m.load_state_dict({k: v for k, v in full_state.items() if k not in taken}, strict=False)
        tie = getattr(m, "tie_weights", None)
        if callable(tie):
            tie()
        return m

    def release(self) -> None:
        """Back to the meta device: the memory `materialise` took is freed."""
        self.module.to("meta")


class Strategy:
    """DDP through accelerate (and the single-process case)."""

    name = "ddp"
    sharded = False
    needs_weight_fn = False

    def __init__(self, cfg: Any, acc: Any):
        self.cfg, self.acc = cfg, acc
        self.world = acc.num_processes
        self.model: Any = None
        self.optimizer: Any = None
        self.params: list[nn.Parameter] = []

    def prepare(self, model: nn.Module, params: list[nn.Parameter], build: Callable) -> tuple[Any, Any]:
        self.params = params
        optimizer = build(params)
        self.model, self.optimizer = self.acc.prepare(model, optimizer)
        return self.model, self.optimizer

    def raw(self) -> nn.Module:
        # DDP / DataParallel hold the model in `.module` (a compiled model stays compiled, as
        # accelerate's unwrap_model keeps it); accelerate's own unwrap imports DeepSpeed whenever it is
        # installed, 2-3 s and ~90 MB on every run that never uses it
        model = self.model
        while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        return model

    def sync(self, last: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext() if last else self.acc.no_sync(self.model)

    def backward(self, loss: torch.Tensor, global_scale: float | None) -> None:
        self.acc.backward(loss)

    def step(self, global_scale: float, max_norm: float) -> float:
        for p in self.params:
            if p.grad is not None:
                p.grad.mul_(global_scale)
        grad_norm = float(self._clip(max_norm))
        if not math.isfinite(grad_norm):
            return grad_norm
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def _clip(self, max_norm: float) -> Any:
        return self.acc.clip_grad_norm_(self.params, max_norm)

    # -- checkpoints ------------------------------------------------------------------------
    def save_shards(self, tmp: Path) -> None:
        """Sharded strategies write their model and optimizer shards into `tmp` (all ranks); the
        checkpoint then holds them as step-N/shards."""

    def load_shards(self, path: Path) -> None:
        """Load what `save_shards` wrote (all ranks)."""

    def export_module(self) -> nn.Module | None:
        """The whole model for the final export, on rank 0 (None elsewhere); collective."""
        return self.raw() if self.acc.is_main_process else None


class FSDP2(Strategy):
    """torch FSDP2: `fully_shard` per block and on the root."""

    name = "fsdp2"
    sharded = True

    def prepare(self, model, params, build):
        from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

        trainable = {n for n, p in model.named_parameters() if any(p is q for q in params)}
        self.twin = MetaTwin(model) if self.acc.is_main_process else None
        # sharded parameters, their gradients and AdamW states live in host memory; the optimizer
        # steps there. Pinned host memory (fast copies to the GPU) needs an accelerator.
        offload = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if self.cfg.offload else OffloadPolicy()
        model = model.to(self.acc.device)
        for block in repeated_blocks(model):
            fully_shard(block, offload_policy=offload)
        fully_shard(model, offload_policy=offload)
        self.params = [p for n, p in model.named_parameters() if n in trainable]
        self.model, self.optimizer = model, build(self.params)
        return self.model, self.optimizer

    def raw(self):
        return self.model

    def sync(self, last):
        self.model.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def backward(self, loss, global_scale):
        loss.backward()

    def _clip(self, max_norm):
        norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm, foreach=True)
        return norm.full_tensor() if _is_dtensor(norm) else norm

    def save_shards(self, tmp):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(tmp))

    def load_shards(self, path):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        state = {"model": model_sd, "optimizer": optim_sd}
        dcp.load(state, checkpoint_id=str(path / SHARDS))
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"])

    def export_module(self):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return self.twin.materialise(full) if self.twin is not None else None


class DeepSpeed(Strategy):
    """A DeepSpeed ZeRO-2/3 engine around torch AdamW; the engine clips and steps."""

    name = "deepspeed"
    sharded = True
    needs_weight_fn = True

    def ds_config(self) -> dict:
        return ds_config(self.cfg, self.acc.mixed_precision == "bf16")

    def prepare(self, model, params, build):
        deepspeed = import_deepspeed()
        self.twin = MetaTwin(model) if self.acc.is_main_process and self.cfg.zero_stage == 3 else None
        optimizer = build(params)
        engine, ds_opt, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=self.ds_config(),
                                                    dist_init_required=False)
        self.engine, self.inner = engine, optimizer
        self.model, self.optimizer = engine, optimizer  # the scheduler drives the torch optimizer's lr
        self.shared_master_bytes = share_fp32_master(getattr(engine, "optimizer", None))
        return engine, optimizer

    def raw(self):
        return self.engine.module

    def sync(self, last):
        self.engine.set_gradient_accumulation_boundary(last)
        return contextlib.nullcontext()

    def backward(self, loss, global_scale):
        # the engine divides by the world size when it averages over ranks
        self.engine.backward(loss * global_scale, scale_wrt_gas=False)

    def step(self, global_scale, max_norm):
        self.engine.set_gradient_accumulation_boundary(True)
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def save_shards(self, tmp):
        self.engine.save_checkpoint(str(tmp), tag="zero", save_latest=False)

    def load_shards(self, path):
        self.engine.load_checkpoint(str(path / SHARDS), tag="zero", load_optimizer_states=True,
                                    load_lr_scheduler_states=False)

    def export_module(self):
        if self.cfg.zero_stage != 3:
            return self.raw() if self.acc.is_main_process else None
        full = self.engine._zero3_consolidated_16bit_state_dict()  # gathered on rank 0, collective
        return self.twin.materialise(full) if self.twin is not None else None


def import_deepspeed() -> Any:
    """deepspeed, told to use the CPU when there is no GPU (read when it is imported)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed
    except ImportError:
        raise ImportError("train.strategy=deepspeed needs DeepSpeed: pip install 'alignkit[deepspeed]'") from None
    return deepspeed


def ds_config(cfg: Any, bf16: bool) -> dict:
    """The DeepSpeed config of TrainConfig `cfg`: ZeRO stage, offload, clipping, bf16."""
    zero: dict[str, Any] = {"stage": cfg.zero_stage}
    if cfg.offload:
        zero["offload_optimizer"] = {"device": "cpu"}
        if cfg.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu"}
    return {
        "train_micro_batch_size_per_gpu": 1,  # the loop feeds the engine; only the product matters
        "gradient_accumulation_steps": 1,
        "gradient_clipping": cfg.max_grad_norm if cfg.max_grad_norm > 0 else 0.0,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def share_fp32_master(zero: Any) -> int:
    """ZeRO-3 with fp32 parameters: let each rank's fp32 master partition BE its parameter partition.

    DeepSpeed (0.19.8, stage3.py `_create_fp32_partitions`) means to skip the master copy when the
    flat parameter partition already has the master dtype and device, but compares the partition's
    torch.device with the accelerator's device *name* (a str), never equal, so it always clones:
    one more 4 bytes per parameter / N on every rank. Here the master partitions are replaced by the
    parameter partitions themselves, as DeepSpeed's own branch would have done, while no optimizer
    state refers to them yet; the optimizer then updates the parameters in place (and DeepSpeed's
    copy from master to parameters becomes a self-copy). Partitions that are not exact fp32 copies
    on the same device (bf16 parameters, CPU offload, NVMe swapping) are left alone.
    Returns the bytes of master partitions freed.
    """
    params = getattr(zero, "fp16_partitioned_groups_flat", None)
    masters = getattr(zero, "fp32_partitioned_groups_flat", None)
    inner = getattr(zero, "optimizer", None)
    if not params or masters is None or len(params) != len(masters) or inner is None:
        return 0
    if getattr(zero, "offload_optimizer", False) or getattr(zero, "swap_optimizer", False):
        return 0
    freed = 0
    for i, (p, m) in enumerate(zip(params, masters)):
        if p is None or p is m or p.dtype != torch.float32 or m.dtype != torch.float32 or p.device != m.device:
            continue
        if p.shape != m.shape or m in inner.state or not torch.equal(p, m):
            continue
        p.requires_grad = True  # as DeepSpeed marks its master partitions
        if hasattr(m, "ds_id"):
            p.ds_id = m.ds_id
        masters[i] = p
        freed += m.numel() * m.element_size()
    return freed


STRATEGIES = {"ddp": Strategy, "fsdp2": FSDP2, "deepspeed": DeepSpeed}


def make_strategy(cfg: Any, acc: Any) -> Strategy:
    """The strategy of `cfg.strategy`; one process always runs plain (nothing to shard)."""
    if acc.num_processes == 1:
        return Strategy(cfg, acc)
    return STRATEGIES[cfg.strategy](cfg, acc)
