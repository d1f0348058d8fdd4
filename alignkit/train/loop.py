"""The one training loop. Every stage builds its data and model, defines one `step`, and calls `train`.

    def step(model, batch) -> StepOutput:   # batch: whatever `collate` returns, on the device
        logits = model(batch.input_ids).logits
        losses = token_losses(logits, batch.labels)            # (B, T), 0 where masked
        return StepOutput(loss=losses.sum(), weight=batch.mask.sum(), metrics={})

The loop owns everything else: sharding each global batch over processes and accumulation
steps, exact loss normalisation, AdamW + schedule, clipping, precision, accelerate/DDP,
atomic checkpoints with exact resume, the NaN guard, and what the run says while it runs (a
header line and progress on the console, metrics.jsonl / TensorBoard / trackers: alignkit.console,
alignkit.train.trackers, shared with the RL stages).
See docs/training-loop.md.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import resource
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from alignkit.atomic import read_jsonl, write_text_atomic
from alignkit.config import TrainConfig, to_dict
from alignkit.console import Progress, header, warn
from alignkit.train import checkpoint as ckpt
from alignkit.train.strategy import make_strategy
from alignkit.train.trackers import MetricsLog


@dataclass
class StepOutput:
    """What a stage's `step(model, batch)` returns for one micro-batch."""

    loss: torch.Tensor
    """SUM of the per-item losses of the micro-batch: a differentiable scalar."""
    weight: float | torch.Tensor
    """How many items that sum covers (response tokens, pairs, ...); the loop divides by the global total."""
    metrics: dict[str, float] = field(default_factory=dict)
    """Per-micro-batch MEANS of extra metrics, averaged by the loop weighted by `weight`.
    The key "ntokens" is special: a COUNT of tokens processed, summed for throughput."""


@dataclass
class TrainResult:
    """What `train` returns."""

    step: int
    """Optimizer steps done (including those before a resume)."""
    metrics: dict[str, float]
    """The last logged metrics line."""
    wall_time_s: float
    """Seconds spent in `train` by this call."""
    peak_memory_mb: float
    """Peak CUDA memory allocated, or the process's peak RSS on CPU."""
    out_dir: Path
    """The run's output directory."""
    checkpoint: Path | None
    """The final `checkpoints/step-N` directory."""
    final_dir: Path | None
    """The exported model (`out_dir/final`, written by `save_fn` or as model.safetensors)."""


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm became NaN/inf; the message names the step and the last good checkpoint."""


def to_device(obj: Any, device: torch.device | str) -> Any:
    """Move every tensor inside `obj` (tensor, dict, list/tuple, NamedTuple, dataclass) to `device`."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        moved = {f.name: to_device(getattr(obj, f.name), device) for f in dataclasses.fields(obj)}
        new = object.__new__(type(obj))
        new.__dict__.update(getattr(obj, "__dict__", {}))
        for k, v in moved.items():
            object.__setattr__(new, k, v)  # works for frozen dataclasses too
        return new
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(to_device(v, device) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    if isinstance(obj, Mapping):
        moved = {k: to_device(v, device) for k, v in obj.items()}
        try:
            return type(obj)(moved)
        except TypeError:
            return moved
    return obj


def count_tokens(batch: Any) -> int | None:
    """Input tokens in a collated batch: the sum of its `attention_mask`, if it has one."""
    mask = (
        batch.get("attention_mask") if isinstance(batch, Mapping) else getattr(batch, "attention_mask", None)
    )
    return int(mask.sum()) if isinstance(mask, torch.Tensor) else None


def build_optimizer(params: Iterable[nn.Parameter], cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over `params`; weight decay only on matrices (ndim >= 2), never on biases or norm weights."""
    params = [p for p in params if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # fused: one kernel per parameter for the whole update (3-5x faster than foreach on CPU, the same
    # formula; TRL's default too) where every parameter is a plain CPU/CUDA float tensor under DDP;
    # otherwise foreach: one multi-tensor update instead of a Python loop per parameter
    fused = cfg.strategy == "ddp" and all(
        type(p.data) is torch.Tensor and p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params
    )
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=tuple(cfg.betas),
                             **({"fused": True} if fused else {"foreach": True}))


class Schedule:
    """LR multiplier of optimizer step s (0-based): linear warm-up to 1, then cosine / linear / constant.

    warm-up: (s + 1) / warmup for s < warmup; after it, with p = (s - warmup) / (total - warmup):
    cosine 0.5 * (1 + cos(pi * p)), linear 1 - p, constant 1. The last step keeps a non-zero LR.
    A callable object (not a lambda) so LambdaLR can save it in a checkpoint.
    """

    def __init__(self, kind: str, warmup: int, total: int):
        if kind not in ("cosine", "linear", "constant"):
            raise ValueError(f"unknown schedule '{kind}' (expected cosine, linear or constant)")
        self.kind, self.warmup, self.total = kind, warmup, total

    def __call__(self, s: int) -> float:
        if s < self.warmup:
            return (s + 1) / self.warmup
        if self.kind == "constant":
            return 1.0
        p = min(1.0, (s - self.warmup) / max(1, self.total - self.warmup))
        return 0.5 * (1.0 + math.cos(math.pi * p)) if self.kind == "cosine" else 1.0 - p


def build_scheduler(
    opt: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR with `cfg.warmup_steps` of linear warm-up then `cfg.schedule` decay over `total_steps`."""
    return torch.optim.lr_scheduler.LambdaLR(opt, Schedule(cfg.schedule, cfg.warmup_steps, total_steps))


def reshape_schedule(scheduler: torch.optim.lr_scheduler.LambdaLR, cfg: TrainConfig, total_steps: int) -> None:
    """After loading a checkpoint into `scheduler`: follow this run's schedule over `total_steps`
    from the saved step (identical on a plain resume; a changed horizon re-shapes the remaining
    steps instead of keeping the saved one)."""
    fn = Schedule(cfg.schedule, cfg.warmup_steps, total_steps)
    groups = scheduler.optimizer.param_groups
    scheduler.lr_lambdas = [fn] * len(groups)
    for g, base in zip(groups, scheduler.base_lrs):
        g["lr"] = base * fn(scheduler.last_epoch)


def split_batch(indices: Sequence[int], n: int) -> list[list[int]]:
    """Cut a global batch into `n` contiguous chunks, sizes differing by at most one (first ones larger)."""
    base, extra = divmod(len(indices), n)
    out, start = [], 0
    for i in range(n):
        size = base + (1 if i < extra else 0)
        out.append(list(indices[start : start + size]))
        start += size
    return out


def _make_accelerator(cfg: TrainConfig):
    from accelerate import Accelerator

    cuda = torch.cuda.is_available()
    precision = cfg.precision
    if precision == "auto":
        precision = "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32"
    # accelerate keeps one AcceleratorState per process and refuses a second Accelerator with
    # another precision (a bf16 stage, then an fp32 one, in the same demo or test process):
    # forget it, keeping the process group (PartialState)
    from accelerate.state import AcceleratorState

    if AcceleratorState._shared_state:
        AcceleratorState._reset_state(reset_partial_state=False)
    # Under torchrun on CPU a plain Accelerator() trains each rank alone; cpu=True gives gloo DDP.
    return Accelerator(cpu=not cuda, mixed_precision="bf16" if precision == "bf16" else "no")


def _peak_memory_mb() -> float:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux


def _seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:
        pass


def truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines of steps after `step` (written by a run that died before its next checkpoint)."""
    if not path.is_file():
        return
    kept = [row for row in read_jsonl(path) if row["step"] <= step]  # a torn last line is dropped
    write_text_atomic(path, "".join(json.dumps(row) + "\n" for row in kept))


@dataclass
class _Position:
    """Where a run is: saved in every checkpoint, restored on resume."""

    step: int = 0
    epoch: int = 0
    pos: int = 0  # the next batch of `epoch`
    items_seen: int = 0
    tokens_seen: int = 0


@dataclass
class _Run:
    """What the loop's helpers share."""

    acc: Any
    strat: Any
    raw: nn.Module
    optimizer: Any
    scheduler: Any
    cfg: TrainConfig
    total: int
    trainable_ids: set[int]
    ckpt_root: Path

    @property
    def world(self) -> int:
        return self.acc.num_processes

    @property
    def main(self) -> bool:
        return self.acc.is_main_process


@dataclass
class _Sums:
    """This rank's micro-batches of one optimizer step, summed."""

    loss: torch.Tensor
    weight: float = 0.0
    items: int = 0
    tokens: int = 0
    tok_known: bool = True
    metrics: dict[str, float] = field(default_factory=dict)


def train(
    model: nn.Module,
    step: Callable[[nn.Module, Any], StepOutput],
    dataset: Sequence,
    collate: Callable[[list], Any],
    plan: Callable[[int], list[list[int]]],
    cfg: TrainConfig,
    out_dir: str | Path,
    *,
    save_fn: Callable[[nn.Module, Path], None] | None = None,
    accelerator=None,
    trainable_params: Iterable[nn.Parameter] | None = None,
    on_log: Callable[[int, dict], None] | None = None,
    weight_fn: Callable[[Any], float] | None = None,
    before_step: Callable[[nn.Module, list[tuple[Any, bool]]], None] | None = None,
    name: str = "train",
) -> TrainResult:
    """Train `model` with `step` over the global batches `plan(epoch)` gives; see the module docstring.

    plan(epoch) must be a pure function of `epoch` (seed any shuffling with it): resume replays it.
    step(model, batch) gets the wrapped (DDP) model and the collated micro-batch on the device.
    save_fn(model, dir), if given, exports the final unwrapped model to `out_dir/final` (rank 0);
    otherwise its weights go there as model.safetensors. on_log(step, metrics) runs on rank 0
    after each metrics line (and after that step's checkpoint, if any).
    weight_fn(batch), the `weight` step will return for a collated micro-batch, known before the
    forward pass: needed by train.strategy=deepspeed, whose engine scales the loss before backward.
    before_step(model, [(batch, real), ...]) runs once per optimizer step on every rank, before the
    first forward, with this rank's collated micro-batches (`real` False for a zero-weight copy):
    the place for a statistic of the whole global batch (KTO's z0), all-reduced inside.
    name: the stage, for the console's header line and the trackers' run name.
    """
    t_start = time.perf_counter()
    out_dir = Path(out_dir)
    acc = accelerator if accelerator is not None else _make_accelerator(cfg)
    rank, world, main = acc.process_index, acc.num_processes, acc.is_main_process
    accum = max(1, cfg.grad_accum)
    metrics_path = out_dir / "metrics.jsonl"
    total, epochs = _total_steps(plan, cfg, len(dataset), main)
    _seed(cfg.seed + rank)

    params = (
        list(trainable_params)
        if trainable_params is not None
        else [p for p in model.parameters() if p.requires_grad]
    )
    strat = make_strategy(cfg, acc)
    if strat.needs_weight_fn and weight_fn is None:
        raise ValueError(f"train.strategy={cfg.strategy} needs the stage to give weight_fn (its batches' weights)")
    model, optimizer = strat.prepare(model, params, lambda ps: build_optimizer(ps, cfg))
    params = strat.params or params
    run = _Run(acc, strat, strat.raw(), optimizer, build_scheduler(optimizer, cfg, total), cfg, total,
               {id(p) for p in params}, out_dir / ckpt.CHECKPOINTS)
    model.train()

    at = _Position()
    last_ckpt = ckpt.prepare_run_dir(out_dir, cfg.resume, cfg.overwrite, main)
    if last_ckpt is not None:
        at = _resume(run, last_ckpt, metrics_path)
    acc.wait_for_everyone()

    header(name, [f"{len(dataset)} examples", f"{total} steps ({epochs:.1f} epochs)",
                  f"batch {cfg.batch_size} ({world} process{'es' if world > 1 else ''} x {accum} micro-batches)",
                  f"lr {cfg.lr:g}", f"{acc.mixed_precision if acc.mixed_precision != 'no' else 'fp32'} on "
                  f"{acc.device.type}", *([f"resuming at step {at.step}"] if at.step else [])], out=out_dir)
    log = MetricsLog(out_dir, cfg, name=name, resume_step=at.step, main=main, config={"train": to_dict(cfg)})
    bar = Progress(total, initial=at.step, enabled=cfg.progress and main)

    def diverged(what: str, value: float) -> TrainingDiverged:
        good = f"the last good checkpoint is {last_ckpt}" if last_ckpt else "no checkpoint was saved yet"
        return TrainingDiverged(f"step {at.step + 1}: {what} is {value}; {good}")

    def load(idx: list[int]) -> Any:
        return to_device(collate([dataset[j] for j in idx]), acc.device)

    batches = plan(at.epoch) if at.step < total else []
    last_metrics: dict[str, float] = {}
    window_t, window_items, window_tokens, window_tok_known = time.perf_counter(), 0, 0, True
    try:
        while at.step < total:
            if at.pos >= len(batches):
                if at.pos:
                    at.epoch, at.pos = at.epoch + 1, 0
                batches = plan(at.epoch)
                if not batches:
                    raise ValueError(f"plan({at.epoch}) returned no batches")
            global_batch = batches[at.pos]
            if not global_batch:
                raise ValueError(f"plan({at.epoch}) batch {at.pos} is empty")
            runs = _rank_runs(global_batch, world, accum, rank)
            batches_here, loss_scale = _ahead(run, model, runs, load, before_step, weight_fn)
            sums = _accumulate(run, model, step, runs, batches_here, load, loss_scale)
            (g_loss, g_weight, g_items, g_tokens, tok_missing), extra = _reduce(run, sums)
            if not math.isfinite(g_loss):
                raise diverged("loss", g_loss)
            if g_weight <= 0:
                raise diverged("the total weight of the batch", g_weight)

            # DDP / FSDP2 averaged the grads over ranks; make them d(global sum)/d(theta) / global weight
            max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
            lr = optimizer.param_groups[0]["lr"]
            grad_norm = strat.step(world / g_weight, max_norm)
            if not math.isfinite(grad_norm):
                raise diverged("grad_norm", grad_norm)
            run.scheduler.step()

            at.step += 1
            at.pos += 1
            at.items_seen += int(g_items)
            at.tokens_seen += int(g_tokens)
            window_items += int(g_items)
            window_tokens += int(g_tokens)
            window_tok_known = window_tok_known and tok_missing == 0
            loss = g_loss / g_weight
            dt = max(time.perf_counter() - window_t, 1e-9)
            rate = {"tok_s": f"{window_tokens / dt:.0f}"} if window_tok_known else {"it_s": f"{window_items / dt:.1f}"}
            bar.update(1, loss=f"{loss:.4f}", **rate)

            last = at.step == total
            if last or (cfg.log_every > 0 and at.step % cfg.log_every == 0):
                line = {"step": at.step, "epoch": at.epoch + at.pos / len(batches), "loss": loss, "lr": lr,
                        "grad_norm": grad_norm, "items_per_s": window_items / dt}
                if window_tok_known:
                    line["tokens_per_s"] = window_tokens / dt
                line.update({k: v / g_weight for k, v in extra.items()})
                last_metrics = line
                log.write(line)
                window_t, window_items, window_tokens, window_tok_known = time.perf_counter(), 0, 0, True
            if last or (cfg.save_every > 0 and at.step % cfg.save_every == 0):
                last_ckpt = _save(run, at)
            if main and on_log is not None and last_metrics.get("step") == at.step:
                on_log(at.step, last_metrics)

        if last_ckpt is None or last_ckpt.name != f"step-{at.step}":
            last_ckpt = _save(run, at)
        final_dir = _export_final(run, out_dir, save_fn)
    finally:
        bar.close()
        log.close()

    return TrainResult(
        step=at.step,
        metrics=last_metrics,
        wall_time_s=time.perf_counter() - t_start,
        peak_memory_mb=_peak_memory_mb(),
        out_dir=out_dir,
        checkpoint=last_ckpt,
        final_dir=final_dir,
    )


def _total_steps(plan: Callable[[int], list[list[int]]], cfg: TrainConfig, n_examples: int,
                 main: bool) -> tuple[int, float]:
    """(optimizer steps of the run, the passes over the data they make); warns (rank 0) when
    max_steps makes more than 3 passes."""
    per_epoch = len(plan(0))
    total = cfg.max_steps if cfg.max_steps > 0 else sum(len(plan(e)) for e in range(cfg.epochs))
    epochs = total / max(per_epoch, 1)
    if cfg.max_steps > 0 and epochs > 3 and main:
        warn(f"train.max_steps={cfg.max_steps} with train.batch_size={cfg.batch_size} is {epochs:.1f} passes over "
             f"the {n_examples} examples; more than 3 usually overfits: set train.max_steps=0 and "
             f"train.epochs (or fewer steps)")
    return total, epochs


def _resume(run: _Run, last_ckpt: Path, metrics_path: Path) -> _Position:
    """Weights, optimizer, schedule and this rank's RNG state from `last_ckpt`; the position saved
    there (metrics lines after it are dropped)."""
    if run.strat.sharded:
        run.strat.load_shards(last_ckpt)
        state = ckpt.read_checkpoint(last_ckpt, None)
    else:
        state = ckpt.read_checkpoint(last_ckpt, run.raw)
        run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    reshape_schedule(run.scheduler, run.cfg, run.total)
    rngs = state["rng"]
    # a different world size keeps the fresh per-rank seed for ranks without a saved state
    if run.acc.process_index < len(rngs):
        ckpt.set_rng_state(rngs[run.acc.process_index])
    ts = state["trainer_state"]
    at = _Position(ts["step"], ts["epoch"], ts["batch_in_epoch"], ts["items_seen"], ts["tokens_seen"])
    if run.main:
        truncate_metrics(metrics_path, at.step)
        print(f"alignkit: resumed from {last_ckpt} (step {at.step})", file=sys.stderr)
    return at


def _save(run: _Run, at: _Position) -> Path:
    """Checkpoint step `at.step` (collective: every rank's RNG state, and its shard when sharded)."""
    acc, strat, world, main = run.acc, run.strat, run.world, run.main
    rngs = [ckpt.rng_state()]
    if world > 1:
        rngs = [None] * world
        torch.distributed.all_gather_object(rngs, ckpt.rng_state())
    path = run.ckpt_root / f"step-{at.step}"
    tmp = ckpt.shard_tmp(path)
    if strat.sharded:  # every rank writes its shard into one temporary directory
        if main:
            ckpt.remove_tmp(tmp)
        acc.wait_for_everyone()
        strat.save_shards(tmp)
        acc.wait_for_everyone()
    if main:
        trainer_state = {
            "step": at.step,
            "epoch": at.epoch,
            "batch_in_epoch": at.pos,
            "items_seen": at.items_seen,
            "tokens_seen": at.tokens_seen,
            "total_steps": run.total,
            "world_size": world,
            "config": to_dict(run.cfg),
            "strategy": strat.name,
        }
        ckpt.write_checkpoint(
            path,
            model=None if strat.sharded else run.raw,
            optimizer=None if strat.sharded else run.optimizer,
            shards=tmp if strat.sharded else None,
            scheduler=run.scheduler,
            rng_states=rngs,
            trainer_state=trainer_state,
            trainable=run.trainable_ids,
        )
        ckpt.prune(run.ckpt_root, run.cfg.keep_checkpoints)
    acc.wait_for_everyone()
    return path


def _rank_runs(global_batch: list[int], world: int, accum: int, rank: int) -> list[tuple[list[int], bool]]:
    """This rank's `accum` micro-batches of a global batch, as (indices, real)."""
    mine = split_batch(global_batch, world * accum)[rank * accum : (rank + 1) * accum]
    if world > 1:
        # every rank runs `accum` forward/backward passes, a zero-weight copy where its
        # share of a short batch is empty: DDP syncs in the last backward, and FSDP2 and
        # ZeRO-3 gather weights in every pass, so the collectives must pair up across ranks
        return [(idx, True) if idx else ([global_batch[0]], False) for idx in mine]
    return [(idx, True) for idx in mine if idx]


def _ahead(run: _Run, model: nn.Module, runs: list, load: Callable[[list[int]], Any],
           before_step: Callable | None, weight_fn: Callable | None) -> tuple[list[Any], float | None]:
    """The micro-batches collated ahead (all at once, only when something must see them first:
    `before_step`, or the strategy's loss scale from `weight_fn`) and that scale (None: not used)."""
    ahead = run.strat.needs_weight_fn or before_step is not None
    batches_here: list[Any] = [load(idx) for idx, _ in runs] if ahead else []
    if before_step is not None:
        before_step(model, [(b, real) for b, (_, real) in zip(batches_here, runs)])
    loss_scale = None
    if run.strat.needs_weight_fn:  # the engine scales the loss before backward
        pre = sum(float(weight_fn(b)) for b, (_, real) in zip(batches_here, runs) if real)
        pre_t = torch.tensor([pre], dtype=torch.float64, device=run.acc.device)
        torch.distributed.all_reduce(pre_t)
        loss_scale = run.world / float(pre_t) if float(pre_t) > 0 else 0.0
    return batches_here, loss_scale


def _accumulate(run: _Run, model: nn.Module, step: Callable[[nn.Module, Any], StepOutput], runs: list,
                batches_here: list[Any], load: Callable[[list[int]], Any], loss_scale: float | None) -> _Sums:
    """Forward and backward of this rank's micro-batches (gradients synced in the last); their sums."""
    sums = _Sums(torch.zeros((), dtype=torch.float64, device=run.acc.device))
    for i, (idx, real) in enumerate(runs):
        batch = batches_here[i] if batches_here else load(idx)
        with run.strat.sync(i == len(runs) - 1):
            with run.acc.autocast():
                out = step(model, batch)
            run.strat.backward(out.loss if real else out.loss * 0.0, loss_scale)
        metrics = dict(out.metrics)
        ntok = metrics.pop("ntokens", None)
        if not real:
            for k in metrics:
                sums.metrics.setdefault(k, 0.0)
            continue
        w = float(out.weight)
        sums.loss += out.loss.detach().to(torch.float64)
        sums.weight += w
        sums.items += len(idx)
        ntok = count_tokens(batch) if ntok is None else ntok
        if ntok is None:
            sums.tok_known = False
        else:
            sums.tokens += int(ntok)
        for k, v in metrics.items():
            sums.metrics[k] = sums.metrics.get(k, 0.0) + float(v) * w
    return sums


def _reduce(run: _Run, sums: _Sums) -> tuple[list[float], dict[str, float]]:
    """([loss, weight, items, tokens, ranks missing a token count] summed over ranks, the metrics'
    weighted sums by name)."""
    keys = sorted(sums.metrics)
    stats = torch.tensor(
        [0.0, sums.weight, sums.items, sums.tokens, 0.0 if sums.tok_known else 1.0] + [sums.metrics[k] for k in keys],
        dtype=torch.float64,
        device=run.acc.device,
    )
    stats[0] = sums.loss
    if run.world > 1:
        torch.distributed.all_reduce(stats)
    return stats[:5].tolist(), dict(zip(keys, stats[5:].tolist()))


def _export_final(run: _Run, out_dir: Path, save_fn: Callable[[nn.Module, Path], None] | None) -> Path:
    """The trained model to OUT/final, atomically (rank 0; gathering a sharded model is collective)."""
    final_dir = out_dir / "final"
    whole = run.strat.export_module() if run.strat.sharded else run.raw
    if run.main:
        with ckpt.atomic_dir(final_dir) as tmp:
            if save_fn is not None:
                save_fn(whole, tmp)
            else:
                ckpt.save_weights(whole, tmp / "model.safetensors")
    run.acc.wait_for_everyone()
    return final_dir
