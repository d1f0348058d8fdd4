"""Atomic checkpoints for the training loop: weights, optimizer, scheduler, RNG, position.

Layout of one checkpoint (a directory that appears in one atomic rename, so any `step-N`
directory is complete; a crash mid-save leaves only a `.tmp-*` directory, removed next start):

    out_dir/checkpoints/step-N/
        model.safetensors    trainable parameters + buffers (shared tensors stored once)
        optimizer.pt         optimizer.state_dict()
        scheduler.pt         scheduler.state_dict()
        rng.pt               one RNG state per rank: python, numpy, torch, cuda
        trainer_state.json   step, epoch, batch position in the epoch, counters, config

Only rank 0 writes; every rank reads the same files on resume (shared filesystem).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from alignkit.atomic import file_problem, share_tree

CHECKPOINTS = "checkpoints"
FILES = ("model.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt", "trainer_state.json")
_STEP_DIR = re.compile(r"^step-(\d+)$")


def fsync_tree(path: Path) -> None:
    """Flush every file under `path`, then the directories themselves, to disk."""
    for root, _dirs, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(root))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove(path: Path) -> None:
    """Delete a directory by first renaming it aside, so no half-deleted `step-N` stays visible."""
    trash = path.with_name(f".trash-{path.name}-{os.getpid()}")
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a temporary directory beside `target`; on success fsync it and rename it to `target`.

    On an exception the temporary directory is removed and `target` is untouched; on a hard
    crash (SIGKILL, power loss) a `.tmp-*` directory is left, which readers ignore.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".tmp-{target.name}-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        share_tree(tmp)
        fsync_tree(tmp)
        if target.exists():
            remove(target)
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def clean_tmp(root: Path) -> None:
    """Remove leftovers of crashed saves (`.tmp-*`, `.trash-*`) in `root`."""
    if not root.is_dir():
        return
    for p in root.iterdir():
        if p.is_dir() and (p.name.startswith(".tmp-") or p.name.startswith(".trash-")):
            shutil.rmtree(p, ignore_errors=True)


def step_dirs(root: Path) -> list[tuple[int, Path]]:
    """Complete `step-N` checkpoints in `root`, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir() and complete(p):
            found.append((int(m.group(1)), p))
    return sorted(found)


def complete(path: Path) -> bool:
    """Every file of a checkpoint is there: the five FILES, or, for a sharded one (FSDP2,
    DeepSpeed), the shards/ directory in place of the weights and optimizer."""
    if (path / "shards").is_dir():
        return all((path / f).is_file() for f in FILES if f not in ("model.safetensors", "optimizer.pt"))
    return all((path / f).is_file() for f in FILES)


def shard_tmp(path: Path) -> Path:
    """The temporary directory every rank writes its shard into before `path` appears (it must
    be the same on every rank, so it is named without a process id)."""
    return path.with_name(f".tmp-{path.name}-shards")


def remove_tmp(tmp: Path) -> None:
    """Drop a leftover temporary directory of a killed save."""
    if tmp.exists():
        shutil.rmtree(tmp)


def latest(root: Path) -> Path | None:
    """The newest complete checkpoint in `root`, or None."""
    dirs = step_dirs(root)
    return dirs[-1][1] if dirs else None


def prune(root: Path, keep: int) -> None:
    """Keep the `keep` newest checkpoints (keep <= 0 keeps all)."""
    if keep <= 0:
        return
    for _, p in step_dirs(root)[:-keep]:
        remove(p)


def earlier_run_error(root: Path) -> FileExistsError:
    """The error of a fresh run (resume and overwrite both off) where `root` holds earlier checkpoints."""
    return FileExistsError(
        f"{root} already holds checkpoints of an earlier run; set train.resume=true to "
        "continue it, train.overwrite=true to replace it, or choose another output directory"
    )


def prepare_run_dir(out_dir: Path, resume: bool, overwrite: bool, main: bool = True) -> Path | None:
    """Ready OUT for a run (the training loop's and the RL stages' one rule) and return the
    checkpoint to resume from.

    With `resume`: the newest complete OUT/checkpoints/step-N, or None when there is none (a fresh
    start). Without it, earlier checkpoints are an error (`earlier_run_error`, raised on every rank
    so all of them stop together) unless `overwrite`, which deletes them. A fresh start drops an
    earlier run's metrics.jsonl and tb/, which would confuse a later resume. Only `main` deletes.
    """
    root = out_dir / CHECKPOINTS
    found = None
    if main:
        root.mkdir(parents=True, exist_ok=True)
        clean_tmp(root)
    if resume:
        found = latest(root)
    else:
        earlier = step_dirs(root)
        if earlier and not overwrite:
            raise earlier_run_error(root)
        if main:
            for _, old in earlier:
                remove(old)
    if found is None and main:
        (out_dir / "metrics.jsonl").unlink(missing_ok=True)
        shutil.rmtree(out_dir / "tb", ignore_errors=True)
    return found


class StateDicts:
    """Several optimizers (or schedulers) saved and loaded as one, e.g. PPO's policy and value
    optimizers in one optimizer.pt: {"0": first.state_dict(), "1": second.state_dict(), ...}."""

    def __init__(self, items: list[Any]):
        self.items = list(items)

    def state_dict(self) -> dict[str, Any]:
        return {str(i): x.state_dict() for i, x in enumerate(self.items)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state) != len(self.items):
            raise ValueError(f"the checkpoint holds {len(state)} states, this run has {len(self.items)}")
        for i, x in enumerate(self.items):
            x.load_state_dict(state[str(i)])


def weights_state(model: nn.Module, trainable: set[int] | None = None) -> tuple[dict, dict]:
    """Tensors to save: parameters in `trainable` (ids; None: all) and all persistent buffers.

    Tensors that share storage (tied embeddings) are stored once; returns (tensors, aliases)
    where aliases maps a dropped name to the stored name it shares with.
    """
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if trainable is not None and isinstance(t, nn.Parameter) and id(t) not in trainable:
            continue
        key = (t.data_ptr(), t.dtype, tuple(t.shape), t.stride()) if t.numel() else None
        if key is not None and key in seen:
            aliases[name] = seen[key]
            continue
        if key is not None:
            seen[key] = name
        tensors[name] = t.detach().to("cpu", copy=True).contiguous()
    return tensors, aliases


def save_weights(model: nn.Module, path: Path, trainable: set[int] | None = None) -> None:
    """Write `model`'s weights (see `weights_state`) to a safetensors file."""
    from safetensors.torch import save_file

    tensors, aliases = weights_state(model, trainable)
    save_file(tensors, str(path), metadata={"aliases": json.dumps(aliases)})


def load_weights(model: nn.Module, path: Path) -> None:
    """Load a file written by `save_weights`; every stored tensor must match a model key."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
    tensors = load_file(str(path))
    for name, target in aliases.items():
        tensors[name] = tensors[target]
    result = model.load_state_dict(tensors, strict=False)
    if result.unexpected_keys:
        raise ValueError(f"{path}: tensors not in the model: {result.unexpected_keys[:5]}")


def rng_state() -> dict[str, Any]:
    """This process's RNG states (python, numpy if installed, torch CPU, current CUDA device)."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np

        name, keys, pos, has_gauss, gauss = np.random.get_state()
        state["numpy"] = (name, torch.from_numpy(keys.astype("int64")), pos, has_gauss, gauss)
    except ImportError:
        pass
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore states saved by `rng_state`."""
    random.setstate(_tuples(state["python"]))
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np

        name, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((name, keys.numpy().astype("uint32"), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _tuples(x: Any) -> Any:
    # random.setstate wants nested tuples, and some loaders hand lists back
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def write_checkpoint(
    path: Path,
    *,
    model: nn.Module | None,
    optimizer: Any,
    scheduler: Any,
    rng_states: list[dict],
    trainer_state: dict,
    trainable: set[int] | None = None,
    shards: Path | None = None,
) -> Path:
    """Write one checkpoint atomically to `path` (rank 0 only) and return it. `shards`: a
    directory the ranks already wrote their model and optimizer shards into (model and
    optimizer are then None); it becomes `path/shards` in the same atomic rename."""
    try:
        return _write_checkpoint(path, model, optimizer, scheduler, rng_states, trainer_state, trainable, shards)
    except (OSError, RuntimeError) as e:  # disk full (torch.save says RuntimeError), quota, permissions
        free = shutil.disk_usage(path.parent).free if path.parent.is_dir() else -1
        action = "cannot write the checkpoint (earlier checkpoints are kept"
        action += f"; {free} bytes free on its disk)" if 0 <= free < 2**20 else ")"
        raise file_problem(path, action, e) from None


def _write_checkpoint(path, model, optimizer, scheduler, rng_states, trainer_state, trainable, shards) -> Path:
    with atomic_dir(path) as tmp:
        if shards is not None:
            os.replace(shards, tmp / "shards")
        else:
            save_weights(model, tmp / "model.safetensors", trainable)
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(rng_states, tmp / "rng.pt")
        # written last: a directory holding it was written completely
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1))
    return path


def read_checkpoint(path: Path, model: nn.Module | None) -> dict[str, Any]:
    """Load weights into `model` (None: a sharded checkpoint, whose shards the strategy loads);
    return optimizer (None when sharded), scheduler, rng and trainer state."""
    if model is not None:
        try:
            load_weights(model, path / "model.safetensors")
        except Exception as e:  # safetensors raises its own error type for a corrupt header or data
            if isinstance(e, OSError) or type(e).__name__ == "SafetensorError":
                raise file_problem(path / "model.safetensors", "cannot read the checkpoint", e) from None
            raise
    optimizer = path / "optimizer.pt"
    return {
        "optimizer": torch.load(optimizer, map_location="cpu", weights_only=True) if model is not None else None,
        "scheduler": torch.load(path / "scheduler.pt", map_location="cpu", weights_only=True),
        "rng": torch.load(path / "rng.pt", map_location="cpu", weights_only=True),
        "trainer_state": json.loads((path / "trainer_state.json").read_text()),
    }
