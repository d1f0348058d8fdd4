"""`alignkit demo --jobs 2` computes what one process computes: the quick demo with iterate round 2,
stage by stage in worker processes against one after another, at one thread on both sides."""

import json

import pytest
import torch

from alignkit import pipeline

TIMING = {"wall_s", "peak_mem_mb", "threads", "jobs"}


def _figures(x):
    """The summary without timings (keys ending in _s), memory and thread counts (which differ by design)."""
    if isinstance(x, dict):
        return {k: _figures(v) for k, v in x.items() if k not in TIMING and not k.endswith("_s")}
    if isinstance(x, list):
        return [_figures(v) for v in x]
    return x


@pytest.mark.slow
def test_parallel_stages_give_the_same_demo(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        world = tmp_path / "world"
        one = pipeline.demo(tmp_path / "one", quick=True, seed=0, round2=True, jobs=1, world_dir=None)
        import shutil

        shutil.copytree(tmp_path / "one" / "world", world)
        two = pipeline.demo(tmp_path / "two", quick=True, seed=0, round2=True, jobs=2, world_dir=world)
    finally:
        torch.set_num_threads(threads)
    names = ["base", "sft", "reward", "dpo", "ppo", "overopt", "ppo_r2", "grpo", "cai"]
    assert list(one["stages"]) == list(two["stages"]) == names  # report order, whatever finished first
    assert {e["threads"] for e in two["stages"].values()} == {1} and two["jobs"] == 2
    a = json.loads(json.dumps(_figures(one["stages"])).replace(str(tmp_path / "one"), "OUT"))
    b = json.loads(json.dumps(_figures(two["stages"])).replace(str(tmp_path / "two"), "OUT"))
    assert a == b
    assert _figures(one["rounds"]) == json.loads(json.dumps(_figures(two["rounds"])).replace(
        str(tmp_path / "two"), str(tmp_path / "one")))
    for name in [n for n in names if n != "reward"]:  # the greedy answers the gold judge scored, byte for byte
        assert (tmp_path / "one" / name / "eval_responses.jsonl").read_bytes() == \
            (tmp_path / "two" / name / "eval_responses.jsonl").read_bytes(), name
    on_disk = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert list(on_disk["stages"]) == names and on_disk["wall_s"] > 0
