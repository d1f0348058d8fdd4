"""Pairwise judges (alignkit.feedback.judges) and the win rate (alignkit.eval.winrate)."""

from __future__ import annotations

import http.server
import json
import logging
import math
import random
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from alignkit.config import ConfigError
from alignkit.data.load import DataError
from alignkit.eval.winrate import (
    Config,
    bootstrap_interval,
    judge_agreement,
    run_winrate,
    tally,
    wilson_interval,
    win_rate,
)
from alignkit.feedback.judges import (
    DEFAULT_TEMPLATE,
    EndpointError,
    EndpointJudge,
    GoldJudge,
    HumanJudge,
    HumanLabelError,
    LabelsPending,
    LLMJudge,
    PairVerdict,
    RewardModelJudge,
    position_bias,
    render_question,
)
from alignkit.models.bpe import train_bpe_tokenizer
from alignkit.models.load import save_model, tiny_llama
from alignkit.world import World, write_world

FAKE_KEY = "sk-alignkit-TEST-7f3c9a1e5b2d-DO-NOT-LEAK"


@pytest.fixture(scope="module")
def world():
    return World(0)


def _pairs(world, good="ideal", bad="rude", per_category=2, seed=0):
    """(prompts, good answers, bad answers, categories) on held-out questions of every category."""
    rng = random.Random(seed)
    prompts, a, b, cats = [], [], [], []
    for cat, tasks in sorted(world.eval.items()):
        for t in tasks[:per_category]:
            prompts.append(world.prompt(t))
            a.append(world.render(t, good, rng))
            b.append(world.render(t, bad, rng))
            cats.append(cat)
    return prompts, a, b, cats


@pytest.fixture(scope="module")
def tok(world):
    prompts, a, b, _ = _pairs(world, per_category=5)
    texts = [p + x for p, x in zip(prompts, a + b)]
    for p, x, y in zip(prompts, a, b):
        texts += [
            render_question(DEFAULT_TEMPLATE, p, x, y) + " A",
            render_question(DEFAULT_TEMPLATE, p, y, x) + " B",
        ]
    return train_bpe_tokenizer(texts, vocab_size=400)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tok):
    """A small world folder and two tiny random models saved in Hugging Face format."""
    root = tmp_path_factory.mktemp("winrate")
    write_world(root / "world", seed=0, n_pairs=8, n_sft=8, n_pretrain=8, n_eval=12, n_pairs_eval=4)
    for name, seed in (("a", 1), ("b", 2)):
        save_model(tiny_llama("nano", len(tok), tok, seed=seed), tok, root / name)
    return SimpleNamespace(root=root, world=root / "world", a=str(root / "a"), b=str(root / "b"))


# ---- gold and reward-model judges ------------------------------------------------------------


def test_gold_judge_obvious_pairs(world):
    prompts, good, bad, cats = _pairs(world)
    judge = GoldJudge(world)
    v = judge.compare(prompts, good, bad)
    assert [x.outcome for x in v] == [1.0] * len(prompts)
    assert [x.detail["category"] for x in v] == cats
    assert all(x.detail["score_a"] > x.detail["score_b"] for x in v)
    assert [x.outcome for x in judge.compare(prompts, bad, good)] == [0.0] * len(prompts)
    assert [x.outcome for x in judge.compare(prompts, good, good)] == [0.5] * len(prompts)
    with pytest.raises(ValueError, match="equal lengths"):
        judge.compare(prompts, good, bad[:-1])


class LengthRewardModel(torch.nn.Module):
    """Stand-in for alignkit.models.heads.RewardModel: reward = number of real tokens / 10."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))

    def forward(self, input_ids, attention_mask):
        return self.w * attention_mask.sum(-1).float() / 10  # (B,)


def test_reward_model_judge_higher_reward_wins(tok):
    judge = RewardModelJudge(LengthRewardModel(), tok, batch_size=2)
    prompts = ["Human: hi\nAssistant:"] * 3
    a = [" a long answer with many words", " same", " x"]
    b = [" short", " same", " a much longer answer here"]
    v = judge.compare(prompts, a, b)
    assert [x.outcome for x in v] == [1.0, 0.5, 0.0]
    for x in v:
        d = x.detail["reward_a"] - x.detail["reward_b"]
        assert x.p_a == pytest.approx(1 / (1 + math.exp(-d)))
    # lengths: prompt + answer + EOS, as in reward-model training
    n = (
        len(tok(prompts[0], add_special_tokens=False)["input_ids"])
        + len(tok(a[0], add_special_tokens=False)["input_ids"])
        + 1
    )
    assert v[0].detail["reward_a"] == pytest.approx(n / 10)


def test_run_winrate_with_a_saved_reward_model(setup, tok):
    heads = pytest.importorskip("alignkit.models.heads")
    from alignkit.data.tokenize import encode_pair

    rm = heads.RewardModel.from_pretrained(setup.a, mode="full", seed=0)
    rm_dir = setup.root / "rm"
    heads.save_reward_model(rm, tok, rm_dir)
    out = setup.root / "reward-run"
    cfg = Config(
        a=setup.a, b=setup.b, world=str(setup.world), judge=f"reward:{rm_dir}", out=str(out), limit=3
    )
    s = run_winrate(cfg)
    assert s["n"] == 3
    row = json.loads((out / "verdicts.jsonl").read_text().splitlines()[0])
    ids = encode_pair(tok, row["prompt"], row["response_a"]).input_ids
    with torch.no_grad():
        expected = rm.eval()(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))
    assert row["detail"]["reward_a"] == pytest.approx(expected.item(), abs=1e-4)
    d = row["detail"]["reward_a"] - row["detail"]["reward_b"]
    assert row["p_a"] == pytest.approx(1 / (1 + math.exp(-d)))


# ---- LLM judge: both orders, position bias ---------------------------------------------------


def _sections(text: str) -> tuple[str, str, str]:
    """(request, first answer, second answer) from a question rendered with DEFAULT_TEMPLATE."""
    request = text.split("Request:\n", 1)[1].split("\n\nAnswer A:\n", 1)[0]
    first = text.split("\n\nAnswer A:\n", 1)[1].split("\n\nAnswer B:\n", 1)[0]
    second = text.split("\n\nAnswer B:\n", 1)[1].split("\n\nWhich answer", 1)[0]
    return request, first, second


class RiggedLM(torch.nn.Module):
    """A causal LM stand-in whose every position puts logit 5 on the labels `decide(text)` picks
    (0: the first label "A", 1: "B", None: both), reading the decoded question of each row."""

    def __init__(self, tok, decide):
        super().__init__()
        self.tok, self.decide = tok, decide
        self.dummy = torch.nn.Parameter(torch.zeros(()))
        self.label_ids = [
            [tok(s, add_special_tokens=False)["input_ids"][-1] for s in (label, " " + label)]
            for label in "AB"
        ]

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=False):
        B, T = input_ids.shape
        logits = torch.zeros(B, T, len(self.tok))  # (B, T, V)
        for i in range(B):
            text = self.tok.decode(input_ids[i][attention_mask[i].bool()], skip_special_tokens=True)
            pick = self.decide(text)
            for label in (0, 1) if pick is None else (pick,):
                logits[i, :, self.label_ids[label]] = 5.0
        return SimpleNamespace(logits=logits)


def test_llm_judge_first_position_model_gives_ties(world, tok):
    """A judge that always answers "A" (the first position) is right only by position: asked in
    both orders, P(a better) = (sigmoid(5) + 1 - sigmoid(5)) / 2 = 0.5 on every pair."""
    prompts, good, bad, _ = _pairs(world)
    judge = LLMJudge(RiggedLM(tok, lambda text: 0), tok, batch_size=3)
    v = judge.compare(prompts, good, bad)
    assert [x.outcome for x in v] == [0.5] * len(prompts)
    assert all(x.p_a == pytest.approx(0.5) for x in v)
    assert all(x.detail["p_a_first"] == pytest.approx(1 / (1 + math.exp(-5))) for x in v)
    assert position_bias(v) == {"flip_rate": 1.0, "first_position_rate": 1.0}


def test_llm_judge_content_model_gives_correct_verdicts(world, tok):
    def better(text):
        request, first, second = _sections(text)
        s1, s2 = world.score(request, " " + first), world.score(request, " " + second)
        return None if s1 == s2 else (0 if s1 > s2 else 1)

    prompts, good, bad, _ = _pairs(world)
    judge = LLMJudge(RiggedLM(tok, better), tok, batch_size=4)
    gold = GoldJudge(world)
    a = good[::2] + bad[1::2]  # mix: a is better on even pairs, worse on odd ones
    b = bad[::2] + good[1::2]
    ps = prompts[::2] + prompts[1::2]
    v = judge.compare(ps, a, b)
    assert [x.outcome for x in v] == [x.outcome for x in gold.compare(ps, a, b)]
    assert {x.outcome for x in v} == {0.0, 1.0}
    assert position_bias(v) == {"flip_rate": 0.0, "first_position_rate": 0.5}


def _scrambled(tok, seed=3):
    model = tiny_llama("nano", len(tok), tok, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


def test_llm_judge_reading_matches_a_plain_forward(world, tok):
    """Batched, left-padded reading equals one unpadded forward per question: single-token labels
    read from the next-token distribution, and the teacher-forced path (used for multi-token
    labels) gives the same numbers on them."""
    model = _scrambled(tok)
    judge = LLMJudge(model, tok, batch_size=4)
    assert all(len(v) == 1 for vs in judge.variants for v in vs)
    prompts, good, bad, _ = _pairs(world, per_category=1)
    questions = [render_question(DEFAULT_TEMPLATE, p, x, y) for p, x, y in zip(prompts, good, bad)]
    got = judge.first_probs(questions)
    for q, p in zip(questions, got):
        ids = tok(q, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            lp = model(torch.tensor([ids])).logits[0, -1].log_softmax(-1)
        la = torch.logsumexp(lp[[tok("A")["input_ids"][0], tok(" A")["input_ids"][0]]], 0)
        lb = torch.logsumexp(lp[[tok("B")["input_ids"][0], tok(" B")["input_ids"][0]]], 0)
        assert p == pytest.approx(torch.sigmoid(la - lb).item(), abs=1e-5)
    chunk = [judge._encode(q) for q in questions]
    forced = judge._sequence_logprobs(chunk)
    with torch.no_grad():
        for ids, per_label in zip(chunk, forced):
            lp = model(torch.tensor([ids])).logits[0, -1].log_softmax(-1)
            for label, vs in zip(per_label, judge.variants):
                assert label == pytest.approx([lp[v[0]].item() for v in vs], abs=1e-4)


def test_llm_judge_multi_token_labels(world, tok):
    model = _scrambled(tok)
    template = DEFAULT_TEMPLATE.replace("Answer A", "Answer Alpha").replace("Answer B", "Answer Beta")
    judge = LLMJudge(model, tok, template=template, labels=("Alpha", "Beta"), batch_size=3)
    assert any(len(v) > 1 for vs in judge.variants for v in vs)
    q = render_question(template, "Human: What is 2 plus 2?\nAssistant:", " 4.", " 5.")
    (p,) = judge.first_probs([q])
    ids = tok(q, add_special_tokens=False)["input_ids"]

    def seq_lp(cont):
        full = torch.tensor([ids + cont])
        with torch.no_grad():
            lp = model(full).logits[0].log_softmax(-1)
        return sum(lp[len(ids) - 1 + j, t].item() for j, t in enumerate(cont))

    la = math.log(sum(math.exp(seq_lp(v)) for v in judge.variants[0]))
    lb = math.log(sum(math.exp(seq_lp(v)) for v in judge.variants[1]))
    assert p == pytest.approx(1 / (1 + math.exp(lb - la)), abs=1e-4)


def test_llm_judge_chat_template_and_bad_template(tok):
    with pytest.raises(ValueError, match="{second}"):
        LLMJudge(RiggedLM(tok, lambda t: 0), tok, template="{prompt} {first}")
    judge = LLMJudge(RiggedLM(tok, lambda t: 0), tok, chat=True)
    assert tok.decode(judge._encode("Hello")).endswith("Human: Hello\nAssistant:")


# ---- win rate, interval, agreement -------------------------------------------------------------


def test_wilson_interval_by_hand():
    """7 wins of 10, z = 1.959964 (95%): z^2/n = 0.3841459, denominator 1.3841459,
    centre = (0.7 + 0.1920729) / 1.3841459 = 0.6444934,
    half = 1.959964 / 1.3841459 * sqrt(0.7 * 0.3 / 10 + 3.841459 / 400) = 1.4160097 * 0.1749390 = 0.2477153,
    so [0.3967781, 0.8922087]. Two wins traded for four ties is the same mean and the same interval.
    5 wins of 5: centre = 1.3841459 / 1.7682918 = 0.7827588, half = 1.1083940 * 0.1959964 = 0.2172412,
    so [0.5655175, 1]."""
    rate, lo, hi = win_rate([1] * 7 + [0] * 3)
    assert (rate, lo, hi) == pytest.approx((0.7, 0.3967781, 0.8922087), abs=1e-6)
    assert win_rate([1] * 5 + [0.5] * 4 + [0] * 1) == pytest.approx((0.7, 0.3967781, 0.8922087), abs=1e-6)
    assert win_rate([1] * 5) == pytest.approx((1.0, 0.5655175, 1.0), abs=1e-6)
    assert wilson_interval([0] * 5) == pytest.approx((0.0, 1 - 0.5655175), abs=1e-6)
    t = tally([1, 1, 0.5, 0])
    assert (t["n"], t["wins"], t["ties"], t["losses"], t["win_rate"]) == (4, 2, 1, 1, 0.625)
    with pytest.raises(ValueError, match="no outcomes"):
        win_rate([])
    with pytest.raises(ValueError, match="outcome 1"):
        win_rate([1, 2])


def test_bootstrap_interval():
    assert bootstrap_interval([0.5] * 20) == (0.5, 0.5)
    xs = [1] * 200 + [0.5] * 80 + [0] * 120  # mean 0.6, per-outcome sd 0.4583
    lo, hi = bootstrap_interval(xs, n_boot=1000, seed=0)
    half = 1.959964 * math.sqrt(sum((x - 0.6) ** 2 for x in xs) / len(xs) / len(xs))  # normal approx 0.0449
    assert lo == pytest.approx(0.6 - half, abs=0.01) and hi == pytest.approx(0.6 + half, abs=0.01)
    assert bootstrap_interval(xs, n_boot=1000, seed=0) == (lo, hi)
    # ties make the bootstrap narrower than Wilson's conservative interval
    w_lo, w_hi = wilson_interval(xs)
    assert hi - lo < w_hi - w_lo
    assert win_rate(xs, interval="bootstrap", n_boot=1000, seed=0)[1:] == (lo, hi)


def test_cohens_kappa_by_hand():
    """See judge_agreement's docstring: p_o = 0.75, p_e = 0.51, kappa = 0.24 / 0.49.
    With ties (3 classes): judge [a, a, tie, b], human [a, tie, tie, b]: p_o = 3/4,
    p_e = (2*1 + 1*2 + 1*1) / 16 = 5/16, kappa = (12/16 - 5/16) / (11/16) = 7/11."""
    judge = [1] * 9 + [1] * 3 + [0] * 2 + [0] * 6
    human = [1] * 9 + [0] * 3 + [1] * 2 + [0] * 6
    r = judge_agreement(judge, human)
    assert r["agreement"] == pytest.approx(0.75)
    assert r["cohens_kappa"] == pytest.approx(0.24 / 0.49)
    assert r["confusion_judge_by_human"]["a"]["b"] == 3
    r = judge_agreement([PairVerdict(0.9, 1.0), 1, 0.5, 0], [1, 0.5, 0.5, 0])
    assert (r["agreement"], r["cohens_kappa"]) == (pytest.approx(0.75), pytest.approx(7 / 11))
    assert judge_agreement([1, 1], [1, 1])["cohens_kappa"] is None
    assert judge_agreement([1, 0], [1, 0])["cohens_kappa"] == 1.0


# ---- endpoint judge: a local OpenAI-style server -----------------------------------------------


class _Server:
    """An OpenAI-compatible /v1/chat/completions on 127.0.0.1 in a thread.

    mode "logprobs": prefers the shorter answer (P = 0.8) and reports it in top_logprobs;
    "text": no logprobs, the reply text names the label; "echo401": refuses with a body that
    echoes the Authorization header it received.
    """

    def __init__(self, mode="logprobs"):
        self.mode = mode
        self.auth: list[str | None] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.auth.append(self.headers.get("Authorization"))
                if server.mode == "echo401":
                    return self._send(
                        401, {"error": {"message": f"bad key {self.headers.get('Authorization')}"}}
                    )
                _, first, second = _sections(body["messages"][0]["content"])
                pick, other = ("A", "B") if len(first) <= len(second) else ("B", "A")
                choice = {"index": 0, "message": {"role": "assistant", "content": f"Answer {pick}"}}
                if server.mode == "logprobs":
                    top = [
                        {"token": " " + pick, "logprob": math.log(0.8)},
                        {"token": other, "logprob": math.log(0.2)},
                    ]
                    choice["message"]["content"] = pick
                    choice["logprobs"] = {
                        "content": [{"token": pick, "logprob": math.log(0.8), "top_logprobs": top}]
                    }
                self._send(
                    200, {"id": "x", "object": "chat.completion", "model": body["model"], "choices": [choice]}
                )

            def _send(self, code, obj):
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = _Server()
    yield s
    s.close()


def test_endpoint_judge_reads_logprobs_and_text(server, monkeypatch):
    monkeypatch.setenv("ALIGNKIT_TEST_KEY", FAKE_KEY)
    prompts = ["Human: hi\nAssistant:"] * 2
    a, b = [" short", " a much longer answer"], [" a much longer answer", " short"]
    judge = EndpointJudge(server.url, "judge-model", api_key_env="ALIGNKIT_TEST_KEY", max_workers=2)
    v = judge.compare(prompts, a, b)
    assert [x.outcome for x in v] == [1.0, 0.0]
    assert v[0].p_a == pytest.approx(0.8) and v[0].detail["read_from"] == ["logprobs", "logprobs"]
    server.mode = "text"
    v = judge.compare(prompts, a, b)
    assert [x.p_a for x in v] == [1.0, 0.0] and v[0].detail["read_from"] == ["text", "text"]
    assert server.auth == [f"Bearer {FAKE_KEY}"] * 8


def test_endpoint_key_never_leaks(server, setup, monkeypatch, caplog, capsys):
    monkeypatch.setenv("ALIGNKIT_TEST_KEY", FAKE_KEY)
    caplog.set_level(logging.DEBUG)
    out = setup.root / "endpoint-run"
    cfg = Config(
        a=setup.a,
        b=setup.b,
        world=str(setup.world),
        judge="endpoint",
        out=str(out),
        endpoint_url=server.url,
        endpoint_model="judge-model",
        api_key_env="ALIGNKIT_TEST_KEY",
        limit=4,
        max_new_tokens=4,
    )
    summary = run_winrate(cfg)
    print(json.dumps(summary))
    assert summary["n"] == 4 and "position_bias" in summary
    assert server.auth == [f"Bearer {FAKE_KEY}"] * 8
    judge = EndpointJudge(server.url, "judge-model", api_key_env="ALIGNKIT_TEST_KEY")
    judge.compare(["Human: hi\nAssistant:"], [" x"], [" y"])
    # the refusal echoes the key back: the error must not carry it
    server.mode = "echo401"
    with pytest.raises(EndpointError, match="HTTP 401") as err:
        judge.compare(["Human: hi\nAssistant:"], [" x"], [" y"])
    logging.getLogger("test").error("endpoint failed: %s", err.value, exc_info=err.value)
    captured = capsys.readouterr()
    files = sorted(p for p in out.rglob("*") if p.is_file())
    assert {p.name for p in files} >= {"responses.jsonl", "verdicts.jsonl", "winrate.json"}
    places = {str(p): p.read_bytes().decode("utf-8", "replace") for p in files}
    places.update(
        logs=caplog.text,
        stdout=captured.out,
        stderr=captured.err,
        error=str(err.value),
        error_repr=repr(err.value),
        judge=repr(judge),
        judge_vars=repr(vars(judge)),
        summary=repr(summary),
    )
    assert "[redacted]" in str(err.value)
    for where, text in places.items():
        assert FAKE_KEY not in text, f"the API key leaked into {where}"
        assert FAKE_KEY[8:24] not in text, f"part of the API key leaked into {where}"


def test_endpoint_key_handling_errors(monkeypatch):
    monkeypatch.delenv("ALIGNKIT_TEST_KEY", raising=False)
    judge = EndpointJudge("http://127.0.0.1:9/v1", "m", api_key_env="ALIGNKIT_TEST_KEY")
    with pytest.raises(EndpointError, match="ALIGNKIT_TEST_KEY"):
        judge.compare(["p"], ["a"], ["b"])
    with pytest.raises(ValueError, match="plain http"):
        EndpointJudge("http://judge.example.com/v1", "m", api_key_env="ALIGNKIT_TEST_KEY")
    EndpointJudge("http://judge.example.com/v1", "m", api_key_env=None)  # no key, no objection


# ---- human judge -------------------------------------------------------------------------------


def _label_like_a_person(world, path: Path, tie_line: int | None = None) -> None:
    """Fill in each label by the gold judge on the SHOWN answers (A, B as displayed)."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for n, row in enumerate(rows, 1):
        sa, sb = world.score(row["prompt"], row["answer_A"]), world.score(row["prompt"], row["answer_B"])
        row["label"] = "tie" if n == tie_line else ("A" if sa > sb else "b")
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_human_export_import_round_trip(world, tmp_path):
    prompts, good, bad, _ = _pairs(world)
    judge = HumanJudge(tmp_path / "pairs.jsonl", seed=0)
    with pytest.raises(LabelsPending, match="pairs.jsonl"):
        judge.compare(prompts, good, bad)
    rows = [json.loads(line) for line in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    key = [json.loads(line) for line in judge.key_path.read_text().splitlines()]
    assert len(rows) == len(prompts) and all(r["label"] == "" for r in rows)
    assert "swapped" not in rows[0] and {r["id"] for r in rows} == {k["id"] for k in key}
    swapped = [k["swapped"] for k in key]
    assert any(swapped) and not all(swapped)
    for r, k, g in zip(rows, key, good):
        assert r["answer_B" if k["swapped"] else "answer_A"] == g
    _label_like_a_person(world, judge.pairs_path, tie_line=2)
    v = judge.compare(prompts, good, bad)
    assert [x.outcome for x in v] == [1.0, 0.5] + [1.0] * (len(prompts) - 2)
    with pytest.raises(HumanLabelError, match="no pair for prompt 1"):
        judge.compare(prompts, bad, good)


@pytest.mark.parametrize(
    "label, message",
    [
        ("", "pairs.jsonl:3: pair .* has no label yet"),
        ("C", "pairs.jsonl:3: pair .* has label 'C'"),
        (1, "pairs.jsonl:3: .*has label 1"),
    ],
)
def test_human_bad_labels_name_file_and_line(world, tmp_path, label, message):
    prompts, good, bad, _ = _pairs(world, per_category=1)
    judge = HumanJudge(tmp_path / "pairs.jsonl")
    judge.export(prompts, good, bad)
    rows = [json.loads(line) for line in judge.pairs_path.read_text().splitlines()]
    for r in rows:
        r["label"] = "A"
    rows[2]["label"] = label
    judge.pairs_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(HumanLabelError, match=message):
        judge.read()


# ---- end to end ----------------------------------------------------------------------------------


def test_run_winrate_gold_end_to_end(setup):
    out = setup.root / "gold-run"
    cfg = Config(
        a=setup.a, b=setup.b, world=str(setup.world), judge="gold", out=str(out), limit=6, max_new_tokens=6
    )
    s = run_winrate(cfg)
    assert s["n"] == 6 and s["wins"] + s["ties"] + s["losses"] == 6
    assert s["ci_low"] <= s["win_rate"] <= s["ci_high"]
    assert sum(c["n"] for c in s["per_category"].values()) == 6
    assert json.loads((out / "winrate.json").read_text()) == json.loads(json.dumps(s))
    rows = [json.loads(line) for line in (out / "verdicts.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and sum(r["outcome"] for r in rows) / 6 == pytest.approx(s["win_rate"])
    assert len((out / "responses.jsonl").read_text().splitlines()) == 6
    # a model against itself (greedy): identical answers, all ties
    same = run_winrate(Config(a=setup.a, b=setup.a, world=str(setup.world), limit=3, max_new_tokens=4))
    assert (same["ties"], same["win_rate"]) == (3, 0.5)


def test_run_winrate_llm_judge_from_a_directory(setup, tmp_path):
    template = tmp_path / "question.txt"
    template.write_text("Q: {prompt}\nA: {first}\nB: {second}\nBetter:")
    cfg = Config(
        a=setup.a,
        b=setup.b,
        world=str(setup.world),
        judge=f"llm:{setup.a}",
        judge_template=str(template),
        limit=2,
        max_new_tokens=4,
    )
    s = run_winrate(cfg)
    assert s["n"] == 2 and set(s["position_bias"]) == {"flip_rate", "first_position_rate"}
    template.write_text("{prompt} {first} {second} {other}")
    with pytest.raises(ConfigError, match="judge_template.*other"):
        run_winrate(cfg)


def test_run_winrate_human_two_runs(setup):
    out = setup.root / "human-run"
    cfg = Config(
        a=setup.a, b=setup.b, world=str(setup.world), judge="human", out=str(out), limit=3, max_new_tokens=4
    )
    first = run_winrate(cfg)
    assert first["status"] == "awaiting_labels" and first["n"] == 3
    pairs = out / "human_pairs.jsonl"
    assert first["pairs_file"] == str(pairs) and (out / "human_pairs.jsonl.key").is_file()
    rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    for r, label in zip(rows, ["A", "tie", "B"]):
        r["label"] = label
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    key = [json.loads(line) for line in (out / "human_pairs.jsonl.key").read_text().splitlines()]
    expected = [{"A": 1.0, "tie": 0.5, "B": 0.0}[x] for x in ["A", "tie", "B"]]
    expected = [1.0 - e if k["swapped"] else e for e, k in zip(expected, key)]
    second = run_winrate(cfg)
    assert second["n"] == 3 and second["win_rate"] == pytest.approx(sum(expected) / 3)
    verdicts = [json.loads(line) for line in (out / "verdicts.jsonl").read_text().splitlines()]
    assert [v["outcome"] for v in verdicts] == expected


def test_run_winrate_agreement_mode(world, setup, tmp_path):
    prompts, good, bad, _ = _pairs(world)
    human = ["A"] * len(prompts)
    human[0], human[1] = "B", "tie"  # the gold judge says a wins on all of them
    path = tmp_path / "labels.jsonl"
    path.write_text(
        "".join(
            json.dumps({"prompt": p, "a": x, "b": y, "label": h}) + "\n"
            for p, x, y, h in zip(prompts, good, bad, human)
        )
    )
    s = run_winrate(
        Config(human_labels=str(path), judge="gold", world=str(setup.world), out=str(tmp_path / "o"))
    )
    n = len(prompts)
    # judge always a; human a on n-2: p_o = (n-2)/n, p_e = (n-2)/n, kappa = 0
    assert s["agreement"] == pytest.approx((n - 2) / n) and s["cohens_kappa"] == pytest.approx(0.0)
    assert (tmp_path / "o" / "agreement.json").is_file()
    path.write_text(
        path.read_text() + json.dumps({"prompt": "p", "a": "x", "b": "y", "label": "maybe"}) + "\n"
    )
    with pytest.raises(DataError, match=f"labels.jsonl:{n + 1}: label 'maybe'"):
        run_winrate(Config(human_labels=str(path), judge="gold", world=str(setup.world)))


def test_run_winrate_config_errors(setup):
    with pytest.raises(ConfigError, match="did you mean 'gold'"):
        run_winrate(Config(a=setup.a, b=setup.b, world=str(setup.world), judge="glod"))
    with pytest.raises(ConfigError, match="needs world"):
        run_winrate(Config(a=setup.a, b=setup.b, prompts=str(setup.world / "eval_prompts.jsonl")))
    with pytest.raises(ConfigError, match="'a' and 'b'"):
        run_winrate(Config(world=str(setup.world)))


def test_sign_test_by_hand():
    """8 wins, 2 losses: P(X <= 2 | n=10, 1/2) = (1 + 10 + 45) / 1024; two-sided 112 / 1024."""
    from alignkit.eval.winrate import sign_test

    assert sign_test(8, 2) == pytest.approx(112 / 1024)
    assert sign_test(2, 8) == sign_test(8, 2)
    assert sign_test(5, 5) == 1.0 and sign_test(0, 0) == 1.0
    assert sign_test(10, 0) == pytest.approx(2 / 1024)
