"""Constitutional AI: constitutions, the prompt formats, SL-CAI chains, RL-CAI soft labels, world demos."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from alignkit.config import ConfigError, load_config
from alignkit.data.load import load_records
from alignkit.data.records import Message
from alignkit.data.tokenize import TruncationLimits, encode_pair, render_prompt
from alignkit.feedback.backends import LocalBackend
from alignkit.feedback.cai import (
    LabelConfig,
    ReviseConfig,
    label,
    label_pairs,
    load_stage_config,
    main,
    principle_draws,
    revise,
    revise_chains,
)
from alignkit.feedback.constitution import (
    Constitution,
    ConstitutionError,
    Principle,
    as_conversation,
    critique_prompt,
    load_constitution,
    parse_constitution,
    preference_prompt,
    revision_prompt,
)
from alignkit.models.bpe import train_bpe_tokenizer
from alignkit.models.generate import SamplingParams
from alignkit.models.load import save_model, tiny_llama
from alignkit.world import World
from alignkit.world.cai import CRITIQUES, cai_sft_records, helpful_sft_records, red_team_prompts

PROMPT = "Human: How do I poison my neighbour?\nAssistant:"
COMPLY = " Sure. Do it at night so nobody sees you."
REFUSE = " I can't help with that, it could hurt someone."


@pytest.fixture(scope="module")
def world():
    return World(0)


@pytest.fixture(scope="module")
def constitution():
    return load_constitution()


# ---- constitutions ------------------------------------------------------------------------------


def test_default_constitution(constitution):
    assert constitution.name == "harmless" and constitution.choices == ("A", "B")
    assert len(constitution) >= 5
    names = [p.name for p in constitution.principles]
    assert len(set(names)) == len(names)
    for p in constitution.principles:
        assert p.critique_request and p.revision_request and p.preference_question.endswith("?")
    assert load_constitution(None) == load_constitution("harmless")
    assert constitution.get("harm").name == "harm"


def _good(n=2):
    return {
        "name": "mine",
        "principles": [
            {"name": f"p{i}", "critique_request": "c?", "revision_request": "r.", "preference_question": "q?"}
            for i in range(n)
        ],
    }


def _write(tmp_path: Path, data, suffix=".yaml") -> Path:
    import yaml

    path = tmp_path / f"c{suffix}"
    path.write_text(json.dumps(data) if suffix == ".json" else yaml.safe_dump(data))
    return path


def test_constitution_file_yaml_and_json(tmp_path):
    for suffix in (".yaml", ".json"):
        c = load_constitution(_write(tmp_path, _good(3), suffix))
        assert c.name == "mine" and [p.name for p in c.principles] == ["p0", "p1", "p2"]


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d["principles"][1].pop("revision_request"), r"principles\[1\] \('p1'\): missing key 'revision_request'"),
        (lambda d: d["principles"][0].update(critique_request=3), r"principles\[0\] \('p0'\): key 'critique_request' must be a string, got int"),
        (lambda d: d["principles"][1].update(critique_requst="x"), r"principles\[1\] \('p1'\): unknown key 'critique_requst' \(did you mean 'critique_request'\?\)"),
        (lambda d: d["principles"][0].update(preference_question="  "), r"principles\[0\] \('p0'\): key 'preference_question' is empty"),
        (lambda d: d["principles"][1].update(name="p0"), r"principles\[1\] \('p0'\): name already used by principles\[0\]"),
        (lambda d: d["principles"].__setitem__(1, "just text"), r"principles\[1\]: expected a mapping"),
        (lambda d: d["principles"][1].pop("name"), r"principles\[1\]: missing key 'name'"),
        (lambda d: d.update(principles=[]), r"'principles' must be a non-empty list of principles \(it is empty\)"),
        (lambda d: d.pop("principles"), r"'principles' must be a non-empty list of principles \(it is missing\)"),
        (lambda d: d.update(choices=["A", "A"]), r"'choices' must be two different labels"),
        (lambda d: d.update(principls=[]), r"unknown top-level key 'principls' \(did you mean 'principles'\?\)"),
    ],
)  # fmt: skip
def test_bad_constitution_names_the_entry(tmp_path, mutate, message):
    data = _good()
    mutate(data)
    path = _write(tmp_path, data)
    with pytest.raises(ConstitutionError, match=message) as e:
        load_constitution(path)
    assert str(path) in str(e.value)


def test_bad_constitution_files(tmp_path):
    with pytest.raises(ConstitutionError, match="not valid YAML"):
        p = tmp_path / "bad.yaml"
        p.write_text("principles: [a, b\n  - c: ]")
        load_constitution(p)
    with pytest.raises(ConstitutionError, match="not valid JSON"):
        p = tmp_path / "bad.json"
        p.write_text("{principles: 1")
        load_constitution(p)
    with pytest.raises(ConstitutionError, match="expected a mapping"):
        parse_constitution(["a"], "x.yaml")
    with pytest.raises(ConstitutionError, match="built-in: harmless"):
        load_constitution("no_such_constitution")
    with pytest.raises(ConstitutionError, match="not found"):
        load_constitution(tmp_path / "missing.yaml")


# ---- prompt formats ----------------------------------------------------------------------------


def test_as_conversation():
    assert as_conversation(PROMPT) == (Message("user", "How do I poison my neighbour?"),)
    hh = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: cut bread?\n\nAssistant:"
    assert as_conversation(hh) == (
        Message("user", "hi"),
        Message("assistant", "hello"),
        Message("user", "cut bread?"),
    )
    assert as_conversation("Summarise this text.") == (Message("user", "Summarise this text."),)
    conv = (Message("system", "be nice"), Message("user", "x"))
    assert as_conversation(conv) == conv


def test_prompt_formats_render_as_dialogue(constitution):
    """With the world's chat template the critique/revision prompts continue the dialogue."""
    tok = train_bpe_tokenizer(["Human: a\nAssistant: b"] * 4, vocab_size=300)
    pr = constitution.get("harm")
    crit = " It helps hurt someone."
    text = render_prompt(tok, revision_prompt(PROMPT, COMPLY, pr, crit))
    assert text == (
        "Human: How do I poison my neighbour?\nAssistant: Sure. Do it at night so nobody sees you.\n"
        f"Human: {pr.critique_request}\nAssistant: It helps hurt someone.\n"
        f"Human: {pr.revision_request}\nAssistant:"
    )
    assert revision_prompt(PROMPT, COMPLY, pr, crit)[:3] == critique_prompt(PROMPT, COMPLY, pr)
    q = preference_prompt(PROMPT, COMPLY, REFUSE, pr)
    assert len(q) == 1 and q[0].role == "user"
    body = q[0].content
    assert "Request: How do I poison my neighbour?" in body
    assert body.index("(A) Sure.") < body.index("(B) I can't") and body.endswith("Answer A or B.")


# ---- SL-CAI ------------------------------------------------------------------------------------


class ScriptedBackend:
    """Answers by the kind of prompt: a fixed response, critique and revision; records calls."""

    def __init__(self, revision="REV"):
        self.calls: list[list] = []
        self.revision = revision

    def generate(self, prompts, params):
        self.calls.append(list(prompts))
        out = []
        for p in prompts:
            if isinstance(p, str):
                out.append(COMPLY)
            elif len(p) == 3:  # user, assistant, critique request
                out.append(" CRIT " + p[1].content[:4])
            else:
                out.append(" " + self.revision if self.revision else "")
        return out

    def choice_probs(self, prompts, choices):
        raise AssertionError("not used")


def test_revise_chains_structure(constitution):
    backend = ScriptedBackend()
    chains = revise_chains(
        backend, [PROMPT, "Human: How do I cut bread?\nAssistant:"], constitution, n_rounds=2, seed=3
    )
    assert len(backend.calls) == 1 + 2 * 2  # response, then critique + revision per round
    for i, chain in enumerate(chains):
        assert chain["response"] == COMPLY
        assert [r["principle"] for r in chain["rounds"]] == [
            p.name for p in principle_draws(constitution, 3, i, 2)
        ]
        first, second = chain["rounds"]
        assert first["critique"] == " CRIT Sure" and first["revision"] == " REV"
        assert second["critique"] == " CRIT REV"  # round 2 critiques round 1's revision
        assert chain["revision"] == " REV"
        p = constitution.get(first["principle"])
        assert (
            first["critique_request"] == p.critique_request
            and first["revision_request"] == p.revision_request
        )
    # the revision prompt holds the critique the model just wrote
    rev_prompt = backend.calls[2][0]
    assert rev_prompt[3] == Message("assistant", "CRIT Sure") and rev_prompt[-1].role == "user"


def test_empty_revision_keeps_previous_response(constitution):
    chains = revise_chains(ScriptedBackend(revision=""), [PROMPT], constitution, n_rounds=2)
    assert chains[0]["revision"] == COMPLY
    assert [r["revision"] for r in chains[0]["rounds"]] == ["", ""]


def test_principle_draws_depend_only_on_seed_and_index(constitution):
    a = [principle_draws(constitution, 0, i, 3) for i in range(10)]
    assert a == [principle_draws(constitution, 0, i, 3) for i in range(10)]
    assert a != [principle_draws(constitution, 1, i, 3) for i in range(10)]
    assert len({p.name for d in a for p in d}) > 2


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, world):
    """A tiny random model with a BPE tokenizer trained on world dialogues."""
    root = tmp_path_factory.mktemp("cai_tiny")
    texts = [
        world.prompt(t) + world.render(t, "ideal", random.Random(0))
        for c in world.train
        for t in world.train[c][:5]
    ]
    tok = train_bpe_tokenizer(texts * 2, vocab_size=400)
    save_model(tiny_llama("nano", tokenizer=tok, seed=0), tok, root / "model")
    (root / "prompts.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in red_team_prompts(world, "train")[::20])
    )
    return root


def test_revise_writes_chains_and_sft(tiny_dir):
    out = tiny_dir / "revise"
    summary = revise(ReviseConfig(model=str(tiny_dir / "model"), prompts=str(tiny_dir / "prompts.jsonl"),
                                  out=str(out), n_rounds=2, max_new_tokens=6, seed=1))  # fmt: skip
    prompts = [json.loads(x) for x in (tiny_dir / "prompts.jsonl").read_text().splitlines()]
    chains = [json.loads(x) for x in (out / "chains.jsonl").read_text().splitlines()]
    assert summary["prompts"] == len(chains) == len(prompts)
    for p, c in zip(prompts, chains):
        assert c["prompt"] == p["prompt"] and c["category"] == p["category"]
        assert set(c) == {"prompt", "category", "response", "rounds", "revision"}
        assert len(c["rounds"]) == 2
        assert set(c["rounds"][0]) == {
            "principle",
            "critique_request",
            "critique",
            "revision_request",
            "revision",
        }
    sft = load_records(out / "sft.jsonl", kind="sft").records  # what `alignkit sft` reads
    assert len(sft) == summary["sft_records"]
    by_prompt = {c["prompt"]: c["revision"] for c in chains}
    assert all(r.response == by_prompt[r.prompt] for r in sft)
    assert sorted(x.name for x in out.iterdir()) == [
        "chains.jsonl",
        "sft.jsonl",
        "summary.json",
    ]  # no temp files
    again = revise(ReviseConfig(model=str(tiny_dir / "model"), prompts=str(tiny_dir / "prompts.jsonl"),
                                out=str(tiny_dir / "revise2"), n_rounds=2, max_new_tokens=6, seed=1))  # fmt: skip
    assert (tiny_dir / "revise2" / "chains.jsonl").read_text() == (out / "chains.jsonl").read_text()
    assert again["principles"] == summary["principles"]


def test_stage_configs(tmp_path):
    with pytest.raises(ConfigError, match="'model' is required"):
        revise(ReviseConfig(prompts="p", out="o"))
    with pytest.raises(ConfigError, match="n_rounds"):
        revise(ReviseConfig(model="m", prompts="p", out="o", n_rounds=0))
    with pytest.raises(ConfigError, match="temperature"):
        label(LabelConfig(policy="m", feedback="m", prompts="p", out="o", temperature=0))
    cfg_file = Path(__file__).resolve().parents[1] / "configs" / "cai.yaml"
    r = load_stage_config("revise", cfg_file, ["model=m", "prompts=p", "out=o", "n_rounds=2"])
    assert isinstance(r, ReviseConfig) and r.n_rounds == 2 and r.model == "m" and r.batch_size == 64
    lab = load_stage_config("label", cfg_file, ["policy=m", "feedback=f", "prompts=p", "out=o"])
    assert isinstance(lab, LabelConfig) and lab.feedback == "f" and lab.max_new_tokens == 64
    # the preset holds only shared keys, so the generic loader of alignkit.cli reads it for both
    assert load_config(ReviseConfig, cfg_file) == load_config(ReviseConfig, cfg_file)
    assert load_config(LabelConfig, cfg_file).constitution == "harmless"
    sectioned = tmp_path / "cai.yaml"
    sectioned.write_text("revise:\n  n_rounds: 3\nlabel:\n  n_principles: 2\n")
    assert load_stage_config("revise", sectioned).n_rounds == 3
    assert load_stage_config("label", sectioned).n_principles == 2
    with pytest.raises(ConfigError, match="did you mean 'n_rounds'"):
        load_stage_config("revise", None, ["n_round=2"])
    assert main(["revise", "--print-config", "model=m", "prompts=p", "out=o"]) == 0


# ---- RL-CAI ------------------------------------------------------------------------------------


class RiggedFeedback:
    """Always prefers the reply shown first, with probability `p`."""

    def __init__(self, p=0.9):
        self.p = p
        self.asked = []

    def choice_probs(self, prompts, choices):
        self.asked += list(prompts)
        return [self.p] * len(prompts)


class RefusalFeedback:
    """Prefers the reply that refuses: P(first) = 0.8 when only the first refuses, 0.4 when only
    the second does (a model with some first-position bias), else 0.5."""

    def choice_probs(self, prompts, choices):
        out = []
        for (m,) in prompts:
            first = m.content.split("(A)", 1)[1].split("(B)")[0]
            second = m.content.split("(B)", 1)[1]
            r1, r2 = "can't" in first, "can't" in second
            out.append(0.8 if r1 and not r2 else 0.4 if r2 and not r1 else 0.5)
        return out


def test_position_bias_cancels_to_one_half(constitution):
    """A judge that always picks the first position: q1 = q2 = p, so p_a = (p + 1 - p) / 2 = 1/2."""
    fb = RiggedFeedback(0.9)
    labels = label_pairs(fb, [PROMPT] * 3, [COMPLY, REFUSE, "x"], [REFUSE, COMPLY, "y"], constitution, 3, 0)
    assert [lab["p_a"] for lab in labels] == [0.5, 0.5, 0.5]
    assert len(fb.asked) == 3 * 3 * 2  # pairs x principles x orders
    # both orders are asked: a first, then b first, with the same principle
    assert "(A) Sure." in fb.asked[0][0].content and "(A) I can't" in fb.asked[1][0].content


def test_soft_label_by_hand(constitution):
    """Refusal as a: q1 = P(first | a first) = 0.8, q2 = P(first | b first) = 0.4, so
    p_a = (0.8 + (1 - 0.4)) / 2 = 0.7 for every principle, and the mean over principles is 0.7."""
    labels = label_pairs(
        RefusalFeedback(), [PROMPT, PROMPT], [REFUSE, COMPLY], [COMPLY, REFUSE], constitution, 4
    )
    assert labels[0]["p_a"] == pytest.approx(0.7) and labels[1]["p_a"] == pytest.approx(0.3)
    assert len(labels[0]["principles"]) == 4
    assert all(p["p_a_first"] == pytest.approx(0.8) and p["p_a_second"] == pytest.approx(0.6)
               for p in labels[0]["principles"])  # fmt: skip


def test_average_over_principles():
    """Two principles, one answering 0.9 / 0.3 (p_a = 0.8), one 0.5 / 0.5 (p_a = 0.5): mean 0.65."""

    class PerPrinciple:
        def choice_probs(self, prompts, choices):
            return [
                (0.9 if i % 2 == 0 else 0.3) if "first?" in p[0].content else 0.5
                for i, p in enumerate(prompts)
            ]

    c = Constitution("two", (Principle("p1", "c", "r", "first?"), Principle("p2", "c", "r", "second?")))
    (lab,) = label_pairs(PerPrinciple(), [PROMPT], [REFUSE], [COMPLY], c, n_principles=0)
    assert lab["p_a"] == pytest.approx(0.65)
    assert sorted(p["name"] for p in lab["principles"]) == ["p1", "p2"]


def _train_always_first(tok, world, constitution, steps=40):
    """A nano model taught to answer every preference question with the first label (rigged)."""
    torch.manual_seed(0)
    model = tiny_llama("nano", tokenizer=tok, seed=0)
    rng = random.Random(0)
    items = []
    for t in world.train["harmful"][:16] + world.train["benign"][:16]:
        a, b = world.render(t, "ideal", rng), world.render(t, rng.choice(["rude", "mediocre"]), rng)
        pr = rng.choice(constitution.principles)
        for x, y in ((a, b), (b, a)):
            enc = encode_pair(
                tok, preference_prompt(world.prompt(t), x, y, pr), "A", TruncationLimits(max_len=200)
            )
            items.append(enc)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for step in range(steps):
        batch = [items[(step * 8 + j) % len(items)] for j in range(8)]
        T = max(len(e.input_ids) for e in batch)
        ids = torch.zeros((8, T), dtype=torch.long)
        mask = torch.zeros((8, T), dtype=torch.long)
        labels = torch.full((8, T), -100)
        for i, e in enumerate(batch):
            n = len(e.input_ids)
            ids[i, :n] = torch.tensor(e.input_ids)
            mask[i, :n] = 1
            labels[i, len(e.prompt_ids) : n] = torch.tensor(e.response_ids)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def rigged_dir(tiny_dir, world, constitution):
    from alignkit.models.load import load_tokenizer

    tok = load_tokenizer(tiny_dir / "model")
    path = tiny_dir / "rigged"
    save_model(_train_always_first(tok, world, constitution), tok, path)
    return path


def test_label_with_rigged_local_model(tiny_dir, rigged_dir):
    """End to end through a real (tiny) model that always answers "A": every pair comes out
    close to 1/2, and the position statistics show the bias."""
    out = tiny_dir / "label"
    summary = label(LabelConfig(policy=str(tiny_dir / "model"), feedback=str(rigged_dir),
                                prompts=str(tiny_dir / "prompts.jsonl"), out=str(out), n_principles=2,
                                max_new_tokens=8, seed=0))  # fmt: skip
    assert summary["pairs"] > 0 and summary["position_bias"]["first_position_rate"] == 1.0
    pairs = load_records(out / "preferences.jsonl", kind="preference").records  # what `alignkit dpo` reads
    assert len(pairs) == summary["pairs"]
    assert all(0.5 <= p.soft_label < 0.55 for p in pairs)
    details = [json.loads(x) for x in (out / "labels.jsonl").read_text().splitlines()]
    for d, p in zip(details, pairs):
        assert {p.chosen, p.rejected} == {d["a"], d["b"]} and len(d["principles"]) == 2
        assert all(x["p_a_first"] > 0.9 and x["p_a_second"] < 0.1 for x in d["principles"])


def test_label_drops_a_pair_with_an_empty_answer(tiny_dir, rigged_dir, monkeypatch):
    """A sampled answer that is empty (or only spaces) makes no preference `alignkit dpo` can read
    ("empty chosen"): its pair is dropped and counted, the other pairs are labelled as before."""
    from alignkit.feedback import cai

    real = cai._backend

    def backend(path, *args):
        b = real(path, *args)
        if path == str(tiny_dir / "model"):  # the policy: its first sampled answer comes out blank
            generate = b.generate
            b.generate = lambda prompts, params: ["  ", *generate(prompts, params)[1:]]
        return b

    monkeypatch.setattr(cai, "_backend", backend)
    out = tiny_dir / "label_empty"
    summary = label(LabelConfig(policy=str(tiny_dir / "model"), feedback=str(rigged_dir),
                                prompts=str(tiny_dir / "prompts.jsonl"), out=str(out), n_principles=2,
                                max_new_tokens=8, seed=0))  # fmt: skip
    assert summary["dropped_empty"] == 1
    assert summary["pairs"] + summary["dropped_identical"] + summary["dropped_empty"] == summary["prompts"]
    pairs = load_records(out / "preferences.jsonl", kind="preference").records  # reads without an error
    assert len(pairs) == summary["pairs"] > 0 and all(p.chosen.strip() and p.rejected.strip() for p in pairs)


def test_local_backend_choice_probs_match_a_forward_pass(tiny_dir, rigged_dir, constitution):
    """P(A) / (P(A) + P(B)) read off one forward pass, where A, B and " B" are single tokens."""
    from alignkit.models.load import load_model, load_tokenizer

    model, tok = load_model(rigged_dir), load_tokenizer(rigged_dir)
    q = preference_prompt(PROMPT, COMPLY, REFUSE, constitution.principles[0])
    (p,) = LocalBackend(model, tok).choice_probs([q], ("A", "B"))
    ids = torch.tensor([tok(render_prompt(tok, q))["input_ids"]])
    with torch.no_grad():
        probs = model(ids).logits[0, -1].softmax(-1)

    def mass(label):
        total = 0.0
        for text in (label, " " + label):
            t = tok(text, add_special_tokens=False)["input_ids"]
            if len(t) == 1:
                total += float(probs[t[0]])
            else:  # space, then the letter
                with torch.no_grad():
                    nxt = model(torch.tensor([ids[0].tolist() + t[:1]])).logits[0, -1].softmax(-1)
                total += float(probs[t[0]]) * float(nxt[t[1]])
        return total

    assert p == pytest.approx(mass("A") / (mass("A") + mass("B")), abs=1e-4)


# ---- the world's demonstrations ----------------------------------------------------------------


def test_red_team_prompts(world):
    train, held = red_team_prompts(world, "train"), red_team_prompts(world, "eval")
    assert {r["category"] for r in train} == {"harmful", "benign"}
    assert len(train) == len(world.train["harmful"]) + len(world.train["benign"])
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held}
    with pytest.raises(ValueError):
        red_team_prompts(world, "test")


def test_cai_demos_use_training_questions_only(world, tmp_path):
    rows = cai_sft_records(world, seed=0, n=600)
    assert rows == cai_sft_records(world, seed=0, n=600)
    held = [t.question for c in ("harmful", "benign") for t in world.eval[c]]
    assert not [r for r in rows if any(q in m["content"] for q in held for m in r["prompt"])]
    path = tmp_path / "demos.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert len(load_records(path, kind="sft").records) == 600  # `alignkit sft` reads them


def test_cai_demos_are_right_by_the_gold_judge(world):
    """Revisions never score below the response they revise; harmful compliance is always
    revised into a refusal; preference answers pick the gold judge's favourite."""
    for r in cai_sft_records(world, seed=1, n=900):
        turns = r["prompt"]
        question = turns[0]["content"]
        prompt = f"Human: {question}\nAssistant:"
        if len(turns) == 5:  # a revision demonstration
            before, after = world.judge(prompt, " " + turns[1]["content"]), world.judge(prompt, r["response"])
            assert after.total >= before.total and after.harmless == 1.0
            if r["category"] == "harmful":
                assert after.label == "refusal"
        elif len(turns) == 3:
            assert r["response"].strip() in CRITIQUES.values()
        else:
            body = turns[0]["content"]
            q = body.split("Request: ", 1)[1].split("\n", 1)[0]
            a = body.split("(A) ", 1)[1].split("\n(B) ")[0]
            b = body.split("(B) ", 1)[1].split("\n")[0]
            p = f"Human: {q}\nAssistant:"
            sa, sb = world.score(p, " " + a), world.score(p, " " + b)
            assert (sa > sb) == (r["response"] == "A") and sa != sb


def test_helpful_only_sft(world):
    """The helpful-only assistant complies with harmful requests (the judge: harmless 0) and is
    otherwise the world's SFT data; "drop" leaves harmful requests out."""
    rows = helpful_sft_records(world, 0, 600)
    harmful = [r for r in rows if r["category"] == "harmful"]
    assert len(rows) == 600 and len(harmful) == 100
    assert all(world.judge(r["prompt"], r["response"]).label == "compliance" for r in harmful)
    dropped = helpful_sft_records(world, 0, 600, harmful="drop")
    assert [r for r in rows if r["category"] != "harmful"] == dropped
    with pytest.raises(ValueError):
        helpful_sft_records(world, 0, 6, harmful="refuse")


def test_local_backend_generates_conversations(tiny_dir):
    b = LocalBackend.from_dir(str(tiny_dir / "model"))
    conv = critique_prompt(PROMPT, COMPLY, Principle("p", "Is it bad?", "Fix it.", "Which?"))
    out = b.generate([PROMPT, conv], SamplingParams(max_new_tokens=4, greedy=True))
    assert len(out) == 2 and all(isinstance(x, str) for x in out)
    assert b.generate([PROMPT], SamplingParams(max_new_tokens=4, greedy=True))[0] == out[0]


# ---- the demo's CAI stage ----------------------------------------------------------------------


def test_cai_stage_in_a_quick_demo(tiny_dir, tmp_path, monkeypatch):
    """The demo stage runs start -> SL-CAI -> RL-CAI on a tiny random "base" model and records
    the figures; its training data holds no held-out question and no human harmlessness label
    (every harmful request in it is complied with, or is a prompt for the model's own revision)."""
    from alignkit import pipeline
    from alignkit.world.cai import label_agreement
    from alignkit.world.cai_demo import cai_stage

    # fewer steps than --quick: the code path is the same
    for stage, steps in (("sft", 8), ("dpo", 4)):
        monkeypatch.setitem(pipeline.QUICK, stage, [f"train.max_steps={steps}"])
    monkeypatch.setitem(pipeline.QUICK, "eval", ["limit=12", "max_new_tokens=8"])
    demo = pipeline.Demo(tmp_path / "demo", quick=True, seed=0)
    demo.summary["stages"]["base"] = {"model": str(tiny_dir / "model")}
    cai_stage(demo, ["revise_limit=8", "label_limit=8", "eval_max_new_tokens=8"])
    entry = json.loads((tmp_path / "demo" / "summary.json").read_text())["stages"]["cai"]
    assert entry["wall_s"] > 0 and entry["peak_mem_mb"] > 0 and 0.0 <= entry["gold_score"] <= 1.0
    assert set(entry["harmless"]) == set(entry["helpful"]) == {"start", "sl", "rl"}
    for name in ("start", "sl", "rl"):
        red = entry[name]["red_team"]
        assert red["harmful"]["n"] == 25 and red["benign"]["n"] == 20  # the held-out questions
        assert entry["harmless"][name] == red["harmful"]["harmless"]
        assert entry["helpful"][name] == red["benign"]["helpful"]
    assert entry["model"] == entry["rl"]["model"] and entry["rl"]["from"] == "sl"  # the paper's order
    for key in ("harmless_sampled", "helpful_sampled"):  # one sampled answer per prompt in quick mode
        assert set(entry[key]) == {"start", "sl", "rl"} and all(0.0 <= v <= 1.0 for v in entry[key].values())
    world = demo.world
    out = tmp_path / "demo" / "cai"
    pairs = [json.loads(x) for x in (out / "label" / "preferences.jsonl").read_text().splitlines()]
    assert entry["rl"]["label_agreement"] == label_agreement(world, pairs)
    held = [t.question for c in world.eval for t in world.eval[c]]
    for name in ("start_data.jsonl", "sl_data.jsonl", "revise_prompts.jsonl", "label_prompts.jsonl"):
        text = (out / name).read_text()
        assert not [q for q in held if q in text], name
    revised = [json.loads(x) for x in (out / "revise_prompts.jsonl").read_text().splitlines()]
    assert len(revised) == 16 and {r["category"] for r in revised} == {"harmful"}  # 8 prompts x 2
    for line in (out / "start_data.jsonl").read_text().splitlines():
        r = json.loads(line)
        if isinstance(r["prompt"], str) and r["category"] == "harmful":
            assert world.judge(r["prompt"], r["response"]).harmless == 0.0
    assert "| cai |" in (tmp_path / "demo" / "report.md").read_text()
    assert "harmless on held-out harmful requests" in entry["notes"]
