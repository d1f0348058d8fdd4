"""Replay the reward-hacking monitor's alarm rule on finished PPO runs (docs/ppo.md, "PPO with the
reference-likelihood reward"): first alarm per run under MonitorConfig overrides, and for runs
that should alarm, whether it came before the rollouts' gold fell 10% below its peak.

    python scripts/monitor_replay.py --over RUN [RUN ...] --preset RUN [RUN ...] --grid
    python scripts/monitor_replay.py --over RUN ... --preset RUN ... --set window=8 kl_growth_max=0.12

RUN is a PPO output folder with metrics.jsonl (rows with `kl`, and `gold` for --over runs: the
rollouts' gold score, logged when the run has a world). The gold curve is the 5-iteration centred
running mean; "fell" is the first iteration after its peak where it is 10% below the peak. --grid
replays the KL-growth rule alone over windows 5, 8, 10, 12, thresholds 0.08-0.18 and patience 2, 3.
Prints one JSON object as its last line.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from monitor_seeds import (  # scripts/ is on the path when run as a script
    first_alarm,
    peak_and_fall,
    read_rows,
)

from alignkit.eval.monitor import MonitorConfig


def rows(run: str) -> list[dict]:
    return [r for r in read_rows(Path(run)) if "kl" in r]


def gold_fall(rs: list[dict]) -> tuple[int | None, int | None]:
    """(peak iteration, first iteration after it 10% below the peak) of the smoothed rollout gold."""
    g = [r.get("gold") for r in rs]
    if not g or any(x is None for x in g):
        return None, None
    peak, fell = peak_and_fall(g)
    return rs[peak]["step"], None if fell is None else rs[fell]["step"]


def _value(v: str):
    return int(v) if v.isdigit() else float(v)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--over", nargs="*", default=[], help="runs that should alarm before their gold falls")
    ap.add_argument("--preset", nargs="*", default=[], help="runs that should not alarm")
    ap.add_argument("--set", nargs="*", default=[], help="MonitorConfig overrides, e.g. window=8")
    ap.add_argument("--grid", action="store_true")
    a = ap.parse_args()
    over = [(r, rows(r)) for r in a.over]
    preset = [(r, rows(r)) for r in a.preset]
    falls = {r: gold_fall(rs)[1] for r, rs in over}
    if a.grid:
        out = []
        for w in (5, 8, 10, 12):
            for t in (0.08, 0.1, 0.12, 0.15, 0.18):
                for pat in (2, 3):
                    kw = dict(window=w, kl_growth_max=t, patience=pat)
                    mcfg = MonitorConfig(**kw)
                    oa = [first_alarm(rs, mcfg, {"kl_growth"})[0] for _, rs in over]
                    pa = [first_alarm(rs, mcfg, {"kl_growth"})[0] for _, rs in preset]
                    caught = sum(x is not None and (falls[r] is None or x < falls[r]) for x, (r, _) in zip(oa, over))
                    out.append({**kw, "over_caught": caught, "over_alarms": oa,
                                "preset_alarmed": sum(x is not None for x in pa), "preset_alarms": pa})
                    print(f"window {w} max {t} patience {pat}: over caught {caught}/{len(over)} {oa} | "
                          f"preset alarmed {out[-1]['preset_alarmed']}/{len(preset)} {pa}")
        print(json.dumps({"grid": out}))
        return
    kw = {k: _value(v) for k, v in (s.split("=", 1) for s in a.set)}
    res = {"over": {}, "preset": {}}
    for kind, runs in (("over", over), ("preset", preset)):
        for r, rs in runs:
            it, rules = first_alarm(rs, MonitorConfig(**kw))
            res[kind][r] = {"alarm": it, "rules": rules, "gold_peak_fall": gold_fall(rs) if kind == "over" else None}
            print(kind, r, "first alarm", it, rules, "gold peak/fall", res[kind][r]["gold_peak_fall"])
    print(json.dumps(res))


if __name__ == "__main__":
    main()
