"""The multi-seed report of `alignkit demo --seeds` from finished one-seed demo runs, e.g. seeds run as
separate processes (on one world, each `pipeline.demo(OUT/seed-S, seed=S, world_dir=W)`, exactly
what `demo --seeds` runs per seed):

    python scripts/seed_report.py OUT RUN_DIR [RUN_DIR ...] [--wall-s SECONDS]

Reads each RUN_DIR/summary.json (its seed from the summary), writes OUT/summary.json, OUT/report.md
and OUT/report.html as `demo --seeds` does (alignkit.eval.seeds), and prints the summary's stages
as one JSON object. --wall-s: the wall time of the whole run to record (default: the sum of the
runs' stage times, which is the serial run's time only when the seeds ran one after another).
"""

import argparse
import json
from pathlib import Path

from alignkit.eval.seeds import aggregate, write_seed_reports
from alignkit.pipeline import machine


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--wall-s", type=float, default=None)
    args = ap.parse_args()
    runs = {}
    for d in args.runs:
        summary = json.loads((Path(d) / "summary.json").read_text())
        if summary["seed"] in runs:
            raise SystemExit(f"{d}/summary.json: seed {summary['seed']} given twice")
        runs[summary["seed"]] = summary
    runs = dict(sorted(runs.items()))
    first = next(iter(runs.values()))
    wall = args.wall_s if args.wall_s is not None else sum(
        s.get("wall_s", 0.0) for r in runs.values() for s in r["stages"].values())
    summary = {**aggregate(runs), "world_seed": json.loads(
        (Path(first["world"]["dir"]) / "world.json").read_text()).get("seed", "?"), "quick": first.get("quick", False),
        "machine": first.get("machine", machine()), "wall_s": wall, "runs": [str(Path(d)) for d in args.runs]}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_seed_reports(out, summary)
    print(json.dumps(summary["stages"], default=str))


if __name__ == "__main__":
    main()
