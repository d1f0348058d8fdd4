"""What a stage says on the console, the same for every stage (the supervised loop, the RL
stages, iterate): a header line when training starts, a progress display, and warnings about
silent adjustments (truncation, synthetic pairs, many epochs). All on stderr, so stdout keeps
the stage's closing JSON; all on the main process only."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable
from typing import Any, TextIO

PLAIN_EVERY_S = 15.0
"""Seconds between two progress lines when stderr is not a terminal (a log file)."""


def is_main_process() -> bool:
    """Rank 0 under torchrun (RANK unset in a plain process): only it writes and warns."""
    return os.environ.get("RANK", "0") == "0"


def warn(lines: str | Iterable[str]) -> None:
    """Print each line as `alignkit: warning: ...` to stderr (rank 0 only under torchrun)."""
    if not is_main_process():
        return
    for line in [lines] if isinstance(lines, str) else lines:
        print(f"alignkit: warning: {line}", file=sys.stderr, flush=True)


def header(stage: str, facts: Iterable[str], out: Any = None) -> None:
    """One line when a stage starts training: `alignkit sft: 300 examples, 38 steps (1.0 epochs),
    ... -> runs/sft` (rank 0 only)."""
    if not is_main_process():
        return
    tail = f" -> {out}" if out is not None else ""
    print(f"alignkit {stage}: {', '.join(facts)}{tail}", file=sys.stderr, flush=True)


def _clock(seconds: float) -> str:
    s = int(max(0.0, seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Progress:
    """Progress of `total` units (optimizer steps, RL iterations) on stderr, rank 0 only.

    On a terminal: a tqdm bar with the latest figures. Otherwise (a log file, a pipe): a plain
    line at the first unit, then at most one every `every_s` seconds, and at the last unit:
    `step 40/300 (13%) loss 1.2345 tok_s 812 | 0:52 elapsed, 5:38 left`.
    """

    def __init__(self, total: int, initial: int = 0, enabled: bool = True, unit: str = "step",
                 every_s: float = PLAIN_EVERY_S, stream: TextIO | None = None):
        self.stream = stream if stream is not None else sys.stderr
        self.total, self.n, self.start, self.unit, self.every_s = total, initial, initial, unit, every_s
        self.enabled = enabled and is_main_process()
        self.t0, self.printed = time.perf_counter(), None
        self.bar = None
        if self.enabled and getattr(self.stream, "isatty", lambda: False)():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, unit=unit, dynamic_ncols=True, file=self.stream)

    def update(self, n: int = 1, **shown: Any) -> None:
        """`n` more units done; `shown` are the figures to display (formatted strings or numbers)."""
        self.n += n
        if not self.enabled:
            return
        text = {k: f"{v:.4g}" if isinstance(v, float) else str(v) for k, v in shown.items()}
        if self.bar is not None:
            self.bar.set_postfix(text, refresh=False)
            self.bar.update(n)
            return
        now = time.perf_counter()
        if self.printed is None or now - self.printed >= self.every_s or self.n >= self.total:
            self.printed = now
            print(self.line(text, now), file=self.stream, flush=True)

    def line(self, shown: dict[str, str], now: float) -> str:
        elapsed, done = now - self.t0, self.n - self.start
        left = elapsed / done * (self.total - self.n) if done > 0 else 0.0
        figures = "".join(f" {k} {v}" for k, v in shown.items())
        pct = self.n / self.total if self.total else 1.0
        return (f"{self.unit} {self.n}/{self.total} ({pct:.0%}){figures} | "
                f"{_clock(elapsed)} elapsed, {_clock(left)} left")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
