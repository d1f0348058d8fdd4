"""The multi-seed demo: spreads by hand, and the orchestration (one world, one folder per seed,
a summary rewritten after every seed)."""

import json

import pytest

from alignkit import pipeline
from alignkit.eval.seeds import aggregate, render_markdown, spread


def _stage(gold, rate, lo, hi, kl=1.0):
    return {"gold_score": gold, "kl": kl, "wall_s": 10.0, "per_category": {"math": gold / 2},
            "win_rate_vs_sft": {"rate": rate, "lo": lo, "hi": hi, "n": 200}}


def test_spread_by_hand():
    """0.6, 0.7, 0.8: mean 0.7, sample variance (0.01 + 0 + 0.01) / 2 = 0.01, std 0.1."""
    s = spread([0.6, 0.7, 0.8])
    assert s["mean"] == pytest.approx(0.7) and s["std"] == pytest.approx(0.1)
    assert (s["min"], s["max"], s["n"]) == (0.6, 0.8, 3)
    assert spread([0.5])["std"] == 0.0


def test_aggregate_counts_intervals_above_half_and_keeps_common_stages():
    runs = {
        0: {"stages": {"sft": {"gold_score": 0.6, "kl": 0.0}, "ppo": _stage(0.70, 0.62, 0.55, 0.69)}},
        1: {"stages": {"sft": {"gold_score": 0.62, "kl": 0.0}, "ppo": _stage(0.66, 0.55, 0.48, 0.62),
                       "extra": {"gold_score": 1.0}}},
    }
    agg = aggregate(runs)
    assert agg["seeds"] == [0, 1] and list(agg["stages"]) == ["sft", "ppo"]
    ppo = agg["stages"]["ppo"]
    assert ppo["gold_score"]["mean"] == pytest.approx(0.68)
    assert ppo["win_rate_vs_sft"]["values"] == [0.62, 0.55] and ppo["win_rate_vs_sft"]["seeds_above_half"] == 1
    assert ppo["per_category"]["math"] == pytest.approx(0.34)
    assert "win_rate_vs_sft" not in agg["stages"]["sft"]
    md = render_markdown({**agg, "machine": "test", "world_seed": 0, "wall_s": 60.0})
    assert "| ppo | 0.680 ± 0.028 | 0.700, 0.660 | 0.58 ± 0.05 | 0.62 [0.55, 0.69], 0.55 [0.48, 0.62] | 1 of 2 |" in md
    assert "| ppo | 0.340 |" in md  # per category: (0.35 + 0.33) / 2; SFT has no category here, so no difference


def test_per_category_table_gives_the_difference_to_sft():
    runs = {s: {"stages": {"sft": {"gold_score": 0.6, "per_category": {"math": 0.5, "facts": 0.8}},
                           "ppo": {"gold_score": 0.7, "per_category": {"math": 0.3 + s / 10, "facts": 0.9}}}}
            for s in (0, 1)}
    md = render_markdown({**aggregate(runs), "wall_s": 60.0})
    assert "| stage | facts | math |" in md
    assert "| sft | 0.800 | 0.500 |" in md and "| ppo | 0.900 (+0.100) | 0.350 (-0.150) |" in md


def test_demo_seeds_shares_one_world_and_writes_after_each_seed(tmp_path, monkeypatch):
    calls = []

    def fake_demo(out, quick, seed, world_dir=None, round2=False):
        calls.append((out, seed, world_dir))
        assert (world_dir / "preferences.jsonl").is_file()
        # the summary of the earlier seeds is already on disk when a later seed runs
        if seed == 5:
            assert json.loads((tmp_path / "summary.json").read_text())["seeds"] == [3]
        return {"stages": {"ppo": _stage(0.6 + seed / 100, 0.6, 0.52, 0.68)}}

    monkeypatch.setattr(pipeline, "demo", fake_demo)
    monkeypatch.setattr("alignkit.world.write_world", lambda d, seed, n_pairs: (d.mkdir(parents=True),
                        (d / "preferences.jsonl").write_text("{}\n")))
    summary = pipeline.demo_seeds(tmp_path, [3, 5], quick=True)
    assert [c[1] for c in calls] == [3, 5] and {c[2] for c in calls} == {tmp_path / "world"}
    assert [c[0] for c in calls] == [tmp_path / "seed-3", tmp_path / "seed-5"]
    assert summary["stages"]["ppo"]["gold_score"]["values"] == pytest.approx([0.63, 0.65])
    assert "torch threads" in summary["machine"]
    assert "seed-5/report.html" in (tmp_path / "report.html").read_text()
    with pytest.raises(ValueError):
        pipeline.demo_seeds(tmp_path, [1, 1])
