"""The demo's iterate round 2 (`alignkit.pipeline.second_round`) on an existing run: the SFT model
in D/sft/final, a round-1 PPO policy and the reward data it was trained on.

    OMP_NUM_THREADS=1 python scripts/rlhf_round2.py D WORLD ROUND1_POLICY REWARD_DATA

Writes D/r2 (a demo folder: summary.json with `rounds`, report.md) and prints one JSON object
(the rounds and the wall time) as its last line.
"""

import json
import sys
import time
from pathlib import Path

from alignkit.pipeline import Demo, second_round


def main() -> None:
    run, world, policy, data = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4]
    start = time.perf_counter()
    d = Demo(run / "r2", False, 0, world_dir=world)
    d.evaluate("sft", str(run / "sft" / "final"))
    d.evaluate("ppo", policy)
    second_round(d, str(run / "sft" / "final"), policy, data)
    print(json.dumps({"rounds": d.summary["rounds"], "wall_s": time.perf_counter() - start}, default=str))


if __name__ == "__main__":
    main()
