"""The demo's iterate round 2 (`alignkit.pipeline.second_round`) on an existing demo run: its SFT
model (D/sft/final), its round-1 reward ensemble (D/summary.json `stages.reward`), its reward data
(D/reward_data.jsonl) and a round-1 PPO policy trained against that ensemble.

    OMP_NUM_THREADS=1 python scripts/rlhf_round2.py D ROUND1_POLICY OUT --seed S \
        [--pairs policy|cross] [--reward-init sft|round1] [--ppo-init round1|sft] [--set KEY=VALUE ...] [--quick]

--set overrides replace round 2's PPO overrides (pipeline.PPO_ROUND2) key by key. The labelled
pairs are cached in OUT/../pairs-{policy|cross}-sS.jsonl (they depend only on the round-1 policy,
the pair kind and the seed), so variants on one seed label once. Writes OUT (a demo folder:
summary.json with `rounds`, report.md) and prints one JSON object (the rounds, the head-to-head
against round 1 and the wall time) as its last line.
"""

import argparse
import dataclasses
import json
import time
from pathlib import Path

from alignkit.pipeline import Demo, Round2, round2_pairs, second_round


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("demo")
    ap.add_argument("policy")
    ap.add_argument("out")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pairs", default=Round2.pairs)
    ap.add_argument("--reward-init", default=Round2.reward_init)
    ap.add_argument("--ppo-init", default=Round2.ppo_init)
    ap.add_argument("--set", nargs="*", default=[])
    ap.add_argument("--quick", action="store_true", help="the demo's --quick sizes (a smoke test of the wiring)")
    args = ap.parse_args()
    run, out = Path(args.demo), Path(args.out)
    keys = {o.split("=", 1)[0]: o for o in Round2.ppo}
    keys.update({o.split("=", 1)[0]: o for o in args.set})
    opts = Round2(pairs=args.pairs, reward_init=args.reward_init, ppo_init=args.ppo_init, ppo=tuple(keys.values()))
    start = time.perf_counter()
    d = Demo(out, args.quick, args.seed, world_dir=run / "world")
    d.summary["stages"]["reward"] = {k: v for k, v in json.loads((run / "summary.json").read_text())["stages"]["reward"].items()
                                     if k in ("model", "ensemble")}
    sft = str(run / "sft" / "final")
    d.evaluate("sft", sft)
    d.evaluate("ppo", args.policy)
    cache = out.parent / f"pairs-{opts.pairs}-s{args.seed}{'-quick' if args.quick else ''}.jsonl"
    if cache.is_file():
        rows = json.loads(cache.read_text())
    else:
        rows = round2_pairs(d, sft, args.policy, opts)
        cache.write_text(json.dumps(rows))
    second_round(d, sft, args.policy, run / "reward_data.jsonl", opts, rows=(rows[0], rows[1]))
    st = d.summary["stages"]
    print(json.dumps({"round2": dataclasses.asdict(opts), "seed": args.seed, "pairs": rows[1],
                      "gold": [r["gold_score"] for r in d.summary["rounds"]],
                      "vs_round1": st["ppo_r2"]["win_rate_vs_round1"],
                      "per_category": {r["stage"]: r["per_category"] for r in d.summary["rounds"]},
                      "wall_s": time.perf_counter() - start}, default=str))


if __name__ == "__main__":
    main()
