"""The demo report: report.md (tables) and one self-contained report.html (plots embedded as PNG).

Both are rendered from summary.json plus each stage's metrics.jsonl, so a report can be
rebuilt from a finished run directory: `write_reports(run_dir)`.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path


def _fmt(v, digits: int = 3) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.{digits}f}"
    return str(v)


def win_cell(s: dict, missing: str = "", with_n: bool = False) -> str:
    """A stage's win rate against SFT as 'rate [lo, hi]' (plus '(n=N)'), or `missing`."""
    w = s.get("win_rate_vs_sft")
    if not isinstance(w, dict):
        return missing
    return f"{w['rate']:.2f} [{w['lo']:.2f}, {w['hi']:.2f}]" + (f" (n={w['n']})" if with_n else "")


SMOKE_TEST = (
    "**Smoke test** (`--quick`): tiny models trained for a few steps, to check that every stage runs. "
    "Its figures say nothing about alignment (the models may all give the same answer); run "
    "`alignkit demo` without `--quick` for those."
)


def _jobs_note(summary: dict) -> str:
    """", 2 stages at a time (own processes), 12.3 min in all" when the summary has them."""
    jobs, wall = summary.get("jobs"), summary.get("wall_s")
    note = f", {jobs} stages at a time (each in its own process)" if isinstance(jobs, int) and jobs > 1 else ""
    return note + (f", {wall / 60:.1f} min in all" if isinstance(wall, (int, float)) else "")


def render_markdown(summary: dict) -> str:
    stages = summary["stages"]
    cats = sorted({c for s in stages.values() for c in s.get("per_category", {})})
    lines = [
        f"# {summary.get('title', 'alignkit demo report')}",
        "",
        *([SMOKE_TEST, ""] if summary.get("quick") else []),
        f"World seed {summary['seed']}, {'quick' if summary.get('quick') else 'full'} run on "
        f"{summary.get('machine', '?')}" + _jobs_note(summary) + ".",
        "Gold score: mean score of the world's gold judge over held-out prompts (0 worst, 1 best). "
        "Win rate: share of held-out prompts where the stage's answer beats the SFT model's "
        "(gold judge, ties count half) with a 95% interval. KL: KL(policy || SFT) per response, "
        "estimated by sampling.",
        "",
        "| stage | gold score | win rate vs SFT | KL | " + " | ".join(cats) + " | wall s | peak MB |",
        "|---|---|---|---|" + "---|" * len(cats) + "---|---|",
    ]
    for name, s in stages.items():
        per = s.get("per_category", {})
        cells = " | ".join(_fmt(per.get(c)) for c in cats)
        lines.append(
            f"| {name} | {_fmt(s.get('gold_score'))} | {win_cell(s)} | {_fmt(s.get('kl'), 2)} | {cells} | "
            f"{_fmt(s.get('wall_s'), 1)} | {_fmt(s.get('peak_mem_mb'), 0)} |"
        )
    extra = [(n, s) for n, s in stages.items() if s.get("notes")]
    if extra:
        lines += ["", "## Notes", ""]
        lines += [f"- **{n}**: {s['notes']}" for n, s in extra]
    lines += [
        "",
        "Wall time and peak memory are for the stage that made the model (training, plus its "
        "reference-model or rollout work); 'base' is the pre-trained model.",
        "",
    ]
    lines += _comparison_section(summary)
    return "\n".join(lines)


def _comparison_section(summary: dict) -> list[str]:
    """The usual RLHF-vs-DPO table of claims, measured, when both stages ran; the DPO beta sweep."""
    from alignkit.eval.compare import render_beta_sweep, render_comparison

    stages = summary["stages"]
    lines: list[str] = []
    if "dpo" in stages and "ppo" in stages:
        lines += [
            "## RLHF (PPO) vs DPO, measured",
            "",
            "The usual RLHF-vs-DPO table of claims, with each claim next to what the same task and the same "
            "SFT model measured (docs/evaluation.md, 'RLHF vs DPO, measured', defines every figure). "
            "Model states: weights, plus gradients and two AdamW moments for trained models. "
            "Reward hacking: win rate against SFT by the proxy the method optimised minus the win "
            "rate by the gold judge, on the same held-out answers (0: the proxy ranks as gold does). "
            "Hyperparameters: knobs of the method's own config section, plus the model/data/optimizer "
            "knobs both share.",
            "",
            render_comparison(summary),
            "",
        ]
    sweep = render_beta_sweep(summary)
    if sweep:
        lines += [
            "## DPO beta sweep",
            "",
            "Short DPO runs from the SFT model, one per beta, otherwise identical; gold score and KL "
            "to SFT measured as above. The usual advice: too small a beta drifts far from SFT, too large "
            "barely moves.",
            "",
            sweep,
            "",
        ]
    return lines


def _read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def plot_gold_by_category(summary: dict) -> str | None:
    import matplotlib.pyplot as plt

    stages = {k: s for k, s in summary["stages"].items() if s.get("per_category")}  # not the reward model
    cats = sorted({c for s in stages.values() for c in s["per_category"]})
    if not cats:
        return None
    fig, ax = plt.subplots(figsize=(9, 3.9))
    width = 0.8 / max(1, len(stages))
    for i, (name, s) in enumerate(stages.items()):
        per = s.get("per_category", {})
        xs = [j + i * width for j in range(len(cats))]
        ax.bar(xs, [per.get(c, 0.0) for c in cats], width=width, label=f"{name} ({s.get('gold_score', 0):.2f})")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cats))], cats)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("gold score")
    ax.set_title("Gold score by category (overall in the legend)")
    ax.legend(fontsize=8, ncol=min(8, len(stages)), loc="upper center", bbox_to_anchor=(0.5, -0.1), frameon=False)
    fig.tight_layout()
    return _png(fig)


def plot_win_rates(summary: dict) -> str | None:
    import matplotlib.pyplot as plt

    rows = [(n, s["win_rate_vs_sft"]) for n, s in summary["stages"].items() if isinstance(s.get("win_rate_vs_sft"), dict)]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(6, 0.6 + 0.5 * len(rows)))
    for i, (_, w) in enumerate(rows):
        ax.errorbar([w["rate"]], [i], xerr=[[w["rate"] - w["lo"]], [w["hi"] - w["rate"]]], fmt="o", capsize=4)
    ax.axvline(0.5, color="grey", ls="--", lw=1)
    ax.set_yticks(range(len(rows)), [n for n, _ in rows])
    ax.set_xlim(0, 1)
    ax.set_xlabel("win rate vs SFT (gold judge, ties half), 95% interval")
    return _png(fig)


def plot_training_curves(run_dir: Path, summary: dict) -> str | None:
    import matplotlib.pyplot as plt

    curves = []
    for name, s in summary["stages"].items():
        rows = _read_metrics(run_dir / s.get("dir", name) / "metrics.jsonl")
        pts = [(r["step"], r["loss"]) for r in rows if isinstance(r.get("loss"), (int, float))]
        if pts:
            curves.append((name, pts))
    if not curves:
        return None
    fig, axes = plt.subplots(1, len(curves), figsize=(3.2 * len(curves), 2.8), squeeze=False)
    for ax, (name, pts) in zip(axes[0], curves):
        ax.plot([p[0] for p in pts], [p[1] for p in pts])
        ax.set_title(f"{name}: loss", fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    return _png(fig)


def binned_means(x: Sequence[float], y: Sequence[float], bins: int) -> tuple[list[float], list[float]]:
    """Means of x and of y over `bins` consecutive groups of the points sorted by x (group sizes
    differ by at most one; NaN y values are left out of their group's mean, a group of NaNs only
    is dropped): the trend line drawn through noisy per-iteration points."""
    order = sorted(range(len(x)), key=lambda i: x[i])
    bins = max(1, min(bins, len(order)))
    out_x, out_y = [], []
    for b in range(bins):
        group = order[b * len(order) // bins:(b + 1) * len(order) // bins]
        ys = [y[i] for i in group if y[i] == y[i]]
        if ys:
            out_x.append(sum(x[i] for i in group) / len(group))
            out_y.append(sum(ys) / len(ys))
    return out_x, out_y


def alarm_marks(rows: Sequence[dict]) -> list[dict]:
    """The monitor's alarms in a run's metrics rows: one {"step", "kl", "rules"} per iteration whose
    `monitor/alarm` (the number of alarm rules firing, docs/ppo.md) is above 0, in step order.
    "kl" is that iteration's KL(policy || reference) per response, where the panel draws it."""
    marks = [{"step": r.get("step"), "kl": r["kl"], "rules": int(r["monitor/alarm"])} for r in rows
             if isinstance(r.get("monitor/alarm"), (int, float)) and r["monitor/alarm"] > 0 and "kl" in r]
    return sorted(marks, key=lambda m: (m["step"] is None, m["step"] or 0))


def reward_vs_kl_series(run_dir: Path, summary: dict) -> list[dict]:
    """The data of the proxy/gold-vs-KL panels: one {"name", "source", "points", "alarms"} per RL
    run with usable rows. Reads every metrics.jsonl row with "kl" and "reward" or "gold": the
    stages' own (RUN/DIR/metrics.jsonl) and the files in summary["curves"] ({name: path});
    "alarms" are the run's `alarm_marks`."""
    def usable(rows: list[dict]) -> list[dict]:
        return [r for r in rows if "kl" in r and ("reward" in r or "gold" in r)]

    found = [(name, s.get("reward_source"), run_dir / s.get("dir", name) / "metrics.jsonl")
             for name, s in summary["stages"].items()]
    found += [(name, None, Path(path)) for name, path in summary.get("curves", {}).items()]
    series = []
    for name, source, path in found:
        rows = _read_metrics(path)
        pts = usable(rows)
        if pts:
            series.append({"name": name, "source": source, "points": pts, "alarms": alarm_marks(rows)})
    return series


def alarm_caption(series: Sequence[dict]) -> str | None:
    """One sentence per panel on its monitor alarms (first alarm's iteration and KL, how many
    iterations alarmed), or None when no run logged the monitor."""
    parts = []
    for s in series:
        if not any("monitor/alarm" in r for r in s["points"]):
            continue
        a = s["alarms"]
        parts.append(f"{s['name']}: no alarm" if not a else
                     f"{s['name']}: first alarm at iteration {a[0]['step']} (KL {a[0]['kl']:.2f}), "
                     f"alarms on {len(a)} of {len(s['points'])} iterations")
    if not parts:
        return None
    legend = ("the red line marks the first alarm's KL, the red ticks at the top every later alarm iteration. "
              if any(s["alarms"] for s in series) else "")
    return "Reward-hacking monitor (no gold judge; docs/ppo.md): " + legend + "; ".join(parts) + "."


def plot_reward_vs_kl(run_dir: Path, summary: dict, series: Sequence[dict] | None = None) -> str | None:
    """Proxy and gold reward against KL for the RL stages, one panel each (Gao et al. 2022,
    Fig. 1: over-optimisation shows as a proxy that keeps rising while gold stalls or falls), with
    the reward-hacking monitor's alarms.

    The data are `reward_vs_kl_series` (read here unless given). The proxy is the score the policy
    optimised (PPO: the normalised reward-model score), on its own axis; gold is the gold judge's
    mean score of the same sampled responses. Points are iterations, placed at the per-response
    KL(policy || reference) of that iteration's samples; the lines join the means of about 8
    consecutive groups of them by KL (`binned_means`), since one iteration's rollout batch is
    noisy. A red vertical line marks the KL of the monitor's first alarm; red ticks at the top the
    KL of every later alarm iteration (KL is noisy, so they need not lie right of the line).
    """
    import matplotlib.pyplot as plt

    series = reward_vs_kl_series(run_dir, summary) if series is None else series
    if not series:
        return None
    ncols = min(2, len(series))
    nrows = -(-len(series) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.4 * ncols, 3.6 * nrows), squeeze=False)
    for ax in axes.flat[len(series):]:
        ax.set_visible(False)
    for ax, s in zip(axes.flat, series):
        pts = s["points"]
        kl = [r["kl"] for r in pts]
        bins = min(8, max(1, len(pts) // 4))
        handles = []
        for key, axis, marker, color, label in (
            ("reward", ax, "o", "tab:blue", f"proxy ({s['source'] or 'reward optimised'})"),
            ("gold", None, "s", "tab:orange", "gold score"),
        ):
            if not any(key in r for r in pts):
                continue
            axis = axis or ax.twinx()
            y = [r.get(key, float("nan")) for r in pts]
            axis.plot(kl, y, marker, ms=2.5, alpha=0.3, color=color, lw=0)
            handles += axis.plot(*binned_means(kl, y, bins), marker + "-", ms=4, lw=1.6, color=color, label=label)
            axis.set_ylabel("proxy reward" if key == "reward" else "gold score", color=color)
        if s["alarms"]:
            first = s["alarms"][0]
            handles.append(ax.axvline(first["kl"], color="tab:red", lw=1.4,
                                      label=f"monitor alarm (iteration {first['step']})"))
            later = [m["kl"] for m in s["alarms"][1:]]
            if later:
                ax.plot(later, [0.97] * len(later), "|", ms=8, color="tab:red", transform=ax.get_xaxis_transform())
        ax.set_xlabel("KL(policy || reference) per response")
        ax.set_title(f"{s['name']}: proxy and gold against KL", fontsize=10)
        ax.legend(handles=handles, fontsize=8, loc="lower right")
    fig.tight_layout()
    return _png(fig)


def plot_beta_sweep(summary: dict) -> str | None:
    """Gold score and KL to SFT against DPO's beta. The axes start at 0 (KL) and span at least
    0.1 (gold), so differences inside the evaluation's noise do not look like a trend."""
    import matplotlib.pyplot as plt

    sweep = sorted(summary.get("beta_sweep") or [], key=lambda r: r["beta"])
    if not sweep:
        return None
    betas = [r["beta"] for r in sweep]
    gold, kl = [r["gold_score"] for r in sweep], [r["kl"] for r in sweep]
    fig, ax1 = plt.subplots(figsize=(6, 3.4))
    handles = ax1.semilogx(betas, gold, "o-", label="gold score")
    mid, half = (max(gold) + min(gold)) / 2, max(0.05, (max(gold) - min(gold)) / 2 + 0.01)
    ax1.set_ylim(mid - half, mid + half)
    ax1.set_xlabel("DPO beta")
    ax1.set_ylabel("gold score")
    ax2 = ax1.twinx()
    handles += ax2.semilogx(betas, kl, "s--", color="tab:red", label="KL to SFT")
    ax2.set_ylim(min(0.0, min(kl)), max(kl) * 1.15 + 1e-9)
    ax2.set_ylabel("KL to SFT")
    ax1.set_title("DPO beta sweep")
    ax1.legend(handles=handles, fontsize=8, loc="lower left")
    return _png(fig)


def render_html(summary: dict, run_dir: Path) -> str:
    md = render_markdown(summary)
    rl = reward_vs_kl_series(run_dir, summary)
    plots = [
        ("Gold score by category", plot_gold_by_category(summary), None),
        ("Win rate against SFT", plot_win_rates(summary), None),
        ("Training curves", plot_training_curves(run_dir, summary), None),
        ("Over-optimisation: proxy and gold reward against KL", plot_reward_vs_kl(run_dir, summary, rl),
         alarm_caption(rl)),
        ("DPO beta sweep", plot_beta_sweep(summary), None),
    ]
    table = _md_table_to_html(md)
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>alignkit report</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}"
        "td:first-child,th:first-child{text-align:left}img{max-width:100%}</style></head><body>",
        f"<h1>{html.escape(summary.get('title', 'alignkit demo report'))}</h1>",
        table,
    ]
    for title, img, caption in plots:
        if img:
            parts.append(f"<h2>{html.escape(title)}</h2><img alt='{html.escape(title)}' src='data:image/png;base64,{img}'>")
            if caption:
                parts.append(f"<p class='alarms'>{html.escape(caption)}</p>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _inline(text: str) -> str:
    """Escape text and turn markdown's **bold** into <b> and `code` into <code>."""
    import re

    bold = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", html.escape(text))
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", bold)


def _md_table_to_html(md: str) -> str:
    out, in_table = [], False
    for line in md.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if set("".join(cells)) <= set("-"):
                continue
            tag = "th" if not in_table else "td"
            if not in_table:
                out.append("<table>")
                in_table = True
            out.append("<tr>" + "".join(f"<{tag}>{html.escape(c)}</{tag}>" for c in cells) + "</tr>")
        else:
            if in_table:
                out.append("</table>")
                in_table = False
            if line.startswith("# "):
                continue
            if line.startswith("## "):
                out.append(f"<h2>{html.escape(line[3:])}</h2>")
            elif line.startswith("- "):
                out.append(f"<p>&bull; {_inline(line[2:])}</p>")
            elif line.strip():
                out.append(f"<p>{_inline(line)}</p>")
    if in_table:
        out.append("</table>")
    return "\n".join(out)


def write_reports(run_dir: str | Path, summary: dict | None = None) -> tuple[Path, Path]:
    """Write run_dir/report.md and run_dir/report.html (atomically) from summary.json."""
    from alignkit.eval.gold import write_text_atomic

    run_dir = Path(run_dir)
    if summary is None:
        summary = json.loads((run_dir / "summary.json").read_text())
    md_path, html_path = run_dir / "report.md", run_dir / "report.html"
    write_text_atomic(md_path, render_markdown(summary))
    write_text_atomic(html_path, render_html(summary, run_dir))
    return md_path, html_path
