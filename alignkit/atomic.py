"""Atomic file writes (a temporary file beside the target, fsync, then rename over it), and the
plain JSONL reader for the files written here."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


class FileProblem(OSError):
    """A file alignkit reads or writes is unusable (corrupt, truncated, disk full): one line
    naming the file and the cause, printed by the CLI without a traceback."""


def file_problem(path: str | os.PathLike, action: str, err: BaseException) -> FileProblem:
    """A FileProblem for `err`, raised while `action` (e.g. "cannot load the model") on `path`."""
    text = str(err).strip()
    cause = getattr(err, "strerror", None) or (text.splitlines()[0] if text else type(err).__name__)
    return FileProblem(f"{path}: {action}: {cause} ({type(err).__name__})")


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to `path` so a reader never sees a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would hide results from other users
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def share_tree(path: str | os.PathLike) -> None:
    """Give `path` (a file, or a directory and everything in it) the modes the process umask
    allows: mkdtemp's 0700 and safetensors' 0600 would keep a saved model from other users."""
    umask = os.umask(0)
    os.umask(umask)
    path = Path(path)
    paths = [path] + (sorted(path.rglob("*")) if path.is_dir() else [])
    for p in paths:
        if p.is_symlink():
            continue
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~umask)


def write_json_atomic(path: str | os.PathLike, obj: Any, **dump_kwargs: Any) -> Path:
    """`obj` as JSON (json.dumps keyword arguments pass through) plus a newline, written atomically."""
    return write_text_atomic(path, json.dumps(obj, **dump_kwargs) + "\n")


def read_jsonl(path: str | os.PathLike, missing_ok: bool = False) -> list[dict]:
    """The objects of a JSONL file our own stages wrote (blank lines skipped); [] for a missing
    file when `missing_ok`. User data goes through alignkit.data.load, which reports bad lines.

    A torn LAST line (a write cut by a full disk or a kill: appends are not atomic) is skipped;
    a bad line anywhere else is corruption, a ValueError naming the file and line."""
    path = Path(path)
    if missing_ok and not path.is_file():
        return []
    lines = [(i, ln) for i, ln in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1)
             if ln.strip()]
    rows = []
    for k, (i, line) in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if k == len(lines) - 1:
                break
            raise ValueError(f"{path}:{i}: not valid JSON ({e.msg}); only a torn last line is skipped") from None
    return rows
