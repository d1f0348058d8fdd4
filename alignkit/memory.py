"""Peak memory of a block of code: GPU allocator peak on CUDA, sampled process RSS on CPU."""

from __future__ import annotations

import os
import threading
import time

import torch


class PeakMemory:
    """Context manager measuring peak memory in MB while the block runs.

    On CUDA it reads the allocator's peak (reset on entry). On CPU it samples the resident set
    size of this process every `interval` seconds: a sample can miss a short spike, so treat the
    figure as a lower bound to within one sampling interval.
    """

    def __init__(self, interval: float = 0.02):
        self.interval = interval
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _rss_mb(self) -> float:
        try:
            import psutil

            return psutil.Process(os.getpid()).memory_info().rss / 2**20
        except ImportError:  # Linux fallback
            with open(f"/proc/{os.getpid()}/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, self._rss_mb())
            time.sleep(self.interval)

    def __enter__(self) -> PeakMemory:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self.peak_mb = self._rss_mb()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak_mb = max(self.peak_mb, self._rss_mb())
        if torch.cuda.is_available():
            self.peak_mb = torch.cuda.max_memory_allocated() / 2**20
