"""CAI revise and label for tests/test_cai_distributed.py, in one process or under torchrun.

    python tests/_cai_dist_worker.py ROOT TAG
    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/_cai_dist_worker.py ROOT TAG

ROOT holds the tiny model (ROOT/model) and ROOT/prompts.jsonl; the outputs go to
ROOT/TAG-revise and ROOT/TAG-label.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from alignkit.feedback.cai import LabelConfig, ReviseConfig, label, revise  # noqa: E402


def main(root: Path, tag: str) -> None:
    model, prompts = str(root / "model"), str(root / "prompts.jsonl")
    revise(ReviseConfig(model=model, prompts=prompts, out=str(root / f"{tag}-revise"), n_rounds=2,
                        max_new_tokens=6, temperature=1.0, critique_temperature=0.7, batch_size=4, seed=1))
    label(LabelConfig(policy=model, feedback=model, prompts=prompts, out=str(root / f"{tag}-label"),
                      n_principles=2, max_new_tokens=6, batch_size=4, seed=2))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
