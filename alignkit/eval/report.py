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
from pathlib import Path


def _fmt(v, digits: int = 3) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.{digits}f}"
    return str(v)


def _win_cell(s: dict) -> str:
    w = s.get("win_rate_vs_sft")
    if not isinstance(w, dict):
        return ""
    return f"{w['rate']:.2f} [{w['lo']:.2f}, {w['hi']:.2f}]"


def render_markdown(summary: dict) -> str:
    stages = summary["stages"]
    cats = sorted({c for s in stages.values() for c in s.get("per_category", {})})
    lines = [
        "# alignkit demo report",
        "",
        f"World seed {summary['seed']}, {'quick' if summary.get('quick') else 'full'} run on "
        f"{summary.get('machine', '?')}.",
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
            f"| {name} | {_fmt(s.get('gold_score'))} | {_win_cell(s)} | {_fmt(s.get('kl'), 2)} | {cells} | "
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
    return "\n".join(lines)


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

    stages = summary["stages"]
    cats = sorted({c for s in stages.values() for c in s.get("per_category", {})})
    if not cats:
        return None
    fig, ax = plt.subplots(figsize=(9, 3.6))
    width = 0.8 / max(1, len(stages))
    for i, (name, s) in enumerate(stages.items()):
        per = s.get("per_category", {})
        xs = [j + i * width for j in range(len(cats))]
        ax.bar(xs, [per.get(c, 0.0) for c in cats], width=width, label=f"{name} ({s.get('gold_score', 0):.2f})")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cats))], cats)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("gold score")
    ax.set_title("Gold score by category (overall in the legend)")
    ax.legend(fontsize=8, ncol=min(4, len(stages)))
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


def plot_reward_vs_kl(run_dir: Path, summary: dict) -> str | None:
    """Proxy (reward model) and gold reward against KL for the RL stages: Gao et al. 2022, Fig. 1."""
    import matplotlib.pyplot as plt

    series = []
    for name, s in summary["stages"].items():
        rows = _read_metrics(run_dir / s.get("dir", name) / "metrics.jsonl")
        pts = [r for r in rows if "kl" in r and ("reward" in r or "gold" in r)]
        if pts:
            series.append((name, pts))
    for name, path in summary.get("curves", {}).items():
        pts = [r for r in _read_metrics(Path(path)) if "kl" in r and ("reward" in r or "gold" in r)]
        if pts:
            series.append((name, pts))
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for name, pts in series:
        kl = [r["kl"] for r in pts]
        if any("reward" in r for r in pts):
            ax.plot(kl, [r.get("reward", float("nan")) for r in pts], "-", label=f"{name}: proxy reward")
        if any("gold" in r for r in pts):
            ax.plot(kl, [r.get("gold", float("nan")) for r in pts], "--", label=f"{name}: gold score")
    ax.set_xlabel("KL(policy || reference)")
    ax.set_ylabel("reward")
    ax.set_title("Reward against KL: proxy vs gold (over-optimisation shows as a gap)")
    ax.legend(fontsize=8)
    return _png(fig)


def plot_beta_sweep(summary: dict) -> str | None:
    import matplotlib.pyplot as plt

    sweep = summary.get("beta_sweep")
    if not sweep:
        return None
    betas = [r["beta"] for r in sweep]
    fig, ax1 = plt.subplots(figsize=(6, 3.4))
    ax1.semilogx(betas, [r["gold_score"] for r in sweep], "o-", label="gold score")
    ax1.set_xlabel("DPO beta")
    ax1.set_ylabel("gold score")
    ax2 = ax1.twinx()
    ax2.semilogx(betas, [r["kl"] for r in sweep], "s--", color="tab:red", label="KL to SFT")
    ax2.set_ylabel("KL")
    ax1.set_title("DPO beta sweep")
    fig.legend(fontsize=8, loc="upper right")
    return _png(fig)


def render_html(summary: dict, run_dir: Path) -> str:
    md = render_markdown(summary)
    plots = [
        ("Gold score by category", plot_gold_by_category(summary)),
        ("Win rate against SFT", plot_win_rates(summary)),
        ("Training curves", plot_training_curves(run_dir, summary)),
        ("Reward against KL", plot_reward_vs_kl(run_dir, summary)),
        ("DPO beta sweep", plot_beta_sweep(summary)),
    ]
    table = _md_table_to_html(md)
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>alignkit report</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}"
        "td:first-child,th:first-child{text-align:left}img{max-width:100%}</style></head><body>",
        "<h1>alignkit demo report</h1>",
        table,
    ]
    for title, img in plots:
        if img:
            parts.append(f"<h2>{html.escape(title)}</h2><img alt='{html.escape(title)}' src='data:image/png;base64,{img}'>")
    parts.append("</body></html>")
    return "\n".join(parts)


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
            elif line.strip():
                out.append(f"<p>{html.escape(line)}</p>")
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
