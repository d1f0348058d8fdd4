"""The reward-hacking monitor's alarms in the demo report: read from synthetic metrics.jsonl rows,
drawn on the proxy/gold-vs-KL panels and named under the plot, for a run with alarms and not for
one without."""

import json

import pytest

from alignkit.eval import report

pytest.importorskip("matplotlib", reason="the report's plots need matplotlib")


def _rows(alarm_steps: set[int], n: int = 10, monitor: bool = True) -> list[dict]:
    """n iterations, KL 0.2 * step, the proxy rising, gold rising then falling; `monitor/alarm`
    (rules firing) 2 at the alarm steps, else 0 (absent with monitor=False)."""
    rows = []
    for step in range(1, n + 1):
        row = {"step": step, "kl": 0.2 * step, "reward": 0.1 * step, "gold": 0.5 + 0.02 * min(step, 6) - 0.03 * max(0, step - 6)}
        if monitor:
            row["monitor/alarm"] = 2.0 if step in alarm_steps else 0.0
        rows.append(row)
    return rows


def _run(tmp_path, runs: dict[str, list[dict]]) -> dict:
    stages = {"sft": {"dir": "sft", "gold_score": 0.6}}
    for name, rows in runs.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        stages[name] = {"dir": name, "gold_score": 0.6, "reward_source": "reward model"}
    return {"seed": 0, "stages": stages}


def test_alarm_marks_by_hand():
    rows = [{"step": 2, "kl": 0.5, "monitor/alarm": 0.0}, {"step": 4, "kl": 1.5, "monitor/alarm": 1.0},
            {"step": 3, "kl": 0.9, "monitor/alarm": 2.0}, {"step": 5, "kl": 2.0},  # no monitor key: no alarm
            {"step": 6, "monitor/alarm": 1.0}]  # no KL: cannot be placed on the panel
    assert report.alarm_marks(rows) == [{"step": 3, "kl": 0.9, "rules": 2}, {"step": 4, "kl": 1.5, "rules": 1}]
    assert report.alarm_marks(_rows(set())) == []


def test_alarms_in_plot_data_and_html_only_for_the_run_with_alarms(tmp_path, monkeypatch):
    summary = _run(tmp_path, {"overopt": _rows({7, 8, 10}), "ppo": _rows(set())})
    series = {s["name"]: s for s in report.reward_vs_kl_series(tmp_path, summary)}
    assert set(series) == {"overopt", "ppo"}
    assert [(m["step"], m["kl"]) for m in series["overopt"]["alarms"]] == [(7, pytest.approx(1.4)), (8, pytest.approx(1.6)),
                                                                           (10, pytest.approx(2.0))]
    assert series["ppo"]["alarms"] == []

    figs = []  # the figure itself, to read where the alarm line is drawn
    monkeypatch.setattr(report, "_png", lambda fig: figs.append(fig) or "PNG")
    page = report.render_html(summary, tmp_path)
    assert "overopt: first alarm at iteration 7 (KL 1.40), alarms on 3 of 10 iterations" in page
    assert "ppo: no alarm" in page
    kl_fig = next(f for f in figs if any("against KL" in ax.get_title() for ax in f.axes))
    panels = {ax.get_title().split(":")[0]: ax for ax in kl_fig.axes if ax.get_title()}

    def red_vertical(ax):
        return [ln.get_xdata()[0] for ln in ax.lines if ln.get_color() == "tab:red" and len(set(ln.get_xdata())) == 1
                and len(ln.get_xdata()) == 2]

    assert red_vertical(panels["overopt"]) == [pytest.approx(1.4)]
    ticks = [ln for ln in panels["overopt"].lines if ln.get_marker() == "|"]
    assert len(ticks) == 1 and list(ticks[0].get_xdata()) == pytest.approx([1.6, 2.0])
    assert red_vertical(panels["ppo"]) == [] and not [ln for ln in panels["ppo"].lines if ln.get_marker() == "|"]


def test_no_alarm_text_without_alarms_or_monitor(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "_png", lambda fig: "PNG")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    quiet = report.render_html(_run(tmp_path / "a", {"ppo": _rows(set())}), tmp_path / "a")
    assert "first alarm" not in quiet and "red line" not in quiet and "ppo: no alarm" in quiet
    unmonitored = report.render_html(_run(tmp_path / "b", {"ppo": _rows(set(), monitor=False)}), tmp_path / "b")
    assert "Reward-hacking monitor" not in unmonitored and "against KL" in unmonitored
