"""The demo's iterate round 2 options (pipeline.Round2): the reward data each reward_init trains on,
and the checks on the options. The wiring of the whole stage is tested by the quick demo
(tests/test_cli.py, --round2)."""

import json
from types import SimpleNamespace

import pytest

from alignkit.pipeline import Round2, round2_reward_data


def _old(tmp_path, n=10):
    path = tmp_path / "old.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"p{i}", "chosen": "a", "rejected": "b"}) + "\n" for i in range(n)))
    return path


def test_afresh_trains_on_all_old_pairs_plus_the_new(tmp_path):
    d = SimpleNamespace(out=tmp_path, seed=0)
    new = [{"prompt": "q", "chosen": "x", "rejected": "y", "category": "facts"}]
    rows = [json.loads(line) for line in round2_reward_data(d, _old(tmp_path), new, Round2()).read_text().splitlines()]
    assert [r["prompt"] for r in rows] == [f"p{i}" for i in range(10)] + ["q"]


def test_continued_reward_models_replay_a_seeded_draw_of_the_old_pairs(tmp_path):
    new = [{"prompt": "q", "chosen": "x", "rejected": "y"}]
    old = _old(tmp_path)

    def prompts(seed, replay):
        d = SimpleNamespace(out=tmp_path, seed=seed)
        path = round2_reward_data(d, old, new, Round2(reward_init="round1", replay=replay))
        return [json.loads(line)["prompt"] for line in path.read_text().splitlines()]

    first = prompts(0, 4)
    assert len(first) == 5 and first[-1] == "q"
    assert len(set(first[:4])) == 4 and set(first[:4]) <= {f"p{i}" for i in range(10)}
    assert prompts(0, 4) == first  # the same seed draws the same pairs
    assert {tuple(prompts(s, 4)) for s in range(6)} != {tuple(first)}  # other seeds draw others
    assert sorted(prompts(0, 50)[:-1]) == sorted(f"p{i}" for i in range(10))  # replay above the data: all of it


@pytest.mark.parametrize("key,value", [("pairs", "both"), ("reward_init", "scratch"), ("ppo_init", "base")])
def test_unknown_option_names_the_key(key, value):
    with pytest.raises(ValueError, match=f"Round2.{key}: expected one of"):
        Round2(**{key: value})
