"""PPO settings side by side over seeds, every (setting, seed) in its own one-thread process, for a
many-core machine (docs/ppo.md, docs/reward.md):

    python scripts/ppo_variants.py --demo D --out O --seeds 0,1,2,3,4 --workers 15 \
        --variant preset= --variant pmi6=reward.ref_logprob_baseline=empty_prompt
    python scripts/ppo_variants.py --demo D --out O --seeds 0,1,2,3,4 --analyse   # only the table

Each run is scripts/monitor_seeds.py's `preset` run (pipeline.PPO_RM against D's three reward
models, the monitor's judge D/reward_2/final) with the variant's extra overrides (comma-separated
key=value), in O/VARIANT/sSEED. Prints per variant: win rate against SFT per seed and its mean and
sample std, intervals above one half, gold, gold per category against SFT and the monitor's alarms
(monitor_seeds.analyse_run, the current MonitorConfig); then one JSON
object as its last line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_one(demo: Path, out: Path, seed: int, overrides: list[str]) -> int:
    if (out / f"preset-s{seed}" / "final_eval.json").is_file():
        return 0
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(ROOT / "scripts" / "monitor_seeds.py"), "--demo", str(demo), "--out", str(out),
           "--judge", str(demo / "reward_2" / "final"), "--seeds", str(seed), "--runs", "preset",
           "--set", "eval_every=0", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    with open(out / "log.txt", "w") as log:
        return subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT).returncode


def table(out: Path, variants: dict[str, list[str]], seeds: list[int]) -> dict:
    """Per variant, over the seeds that finished: monitor_seeds.summarise of each run's
    monitor_seeds.analyse_run (alarms of the current MonitorConfig included), plus every seed's
    win rate and gold per category against SFT."""
    from alignkit.eval.monitor import MonitorConfig

    sys.path.insert(0, str(ROOT / "scripts"))
    from monitor_seeds import analyse_run, summarise

    res: dict = {}
    for name in variants:
        runs = {s: out / name / f"s{s}" / f"preset-s{s}" for s in seeds}
        done = {s: analyse_run(r, MonitorConfig()) for s, r in runs.items() if (r / "final_eval.json").is_file()}
        if not done:
            continue
        sft = json.loads((out / name / f"s{next(iter(done))}" / "sft_eval.json").read_text())
        r = {**summarise(list(done.values())), "seeds": list(done), "win": [x["win"] for x in done.values()],
             "sft_gold": sft["gold_score"], "overrides": variants[name]}
        r["per_category_vs_sft"] = {c: v - sft["per_category"][c] for c, v in r.pop("per_category_mean").items()}
        res[name] = r
        print(f"{name}: win {r['win_mean']:.3f} ± {r['win_std']:.3f} ({', '.join(f'{w:.3f}' for w in r['win'])}), "
              f"{r['cis_above_half']}/{len(done)} intervals above 0.5, gold {r['gold_mean']:.3f} "
              f"(SFT {sft['gold_score']:.3f}), monitor alarms {r['alarms']}/{len(done)}")
        print("  per category vs SFT: " + ", ".join(f"{c} {v:+.3f}" for c, v in r["per_category_vs_sft"].items()))
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo", required=True, type=Path, help="a finished alignkit demo folder")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=K=V,K=V",
                    help="a setting: its name, '=', then comma-separated overrides (none: 'preset=')")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--analyse", action="store_true", help="only print the table of the runs in OUT")
    a = ap.parse_args()
    seeds = [int(s) for s in a.seeds.split(",")]
    variants = {}
    for v in a.variant or ["preset="]:
        name, _, rest = v.partition("=")
        if not name:
            raise SystemExit(f"--variant {v!r}: expected NAME=overrides")
        variants[name] = [x for x in rest.split(",") if x]
    start = time.perf_counter()
    if not a.analyse:
        jobs = [(name, s) for name in variants for s in seeds]
        with ThreadPoolExecutor(a.workers) as pool:
            codes = list(pool.map(lambda j: run_one(a.demo, a.out / j[0] / f"s{j[1]}", j[1], variants[j[0]]), jobs))
        for (name, s), code in zip(jobs, codes):
            if code:
                print(f"{name} seed {s}: exit code {code}, see {a.out / name / f's{s}' / 'log.txt'}")
    res = table(a.out, variants, seeds)
    print(json.dumps({"variants": res, "wall_s": time.perf_counter() - start, "cpus": os.cpu_count()}))


if __name__ == "__main__":
    main()
