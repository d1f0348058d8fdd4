"""What a stage says on the console besides its progress: warnings about silent adjustments
(truncation, synthetic pairs, many epochs), one line each, on the main process only."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable


def is_main_process() -> bool:
    """Rank 0 under torchrun (RANK unset in a plain process): only it writes and warns."""
    return os.environ.get("RANK", "0") == "0"


def warn(lines: str | Iterable[str]) -> None:
    """Print each line as `alignkit: warning: ...` to stderr (rank 0 only under torchrun)."""
    if not is_main_process():
        return
    for line in [lines] if isinstance(lines, str) else lines:
        print(f"alignkit: warning: {line}", file=sys.stderr, flush=True)
