"""The iterate loop: sampling two responses per prompt, labelling them with a judge (ties,
identical and empty pairs dropped, label noise), the config's guards, and a tiny two-round run
in a world (layout, pairs sampled from the previous round's policy, labels that agree with the
gold judge, growing preference data, resume)."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import pytest

from alignkit.config import ConfigError, load_config
from alignkit.data.load import load_records
from alignkit.data.records import Message, PromptOnly, prompt_text
from alignkit.data.tokenize import TruncationLimits, tokenize_prompts
from alignkit.feedback.judges import PairVerdict
from alignkit.models.bpe import train_bpe_tokenizer
from alignkit.models.load import load_model, load_tokenizer, save_model, tiny_llama
from alignkit.train import iterate
from alignkit.world import load_world, write_world

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# ------------------------------------------------------------------ labelling
class XCountJudge:
    """Deterministic fake judge: the answer with more 'x' characters wins, equal counts tie.
    Records every pair it is shown."""

    def __init__(self):
        self.seen: list[tuple] = []

    def compare(self, prompts, a, b):
        self.seen += list(zip(prompts, a, b))
        out = []
        for x, y in zip(a, b):
            d = x.count("x") - y.count("x")
            o = 1.0 if d > 0 else 0.0 if d < 0 else 0.5
            out.append(PairVerdict(o, o, {"count_a": x.count("x"), "count_b": y.count("x"), "note": "n"}))
        return out


RECORDS = [PromptOnly("p0", "c0"), PromptOnly("p1"), PromptOnly("p2"), PromptOnly("p3"), PromptOnly("p4"),
           PromptOnly("p5")]
SAMPLES = [("xx", "x"), ("x", "xxx"), ("same", "same"), (" ", "x"), ("ax", "xb"), ("xxx", "")]


def test_label_pairs_by_hand():
    """Pair 0: 'xx' (2) beats 'x' (1); pair 1: b 'xxx' (3) beats a 'x' (1), so chosen is b;
    pair 2 identical and pairs 3, 5 with a blank side never reach the judge; pair 4 ties
    (1 x each) and is dropped. The judge's _a/_b evidence follows the chosen side."""
    judge = XCountJudge()
    rows, counts = iterate.label_pairs(judge, RECORDS, SAMPLES, extra={"round": 3})
    assert [s[0] for s in judge.seen] == ["p0", "p1", "p4"]
    assert counts == {"sampled": 6, "empty": 2, "identical": 1, "ties": 1, "flipped": 0, "pairs": 2}
    assert rows == [
        {"prompt": "p0", "chosen": "xx", "rejected": "x", "category": "c0", "flipped": False,
         "count_chosen": 2, "count_rejected": 1, "round": 3},
        {"prompt": "p1", "chosen": "xxx", "rejected": "x", "flipped": False,
         "count_chosen": 3, "count_rejected": 1, "round": 3},
    ]


def test_label_noise_flips_with_one_draw_per_kept_pair():
    """With label_noise 0.5 and random.Random(1), the draws for the two kept pairs are
    0.134 (< 0.5: flip) and 0.847 (keep): pair 0's label is reversed, pair 1's is not."""
    draws = random.Random(1)
    assert [draws.random() < 0.5 for _ in range(2)] == [True, False]
    rows, counts = iterate.label_pairs(XCountJudge(), RECORDS, SAMPLES, label_noise=0.5, rng=random.Random(1))
    assert counts["flipped"] == 1 and counts["pairs"] == 2
    assert (rows[0]["chosen"], rows[0]["rejected"], rows[0]["flipped"]) == ("x", "xx", True)
    assert (rows[0]["count_chosen"], rows[0]["count_rejected"]) == (1, 2)
    assert (rows[1]["chosen"], rows[1]["flipped"]) == ("xxx", False)


def test_pair_rows_read_back_as_preference_pairs(tmp_path):
    """A conversation prompt is written as a message list and loads back unchanged."""
    conv = (Message("system", "be brief"), Message("user", "hi"))
    rows, _ = iterate.label_pairs(XCountJudge(), [PromptOnly(conv, "chat")], [("x", "xx")])
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (pair,) = load_records(path, kind="preference").records
    assert pair.prompt == conv and (pair.chosen, pair.rejected, pair.category) == ("xx", "x", "chat")
    assert pair.margin is None and pair.soft_label is None  # judge evidence is not read as a margin


# ------------------------------------------------------------------ sampling
def test_sample_pairs_two_per_prompt_in_order():
    """Two temperature samples per prompt, paired in prompt order; the same seed repeats them
    and the two samples of a prompt are independent draws (they differ somewhere)."""
    tok = train_bpe_tokenizer(["Human: What is one plus two?\nAssistant: three four five six"] * 20, vocab_size=300)
    model = tiny_llama("nano", tokenizer=tok, seed=0).eval()
    prompts = [tok("Human: What is one plus two?")["input_ids"], tok("Human: four")["input_ids"]] * 3
    pairs = iterate.sample_pairs(model, tok, prompts, max_new_tokens=6, temperature=1.0, seed=5, batch_size=4)
    assert len(pairs) == 6 and all(isinstance(a, str) and isinstance(b, str) for a, b in pairs)
    assert pairs == iterate.sample_pairs(model, tok, prompts, 6, 1.0, seed=5, batch_size=4)
    assert any(a != b for a, b in pairs)
    # greedy-like temperature: both samples of a prompt collapse onto the same answer
    cold = iterate.sample_pairs(model, tok, prompts, 6, 1e-4, seed=5, batch_size=4)
    assert all(a == b for a, b in cold)


# ------------------------------------------------------------------ config
def test_config_guards_and_preset(tmp_path):
    base = ["policy=p", "world=w", f"out={tmp_path / 'o'}"]
    for key, instead in (("ppo.model.path=x", "policy"), ("reward.data.path=x", "preferences"),
                         ("ppo.reward.model=x", "reward_model"), ("reward.out=x", "out")):
        with pytest.raises(ConfigError, match=f"set '{instead}"):
            iterate.run(load_config(iterate.Config, None, base + [key]))
    with pytest.raises(ConfigError, match="set 'kl_reference'"):
        iterate.run(load_config(iterate.Config, None, base + ["ppo.reference=x"]))
    with pytest.raises(ConfigError, match="new_pairs_repeat"):
        iterate.run(load_config(iterate.Config, None, base + ["new_pairs_repeat=0"]))
    with pytest.raises(ConfigError, match="ppo.reward.source"):
        iterate.run(load_config(iterate.Config, None, base + ["ppo.reward.source=gold"]))
    with pytest.raises(ConfigError, match="temperature"):
        iterate.run(load_config(iterate.Config, None, base + ["temperature=0"]))
    with pytest.raises(ConfigError, match="policy"):
        iterate.run(load_config(iterate.Config, None, ["world=w"]))
    # a partial ppo section keeps iterate's own defaults for the other keys
    cfg = load_config(iterate.Config, None, ["ppo.iterations=5"])
    assert (cfg.ppo.iterations, cfg.ppo.kl_coef, cfg.ppo.rollout_batch) == (5, 0.1, 32)
    preset = CONFIGS / "iterate.yaml"
    assert preset.read_text().startswith("#") and "alignkit iterate --config configs/iterate.yaml" in preset.read_text()
    load_config(iterate.Config, preset, ["policy=p", "world=w"])


def test_draw_prompts_repeats_every_prompt_beyond_one_pass():
    once = iterate.draw_prompts(10, 4, random.Random(0))
    assert len(set(once)) == 4 and once == sorted(once) and all(0 <= i < 10 for i in once)
    many = iterate.draw_prompts(10, 23, random.Random(0))  # two passes plus 3 more
    counts = [many.count(i) for i in range(10)]
    assert len(many) == 23 and many == sorted(many) and sorted(counts) == [2] * 7 + [3] * 3


def test_spread_keeps_every_block():
    from alignkit.eval.gold import spread

    assert spread(list(range(12)), 4) == [0, 3, 6, 9]
    assert spread([1, 2], 0) == [1, 2] and spread([1, 2], 5) == [1, 2]


# ------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("iterate")
    world = root / "world"
    write_world(world, n_pairs=40, n_sft=8, n_pretrain=8, n_eval=6, n_pairs_eval=12)
    pairs = load_records(world / "preferences.jsonl", kind="preference").records
    tok = train_bpe_tokenizer([prompt_text(p.prompt) + p.chosen + p.rejected for p in pairs] * 4, vocab_size=400)
    save_model(tiny_llama("nano", tokenizer=tok, seed=3), tok, root / "sft")
    return root


def _cfg(root: Path, *extra: str) -> iterate.Config:
    return load_config(iterate.Config, None, [
        f"policy={root / 'sft'}", f"world={root / 'world'}", f"out={root / 'run'}", "label_noise=0", "rounds=2",
        "prompts_per_round=48", "max_new_tokens=8", "eval_limit=6", "eval_max_new_tokens=8",
        "reward.train.max_steps=2", "reward.train.batch_size=8", "reward.train.progress=false",
        "reward.train.tensorboard=false", "reward.train.warmup_steps=0", "reward.stats_pairs=16",
        "reward.data.max_prompt_len=48", "reward.data.max_len=96",
        "ppo.iterations=1", "ppo.rollout_batch=4", "ppo.ppo_epochs=1", "ppo.train.batch_size=4",
        "ppo.train.lr=0.01", "ppo.rollout.max_new_tokens=6", "ppo.eval_limit=2", *extra,
    ])


def test_two_rounds_end_to_end(tiny):
    cfg = _cfg(tiny)
    result = iterate.run(cfg)
    out = tiny / "run"
    assert result["status"] == "done"
    summary = json.loads((out / "summary.json").read_text())
    rows = summary["rounds"]
    assert [r["round"] for r in rows] == [0, 1, 2] and summary["status"] == "done"

    # layout
    assert (out / "round_0" / "reward" / "final" / "reward_config.json").is_file()
    for k in (1, 2):
        d = out / f"round_{k}"
        for name in ("samples.jsonl", "pairs.jsonl", "reward_data.jsonl", "eval_responses.jsonl", "round.json"):
            assert (d / name).is_file(), (k, name)
        assert (d / "reward" / "final" / "reward_config.json").is_file()
        assert (d / "ppo" / "final" / "config.json").is_file()
        assert rows[k]["policy"] == str(d / "ppo" / "final") and rows[k]["reward_model"] == str(d / "reward" / "final")

    # round k's pairs are samples of round k-1's policy: regenerating them gives the same texts
    world = load_world(tiny / "world")
    records = load_records(tiny / "world" / "train_prompts.jsonl", kind="prompt").records
    sft_again = None
    for k in (1, 2):
        samples = [json.loads(x) for x in (out / f"round_{k}" / "samples.jsonl").read_text().splitlines()]
        assert len(samples) == 48
        prev = rows[k - 1]["policy"]
        tok = load_tokenizer(prev)
        items, _ = tokenize_prompts(tok, [records[s["index"]] for s in samples],
                                    TruncationLimits(max_prompt_len=cfg.ppo.data.max_prompt_len, max_len=None))
        ids = [it.prompt_ids for it in items]
        again = iterate.sample_pairs(load_model(prev), tok, ids, 8, 1.0, iterate.round_seed(cfg, k), 64)
        assert again == [(s["a"], s["b"]) for s in samples]
        if k == 2:  # and not of the SFT model: PPO moved the policy
            sft_again = iterate.sample_pairs(load_model(tiny / "sft"), tok, ids, 8, 1.0, iterate.round_seed(cfg, k), 64)
            assert sft_again != again

        # noise 0: every label agrees with the gold judge (ties were dropped, so strictly)
        pairs = [json.loads(x) for x in (out / f"round_{k}" / "pairs.jsonl").read_text().splitlines()]
        assert pairs and len(pairs) == rows[k]["pairs_new"]
        for p in pairs:
            assert world.score(p["prompt"], p["chosen"]) > world.score(p["prompt"], p["rejected"])
            assert p["score_chosen"] == world.score(p["prompt"], p["chosen"]) and p["flipped"] is False
        counts = rows[k]
        assert counts["pairs_sampled"] == 48 == (counts["pairs_new"] + counts["pairs_empty"]
                                                 + counts["pairs_identical"] + counts["pairs_ties"])

    # the preference data grows by the new pairs of each round
    totals = [r["pairs_total"] for r in rows]
    assert totals[0] == 40 and totals[1] == 40 + rows[1]["pairs_new"] and totals[2] == totals[1] + rows[2]["pairs_new"]
    assert totals[0] < totals[1] < totals[2]
    for k in (1, 2):
        assert len((out / f"round_{k}" / "reward_data.jsonl").read_text().splitlines()) == totals[k]

    # by-round columns
    assert rows[0]["kl_to_start"] == 0.0
    for r in rows:
        assert 0.0 <= r["gold_score"] <= 1.0 and 0.0 <= r["rm_accuracy"] <= 1.0 and r["rm_eval_pairs"] == 12
    for r in rows[1:]:
        assert 0.0 <= r["win_rate_vs_prev"]["rate"] <= 1.0 and r["ppo_kl"] is not None
        assert 0.0 <= r["prev_rm_on_new_pairs"]["rm_accuracy"] <= 1.0

    # an earlier run is neither silently replaced nor silently continued; resume reads it back
    with pytest.raises(ConfigError, match="resume=true"):
        iterate.run(cfg)
    again = iterate.run(_cfg(tiny, "resume=true"))
    assert again["rounds"] == result["rounds"]


def test_human_judge_exports_then_resumes(tiny):
    """judge=human: the first run exports round 1's pairs and stops; once every pair is labelled
    "A", a resumed run finishes, and each chosen answer is the one shown as A."""
    out = tiny / "human"
    cfg = _cfg(tiny, f"out={out}", "judge=human", "rounds=1")
    first = iterate.run(cfg)
    assert first["status"] == "awaiting_labels" and first["round"] == 1
    exported = out / "round_1" / "human_pairs.jsonl"
    assert first["pairs_file"] == str(exported)
    assert json.loads((out / "summary.json").read_text())["status"] == "awaiting_labels"
    shown = [json.loads(x) for x in exported.read_text().splitlines()]
    exported.write_text("".join(json.dumps({**r, "label": "A"}) + "\n" for r in shown))
    done = iterate.run(dataclasses.replace(cfg, resume=True))
    assert done["status"] == "done"
    pairs = [json.loads(x) for x in (out / "round_1" / "pairs.jsonl").read_text().splitlines()]
    assert len(pairs) == len(shown) > 0
    assert {(p["chosen"], p["rejected"]) for p in pairs} == {(r["answer_A"], r["answer_B"]) for r in shown}


def test_anchor_to_start_and_upweighted_new_pairs(tiny, monkeypatch):
    """kl_reference=start: round 2's PPO starts from policy_1 but its KL anchor is policy_0, so
    its first rollout already has KL > 0; new_pairs_repeat=2 writes each new pair twice.
    ppo_init=start: every round's PPO starts from policy_0 (with its default anchor)."""
    out = tiny / "anchored"
    # fp32: under bf16 (a GPU) the policy's and the reference's passes round apart by ~1e-2
    iterate.run(_cfg(tiny, f"out={out}", "kl_reference=start", "new_pairs_repeat=2", "ppo.train.precision=fp32"))
    rows = json.loads((out / "summary.json").read_text())["rounds"]
    data = (out / "round_2" / "reward_data.jsonl").read_text().splitlines()
    assert len(data) == 40 + 2 * (rows[1]["pairs_new"] + rows[2]["pairs_new"])
    assert rows[2]["pairs_total"] == 40 + rows[1]["pairs_new"] + rows[2]["pairs_new"]  # distinct pairs
    first = [json.loads((out / f"round_{k}" / "ppo" / "metrics.jsonl").read_text().splitlines()[0])["kl"] for k in (1, 2)]
    # k1 on 4 sampled responses estimates KL(policy_1 || policy_0) > 0 but can itself be < 0:
    # what the anchor changes is that it is not 0 (anchored to policy_1 it is exactly 0)
    assert first[0] == pytest.approx(0.0, abs=1e-5) and abs(first[1]) > 1e-3

    seen = []
    real_run = iterate.ppo_stage.run
    monkeypatch.setattr(iterate.ppo_stage, "run", lambda c: seen.append((c.model.path, c.reference)) or real_run(c))
    iterate.run(_cfg(tiny, f"out={tiny / 'restart'}", "ppo_init=start"))
    assert seen == [(str(tiny / "sft"), None)] * 2


def test_a_run_killed_inside_ppo_resumes_from_the_stage_checkpoint(tiny, monkeypatch, capsys):
    """Killed as iteration 2 of round 1's 3-iteration PPO writes its metrics row (before its
    checkpoint; one is written every iteration): resume=true continues that PPO run from step-1,
    and the round ends as in an uninterrupted run."""
    from alignkit.train import trackers

    extra = ["ppo.iterations=3", "ppo.train.save_every=1", "rounds=1"]
    ref = iterate.run(_cfg(tiny, *extra, f"out={tiny / 'ref'}"))
    real = trackers.MetricsLog.write

    def write_then_die(self, row):
        real(self, row)
        if row.get("step") == 2 and self.path.parent == tiny / "killed" / "round_1" / "ppo":
            raise KeyboardInterrupt("killed inside round 1's PPO")

    with monkeypatch.context() as m:
        m.setattr(trackers.MetricsLog, "write", write_then_die)
        with pytest.raises(KeyboardInterrupt):
            iterate.run(_cfg(tiny, *extra, f"out={tiny / 'killed'}"))
    capsys.readouterr()
    done = iterate.run(_cfg(tiny, *extra, f"out={tiny / 'killed'}", "resume=true"))
    assert "round_1/ppo/checkpoints/step-1 (iteration 1)" in capsys.readouterr().err
    timing = {"wall_s", "policy", "reward_model"}
    strip = [{k: v for k, v in r.items() if k not in timing} for r in done["rounds"]]
    assert strip == [{k: v for k, v in r.items() if k not in timing} for r in ref["rounds"]]


def test_label_policy_samples_are_gold_ordered_except_the_flipped(tiny):
    """The policy's own pairs on training prompts: with no label noise every chosen answer scores
    strictly above its rejected one under the gold judge; with noise 1 every label is flipped."""
    from alignkit.train.iterate import label_policy_samples, world_noise
    from alignkit.world import load_world

    world = load_world(tiny / "world")
    rows, counts = label_policy_samples(str(tiny / "sft"), str(tiny / "world"), 24, seed=0, max_new_tokens=8,
                                        label_noise=0.0)
    assert counts["sampled"] == 24 and counts["pairs"] == len(rows) > 0
    assert all(world.score(r["prompt"], r["chosen"]) > world.score(r["prompt"], r["rejected"]) for r in rows)
    flipped, _ = label_policy_samples(str(tiny / "sft"), str(tiny / "world"), 24, seed=0, max_new_tokens=8,
                                      label_noise=1.0)
    assert [(r["chosen"], r["rejected"]) for r in flipped] == [(r["rejected"], r["chosen"]) for r in rows]
    assert world_noise(tiny / "world") == 0.1
