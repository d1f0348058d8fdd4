"""Figures over several seeds of the demo: one run's figure is one draw (the same seed gives
another model on another CPU), so `alignkit demo --seeds 0,1,2` reports each stage's mean, its
spread and every seed's value (summary.json, report.md, report.html)."""

from __future__ import annotations

import html
import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path

from alignkit.atomic import write_json_atomic, write_text_atomic


def spread(values: Sequence[float]) -> dict[str, float | list[float] | int]:
    """mean, sample standard deviation (0 for one value), min, max and the values themselves."""
    vals = [float(v) for v in values]
    return {
        "mean": statistics.fmean(vals),
        "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
        "min": min(vals),
        "max": max(vals),
        "n": len(vals),
        "values": vals,
    }


def aggregate(runs: Mapping[int, dict]) -> dict:
    """The per-seed demo summaries (seed -> summary.json) as one summary of spreads.

    For every stage that all seeds ran: gold score, KL, wall time, the win rate against SFT with
    every seed's 95% interval and how many intervals lie above one half, and the gold score per
    category.
    """
    seeds = list(runs)
    names = [n for n in runs[seeds[0]]["stages"] if all(n in runs[s]["stages"] for s in seeds)]
    stages: dict[str, dict] = {}
    for name in names:
        per = [runs[s]["stages"][name] for s in seeds]
        entry: dict = {}
        for key in ("gold_score", "kl", "wall_s"):
            vals = [p[key] for p in per if isinstance(p.get(key), (int, float)) and math.isfinite(p[key])]
            if len(vals) == len(per):
                entry[key] = spread(vals)
        wins = [p.get("win_rate_vs_sft") for p in per]
        if all(isinstance(w, dict) for w in wins):
            entry["win_rate_vs_sft"] = spread([w["rate"] for w in wins])
            entry["win_rate_vs_sft"]["intervals"] = [[w["lo"], w["hi"]] for w in wins]
            entry["win_rate_vs_sft"]["seeds_above_half"] = sum(1 for w in wins if w["lo"] > 0.5)
        cats = sorted(set.intersection(*(set(p.get("per_category", {})) for p in per)))
        if cats:
            entry["per_category"] = {c: spread([p["per_category"][c] for p in per])["mean"] for c in cats}
        stages[name] = entry
    return {"seeds": seeds, "stages": stages}


def _cell(s: dict | None, digits: int = 3) -> str:
    if not s:
        return ""
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"


def render_markdown(summary: dict) -> str:
    """A table of means ± standard deviations with every seed's value."""
    seeds = summary["seeds"]
    lines = [
        f"# alignkit demo over {len(seeds)} seeds ({', '.join(map(str, seeds))})",
        "",
        f"Machine: {summary.get('machine', '?')}; world seed {summary.get('world_seed', '?')}; "
        f"wall time {summary.get('wall_s', float('nan')) / 60:.1f} min in all. Each seed trains every stage "
        "anew (pre-training included) on the same world. mean ± sample std over seeds; "
        "per seed in seed order. Win rate against SFT: ties count half; an interval is that seed's "
        "95% Wilson interval.",
        "",
        "| stage | gold score | gold per seed | win rate vs SFT | win per seed [95% CI] | CIs above 0.5 | KL | wall s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, s in summary["stages"].items():
        gold = s.get("gold_score")
        win = s.get("win_rate_vs_sft")
        per_gold = ", ".join(f"{v:.3f}" for v in gold["values"]) if gold else ""
        per_win = ", ".join(f"{v:.2f} [{lo:.2f}, {hi:.2f}]" for v, (lo, hi) in zip(win["values"], win["intervals"])) \
            if win else ""
        above = f"{win['seeds_above_half']} of {win['n']}" if win else ""
        lines.append(f"| {name} | {_cell(gold)} | {per_gold} | {_cell(win, 2)} | {per_win} | {above} | "
                     f"{_cell(s.get('kl'), 2)} | {_cell(s.get('wall_s'), 0)} |")
    cats = sorted({c for s in summary["stages"].values() for c in s.get("per_category", {})})
    if cats:
        sft = summary["stages"].get("sft", {}).get("per_category", {})
        lines += ["", "Gold score per category, mean over seeds (in brackets: minus SFT's mean):", "",
                  "| stage | " + " | ".join(cats) + " |", "|---|" + "---|" * len(cats)]
        for name, s in summary["stages"].items():
            per = s.get("per_category")
            if per:
                lines.append(f"| {name} | " + " | ".join(
                    f"{per[c]:.3f}" + (f" ({per[c] - sft[c]:+.3f})" if name != "sft" and c in sft else "")
                    if c in per else "" for c in cats) + " |")
    return "\n".join(lines) + "\n"


def write_seed_reports(out: Path, summary: dict) -> None:
    """OUT/summary.json, OUT/report.md and a plain OUT/report.html of the multi-seed summary."""
    from alignkit.eval.report import _md_table_to_html

    write_json_atomic(out / "summary.json", summary, indent=2, default=str)
    md = render_markdown(summary)
    write_text_atomic(out / "report.md", md)
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>alignkit demo over seeds</title>"
            "<style>body{font-family:sans-serif;max-width:1200px;margin:2em auto}table{border-collapse:collapse;"
            "font-size:13px}td,th{border:1px solid #ccc;padding:3px 7px}</style></head><body>"
            f"<h1>{html.escape(md.splitlines()[0][2:])}</h1>{_md_table_to_html(md)}"
            "<p>Each seed's own report: " + ", ".join(
                f"<a href='seed-{s}/report.html'>seed {s}</a>" for s in summary["seeds"]) + "</p></body></html>")
    write_text_atomic(out / "report.html", page)
