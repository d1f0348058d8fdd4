"""Reward model: last-token pooling, padding invariance, training modes, save/load, the stage, eval."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from alignkit.config import ConfigError, DataConfig, ModelConfig, TrainConfig, load_config
from alignkit.data.batching import collate_preference
from alignkit.data.load import load_records
from alignkit.data.records import Message, prompt_text
from alignkit.data.tokenize import TokenizedPair, TruncationLimits, tokenize_preference
from alignkit.models.bpe import train_bpe_tokenizer
from alignkit.models.heads import (
    RewardModel,
    RewardStats,
    last_token_index,
    load_reward_model,
    right_align,
    save_reward_model,
)
from alignkit.models.load import save_model, tiny_llama
from alignkit.train import reward
from alignkit.world import write_world

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("world")
    write_world(d, n_pairs=64, n_sft=8, n_pretrain=8, n_eval=4, n_pairs_eval=24)
    return d


@pytest.fixture(scope="module")
def tok(world_dir):
    pairs = load_records(world_dir / "preferences.jsonl", kind="preference").records
    texts = [prompt_text(p.prompt) + p.chosen + p.rejected for p in pairs] * 4
    return train_bpe_tokenizer(texts, vocab_size=400)


@pytest.fixture(scope="module")
def sft_dir(tmp_path_factory, tok) -> Path:
    """A tiny causal LM + tokenizer saved like an SFT model."""
    d = tmp_path_factory.mktemp("sft") / "final"
    save_model(tiny_llama("nano", tokenizer=tok, seed=3), tok, d)
    return d


def _rm(tok, seed: int = 0) -> RewardModel:
    rm = RewardModel.from_model(tiny_llama("nano", tokenizer=tok, seed=seed), seed=seed)
    return rm.eval()


ROWS = [[5, 6, 7, 8, 9, 10, 44], [11, 12], [13, 14, 15, 16, 17], [100]]


def _batch(rows, pad_id: int, side: str, extra: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    t = max(len(r) for r in rows) + extra
    ids = torch.full((len(rows), t), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), t), dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(0, len(r)) if side == "right" else slice(t - len(r), t)
        ids[i, sl] = torch.tensor(r)
        mask[i, sl] = 1
    return ids, mask


def test_last_token_index_by_hand():
    """Rightmost 1 of each mask row: right padding (2), left padding (4), none (4), one token (1)."""
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 1, 0, 0, 0]])
    assert last_token_index(mask).tolist() == [2, 4, 4, 1]
    ids = torch.tensor([[9, 8, 7, 0, 0], [0, 0, 3, 4, 5]])
    a, m = right_align(ids, mask[:2])
    assert a.tolist() == [[9, 8, 7, 0, 0], [3, 4, 5, 0, 0]]
    assert m.tolist() == [[1, 1, 1, 0, 0]] * 2


def _gpt2_rm(tok) -> RewardModel:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tok),
        n_embd=32,
        n_layer=1,
        n_head=2,
        n_positions=64,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    lm = GPT2LMHeadModel(config)
    return RewardModel.from_model(lm).eval()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_reward_is_padding_invariant_and_reads_the_last_real_token(tok, arch):
    """Left, right and extra padding give the rewards of each row scored alone (no padding).
    GPT-2 has absolute position embeddings: without position ids from the mask, left padding
    would shift them and change the reward."""
    rm = _rm(tok) if arch == "llama" else _gpt2_rm(tok)
    pad = tok.pad_token_id
    with torch.no_grad():
        alone = torch.cat([rm(torch.tensor([r]), torch.ones(1, len(r), dtype=torch.long)) for r in ROWS])
        for side in ("right", "left"):
            for extra in (0, 6):
                r = rm(*_batch(ROWS, pad, side, extra))
                torch.testing.assert_close(r, alone, atol=1e-5, rtol=0)
        # the pad id itself is irrelevant: only the mask says what is padding
        ids, mask = _batch(ROWS, pad, "right", 3)
        torch.testing.assert_close(rm(ids.masked_fill(mask == 0, 77), mask), alone, atol=1e-5, rtol=0)
        # the reward is the head applied to the hidden state of the last real token
        row = torch.tensor([ROWS[0]])
        h = rm.backbone(input_ids=row).last_hidden_state[0, -1]
        assert torch.allclose(rm(row, torch.ones_like(row)), rm.head(h), atol=1e-6)


def test_per_token_values_are_zero_on_padding_and_end_at_the_reward(tok):
    rm = _rm(tok)
    ids, mask = _batch(ROWS, tok.pad_token_id, "left", 2)
    with torch.no_grad():
        v = rm(ids, mask, per_token=True)
        r = rm(ids, mask)
    assert v.shape == ids.shape
    assert torch.all(v[mask == 0] == 0)
    torch.testing.assert_close(v[:, -1], r, atol=1e-6, rtol=0)


def _pairs(tok, n: int = 6) -> list[TokenizedPair]:
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        p, c, r = (
            torch.randint(3, len(tok), (k,), generator=g).tolist() for k in (3 + i % 3, 2 + i % 4, 4 - i % 3)
        )
        out.append(TokenizedPair(p, c, r, margin=0.5 * (i % 2), soft_label=None))
    return out


def test_step_loss_equals_bradley_terry_of_separately_scored_rewards(tok):
    """loss_i = -log(1 / (1 + exp(-(r_c - r_r - m_i)))) + c (r_c + r_r)^2, each response scored alone
    (a plain reference), summed; weight = number of pairs; metrics are the plain means."""
    rm = _rm(tok)
    items = _pairs(tok)
    batch = collate_preference(items, tok.pad_token_id)
    out = reward.reward_step(rm, batch, use_margin=True, center_coef=0.01)
    with torch.no_grad():

        def alone(ids):
            return float(rm(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long)))

        rc = [alone(x.prompt_ids + x.chosen_ids) for x in items]
        rr = [alone(x.prompt_ids + x.rejected_ids) for x in items]
    ref = [
        -math.log(1 / (1 + math.exp(-(c - r - x.margin)))) + 0.01 * (c + r) ** 2
        for c, r, x in zip(rc, rr, items)
    ]
    assert out.weight == len(items)
    assert abs(float(out.loss.detach()) - sum(ref)) < 1e-4
    assert out.metrics["accuracy"] == pytest.approx(sum(c > r for c, r in zip(rc, rr)) / len(items))
    assert out.metrics["margin"] == pytest.approx(sum(c - r for c, r in zip(rc, rr)) / len(items), abs=1e-5)
    assert out.metrics["reward/min"] == pytest.approx(min(rc + rr), abs=1e-5)
    assert out.metrics["reward/max"] == pytest.approx(max(rc + rr), abs=1e-5)
    assert out.metrics["reward/mean"] == pytest.approx(sum(rc + rr) / (2 * len(items)), abs=1e-5)
    # margins ignored when use_margin is off: the plain loss is then smaller for every pair
    plain = reward.reward_step(rm, batch, use_margin=False)
    assert float(plain.loss.detach()) == pytest.approx(
        sum(-math.log(1 / (1 + math.exp(-(c - r)))) for c, r in zip(rc, rr)), abs=1e-4
    )


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_shared_prompt_step_equals_two_row_step(tok, attn):
    """The step on one row per pair (prompt once, tree mask: `SharedPromptPairs`) gives the two-row
    step's loss, metrics and gradients, fp32, 1e-5 (a pair without a prompt among them), and
    `make_collate` picks that layout for these short rows."""
    from alignkit.data.packing import SharedPromptPairs, collate_shared_prompt

    rm = _rm(tok).train()
    rm.backbone.config._attn_implementation = attn
    items = _pairs(tok) + [TokenizedPair([], [7, 8], [9])]
    pad = tok.pad_token_id
    share = reward.sharing_prompts(rm)
    assert share == (rm.backbone.config.hidden_size, rm.backbone.config.intermediate_size)
    assert isinstance(reward.make_collate(pad, share)(items), SharedPromptPairs)
    a = reward.reward_step(rm, collate_shared_prompt(items, pad), center_coef=0.01)
    b = reward.reward_step(rm, collate_preference(items, pad), center_coef=0.01)
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-5, atol=1e-5)
    assert a.weight == b.weight == len(items)
    for k in ("accuracy", "margin", "reward/mean", "reward/min", "reward/max"):
        assert a.metrics[k] == pytest.approx(b.metrics[k], abs=1e-5), k
    assert a.metrics["ntokens"] == sum(len(x.prompt_ids) + bool(x.prompt_ids) + len(x.chosen_ids)
                                       + len(x.rejected_ids) for x in items)
    params = rm.trainable_parameters()
    ga, gb = torch.autograd.grad(a.loss, params), torch.autograd.grad(b.loss, params)
    assert max(g.abs().max().item() for g in gb) > 1e-4
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
    assert reward.sharing_prompts(rm, share_prompt=False) is None


def test_head_mode_trains_only_the_head(tok):
    rm = RewardModel.from_model(tiny_llama("nano", tokenizer=tok, seed=0)).set_mode("head")
    before = {k: v.clone() for k, v in rm.backbone.state_dict().items()}
    head_before = rm.head.weight.detach().clone()
    opt = torch.optim.AdamW(rm.trainable_parameters(), lr=1e-2)
    batch = collate_preference(_pairs(tok), tok.pad_token_id)
    rm.train()
    assert not rm.backbone.training  # a frozen backbone stays in eval mode (no dropout)
    for _ in range(3):
        out = reward.reward_step(rm, batch)
        out.loss.backward()
        assert all(p.grad is None for p in rm.backbone.parameters())
        opt.step()
        opt.zero_grad()
    assert {id(p) for p in rm.trainable_parameters()} == {id(p) for p in rm.head.parameters()}
    for k, v in rm.backbone.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not torch.equal(rm.head.weight, head_before)


def test_save_load_round_trip_keeps_rewards_and_stats(tok, tmp_path):
    rm = _rm(tok, seed=1)
    ids, mask = _batch(ROWS, tok.pad_token_id, "right")
    with torch.no_grad():
        r = rm(ids, mask)
    stats = RewardStats.of(torch.tensor([1.0, 2.0, 3.0, 6.0]))
    assert (stats.mean, stats.std, stats.n) == (3.0, pytest.approx(math.sqrt(3.5)), 4)  # var = (4+1+0+9)/4
    save_reward_model(rm, tok, tmp_path / "rm", stats)
    assert {
        "config.json",
        "model.safetensors",
        "head.safetensors",
        "reward_stats.json",
        "reward_config.json",
    } <= {p.name for p in (tmp_path / "rm").iterdir()}
    back = load_reward_model(tmp_path / "rm").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(ids, mask), r, atol=1e-6, rtol=0)
    assert back.stats == stats
    torch.testing.assert_close(back.normalize(torch.tensor([3.0])), torch.tensor([0.0]))


def test_lora_mode_saves_merged_weights(tok, tmp_path):
    rm = RewardModel.from_model(tiny_llama("nano", tokenizer=tok, seed=0))
    rm.set_mode("lora", ModelConfig(lora_r=4, lora_targets="q_proj,v_proj"))
    trainable = [n for n, p in rm.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or n.startswith("head.") for n in trainable)
    with torch.no_grad():  # LoRA B starts at 0; make the adapters matter
        for n, p in rm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    rm.eval()
    ids, mask = _batch(ROWS, tok.pad_token_id, "left")
    with torch.no_grad():
        r = rm(ids, mask)
    save_reward_model(rm, tok, tmp_path / "rm")
    back = load_reward_model(tmp_path / "rm").eval()
    assert not any("lora" in k for k in back.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(back(ids, mask), r, atol=1e-5, rtol=0)


def test_seq_cls_backbones(tok, tmp_path):
    """An encoder (BERT) uses its own pooling + classifier after moving rows to right padding; a
    Llama-for-sequence-classification is read at the last real token with its `score` layer."""
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        LlamaConfig,
        LlamaForSequenceClassification,
    )

    bert = BertForSequenceClassification(
        BertConfig(
            vocab_size=len(tok),
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            num_labels=1,
            pad_token_id=tok.pad_token_id,
        )
    )
    bert.save_pretrained(tmp_path / "bert")
    tok.save_pretrained(tmp_path / "bert")
    rm = RewardModel.from_pretrained(tmp_path / "bert", mode="full").eval()
    assert rm.pooling == "model"
    ids, mask = _batch(ROWS, tok.pad_token_id, "right")
    with torch.no_grad():
        r = rm(ids, mask)
        torch.testing.assert_close(rm(*_batch(ROWS, tok.pad_token_id, "left", 3)), r, atol=1e-5, rtol=0)
        torch.testing.assert_close(r, bert.eval()(input_ids=ids, attention_mask=mask).logits.squeeze(-1))
    save_reward_model(rm, tok, tmp_path / "bert_rm")
    with torch.no_grad():
        torch.testing.assert_close(
            load_reward_model(tmp_path / "bert_rm").eval()(ids, mask), r, atol=1e-6, rtol=0
        )
    with pytest.raises(ValueError, match="per_token"):
        rm(ids, mask, per_token=True)
    # LoRA on an encoder: adapters train, and so does the new classifier in full
    lora = RewardModel.from_pretrained(tmp_path / "bert", mode="lora", lora=ModelConfig(lora_r=2))
    names = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert "backbone.classifier.base_layer.weight" in names
    assert all("lora_" in n or ".classifier." in n for n in names)

    llama = LlamaForSequenceClassification(
        LlamaConfig(
            vocab_size=len(tok),
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            num_labels=1,
            pad_token_id=tok.pad_token_id,
        )
    ).eval()
    rm = RewardModel.from_model(llama).eval()
    assert rm.pooling == "last" and rm.head is llama.score
    with torch.no_grad():
        torch.testing.assert_close(
            rm(ids, mask), llama(input_ids=ids, attention_mask=mask).logits.squeeze(-1), atol=1e-5, rtol=0
        )
        torch.testing.assert_close(
            rm(*_batch(ROWS, tok.pad_token_id, "left", 2)), rm(ids, mask), atol=1e-5, rtol=0
        )


def test_bad_path_and_bad_mode_errors(tok, tmp_path, sft_dir):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        RewardModel.from_pretrained(tmp_path / "nope")
    with pytest.raises(ValueError, match="unknown reward model mode 'best'"):
        RewardModel.from_pretrained(sft_dir, mode="best")
    with pytest.raises(FileNotFoundError, match="reward_config.json is missing"):
        load_reward_model(sft_dir)
    with pytest.raises(ValueError, match="model.lora_r > 0"):
        _rm(tok).set_mode("lora", ModelConfig())
    with pytest.raises(ConfigError, match="'mode'.*'best'"):
        load_config(reward.Config, None, ["mode=best"])
    with pytest.raises(ConfigError, match="model.lora_r"):
        load_config(reward.Config, None, ["mode=lora"])
    with pytest.raises(ConfigError, match="model.lora_r"):
        load_config(reward.Config, None, ["model.lora_r=8"])
    with pytest.raises(ConfigError, match="model.path"):
        reward.run(reward.Config(data=DataConfig(path="x.jsonl")))


def test_preference_metrics_by_hand():
    """r_c - r_r = ln 3 for both pairs: P = 0.75, loss = -ln 0.75 = 0.2877, accuracy 1.
    Both orders: probs (0.75, 0.75, 0.25, 0.25) with labels (1, 1, 0, 0): each bin is off by
    0.25, so ECE = 0.25."""
    r_c = torch.tensor([math.log(3.0), 1.0 + math.log(3.0)])
    r_r = torch.tensor([0.0, 1.0])
    m = reward.preference_metrics(r_c, r_r)
    assert m["accuracy"] == 1.0 and m["n_pairs"] == 2
    assert m["loss"] == pytest.approx(-math.log(0.75), abs=1e-6)
    assert m["margin"] == pytest.approx(math.log(3.0), abs=1e-6)
    assert m["ece"] == pytest.approx(0.25, abs=1e-6)
    # a soft label of 0.75 matches the model's P exactly: perfectly calibrated
    assert reward.preference_metrics(r_c, r_r, torch.tensor([0.75, 0.75]))["ece"] == pytest.approx(
        0.0, abs=1e-6
    )


def test_gold_metrics_by_hand():
    """Gold prefers chosen in pairs 0, 1; rejected in pair 2; pair 3 is a gold tie (left out).
    The model ranks pairs 0, 2, 3 chosen-first: it agrees with gold on pair 0 only -> 1/3; the
    labels agree with gold on 2 of 3."""

    class Gold:
        scores = {"a": 1.0, "b": 0.0, "c": 0.5, "d": 0.2}

        def score(self, prompt, response):
            return self.scores[response]

    from alignkit.data.records import PreferencePair

    pairs = [PreferencePair("q", c, r) for c, r in [("a", "b"), ("c", "d"), ("b", "c"), ("a", "a")]]
    r_c = torch.tensor([1.0, 0.0, 2.0, 1.0])
    r_r = torch.tensor([0.0, 1.0, 1.0, 0.0])
    m = reward.gold_metrics(Gold(), pairs, r_c, r_r)
    assert m["gold_pairs"] == 3
    assert m["gold_agreement"] == pytest.approx(1 / 3)
    assert m["label_gold_agreement"] == pytest.approx(2 / 3)


def _train_cfg(**kw) -> TrainConfig:
    base = dict(
        lr=5e-3, batch_size=16, max_steps=3, warmup_steps=0, progress=False, tensorboard=False, log_every=1
    )
    return TrainConfig(**{**base, **kw})


def test_stage_end_to_end_head_mode(world_dir, sft_dir, tmp_path):
    """run(): metrics by their names, backbone saved unchanged in head mode, reward_stats of the
    training responses, held-out eval with gold agreement; then `reward eval` on the saved model."""
    cfg = reward.Config(
        model=ModelConfig(path=str(sft_dir)),
        data=DataConfig(
            path=str(world_dir / "preferences.jsonl"),
            eval_path=str(world_dir / "preferences_eval.jsonl"),
            max_prompt_len=48,
            max_len=96,
        ),
        train=_train_cfg(),
        mode="head",
        stats_pairs=20,
        world=str(world_dir),
        out=str(tmp_path / "run"),
    )
    res = reward.run(cfg)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 3
    for key in ("loss", "accuracy", "margin", "reward/mean", "reward/min", "reward/max"):
        assert key in lines[-1]
    assert lines[0]["reward/min"] <= lines[0]["reward/mean"] <= lines[0]["reward/max"]
    final = Path(res["model"])
    saved = load_file(str(final / "model.safetensors"))
    original = load_file(str(sft_dir / "model.safetensors"))
    for k, v in saved.items():
        assert torch.equal(v, original["model." + k]), k
    assert json.loads((final / "reward_stats.json").read_text())["n"] == 40
    assert set(res["eval"]) >= {"accuracy", "margin", "ece", "gold_agreement", "gold_pearson"}
    assert res["eval"]["label_gold_agreement"] == 1.0  # preferences_eval has no label noise

    ev = reward.run_eval(
        load_config(
            reward.EvalConfig,
            None,
            [
                f"model={final}",
                f"data.path={world_dir / 'preferences_eval.jsonl'}",
                "data.max_prompt_len=48",
                "data.max_len=96",
                f"out={tmp_path / 'ev.json'}",
            ],
        )
    )
    assert json.loads((tmp_path / "ev.json").read_text())["accuracy"] == ev["accuracy"]
    assert ev["accuracy"] == pytest.approx(res["eval"]["accuracy"])
    assert ev["n_pairs"] == res["eval"]["n_pairs"] == 24
    # by default the result lands beside the model folder, which stays as it was saved
    before = sorted(p.name for p in Path(final).iterdir())
    ev = reward.run_eval(load_config(reward.EvalConfig, None, [
        f"model={final}", f"data.path={world_dir / 'preferences_eval.jsonl'}", "data.max_prompt_len=48",
        "data.max_len=96"]))
    assert ev["out"] == str(Path(final).resolve().parent / "eval-preferences_eval.json")
    assert sorted(p.name for p in Path(final).iterdir()) == before


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is absent")
@pytest.mark.parametrize(
    "rel,on_error",
    [("hh-rlhf/harmless-base-test.jsonl.gz", "skip"), ("llama_factory/dpo_en_demo.json", "raise")],
)
def test_real_data_end_to_end(rel, on_error, tmp_path):
    """A few steps of a full-mode reward model on real data with its own BPE tokenizer."""
    path = SHARED_DATA / rel
    loaded = load_records(path, kind="preference", on_error=on_error, limit=32)
    if on_error == "skip":
        assert loaded.records and len(loaded.records) + len(loaded.skipped) == 32
    text = [prompt_text(p.prompt) + p.chosen + p.rejected for p in loaded.records[:200]]
    tok = train_bpe_tokenizer(text, vocab_size=512)
    save_model(tiny_llama("nano", tokenizer=tok), tok, tmp_path / "sft")
    items, _ = tokenize_preference(tok, loaded.records, TruncationLimits(32, 64))
    assert items
    res = reward.run(
        reward.Config(
            model=ModelConfig(path=str(tmp_path / "sft")),
            data=DataConfig(path=str(path), on_error=on_error, limit=32, max_prompt_len=32, max_len=64),
            train=_train_cfg(batch_size=4, max_steps=2),
            stats_pairs=8,
            out=str(tmp_path / "run"),
        )
    )
    assert res["steps"] == 2 and math.isfinite(res["final_loss"])
    stats = json.loads((Path(res["model"]) / "reward_stats.json").read_text())
    assert stats["n"] == 16 and stats["std"] > 0


def _pair(prompt: str, chosen: str, rejected: str = " no.", category: str | None = None):
    from alignkit.data.records import PreferencePair

    return PreferencePair(prompt=prompt, chosen=chosen, rejected=rejected, category=category)


def test_mismatched_pairs_rank_another_prompts_answer_below_this_ones():
    pairs = [
        _pair("Human: 1+1?\nAssistant:", " 2.", category="arithmetic"),
        _pair("Human: 1+1?\nAssistant:", " Two.", category="arithmetic"),  # same prompt: never a partner
        _pair("Human: capital of X?\nAssistant:", " Y.", category="facts"),
        _pair("Human: say hi\nAssistant:", " 2."),  # " 2." is chosen for 1+1 too: never a 1+1 rejected
    ]
    extra = reward.add_mismatched_pairs(pairs, fraction=1.0, seed=0)
    assert len(extra) == 4  # one per anchor, anchors without replacement at fraction 1
    assert sorted(p.chosen for p in extra) == sorted(p.chosen for p in pairs)
    by_prompt_chosen = {(p.prompt, p.chosen): p for p in pairs}
    for p in extra:
        anchor = by_prompt_chosen[(p.prompt, p.chosen)]
        assert p.category == anchor.category and p.margin is None and p.soft_label is None
        assert any(q.chosen == p.rejected and q.prompt != p.prompt for q in pairs)
        assert p.rejected not in {q.chosen for q in pairs if q.prompt == p.prompt}
    one_plus_one = [p.rejected for p in extra if p.prompt.startswith("Human: 1+1")]
    assert set(one_plus_one) == {" Y."}  # the only answer that is not a 1+1 answer
    assert extra == reward.add_mismatched_pairs(pairs, fraction=1.0, seed=0)  # deterministic


def test_mismatched_pairs_count_and_impossible_partners():
    pairs = [_pair(f"Human: q{i}\nAssistant:", f" a{i}.") for i in range(10)]
    assert len(reward.add_mismatched_pairs(pairs, 0.5, seed=1)) == 5
    assert len(reward.add_mismatched_pairs(pairs, 2.0, seed=1)) == 20  # anchors with replacement
    assert reward.add_mismatched_pairs(pairs, 0.0, seed=1) == []
    same_prompt = [_pair("Human: q\nAssistant:", f" a{i}.") for i in range(5)]
    assert reward.add_mismatched_pairs(same_prompt, 1.0, seed=0) == []  # no other prompt to borrow from
    with pytest.raises(ConfigError, match="mismatched_pairs"):
        reward.Config(mismatched_pairs=-0.1)


class _Fixed:
    """A stand-in for random.Random: choice() gives `mode`, random() gives `u`."""

    def __init__(self, mode: str, u: float = 0.0):
        self.mode, self.u = mode, u

    def choice(self, seq):
        return self.mode

    def random(self):
        return self.u


@pytest.mark.parametrize("text, mode, u, want", [
    (" Here is window two times: window window.", "rest", 0, " Here is window two times: lamp lamp."),
    (" Here is window two times: window window.", "all", 0, " Here is lamp two times: lamp lamp."),
    (" Here is window two times: window window.", "run", 0.2, " Here is window two times: window window window."),
    (" Here is window two times: window window.", "run", 0.8, " Here is window two times: window."),
    (" Here is window two times: window window.", "count", 0.2, " Here is window three times: window window window."),
    (" Here is window two times: window window.", "count", 0.8, " Here is window one times: window."),
    (" window window window. Three!", "count", 0.8, " window window. Two!"),
    (" The word window in uppercase is WINDOW.", "rest", 0, " The word window in uppercase is LAMP."),
    (" Window, then window.", "all", 0, " Lamp, then lamp."),
])
def test_miscopy_alters_the_copies_as_each_mode_says(text, mode, u, want):
    assert reward._miscopy(text, "window", "lamp", _Fixed(mode, u)) == want


def test_copy_negatives_alter_the_copied_prompt_word_of_distinct_chosen_answers():
    """Anchors are the distinct chosen answers that repeat a word of their prompt; template words
    ("the", "word": in more than one of these few prompts) never count."""
    pairs = [
        _pair("Human: Repeat the word window two times.\nAssistant:", " Here is window two times: window window.",
              category="format"),
        _pair("Human: Say the word lamp in uppercase.\nAssistant:", " The word lamp in uppercase is LAMP."),
        _pair("Human: Say the word lamp in uppercase.\nAssistant:", " The word lamp in uppercase is LAMP.", " lamp."),
        _pair("Human: What is the capital of Xland?\nAssistant:", " The capital of Xland is the city."),  # "the" twice
        _pair("Human: Say the word kite in uppercase.\nAssistant:", " KITE."),  # copied once: no anchor
    ]
    extra = reward.add_copy_negatives(pairs, fraction=1.0, seed=0)
    assert sorted(p.chosen for p in extra) == sorted([pairs[0].chosen, pairs[1].chosen])
    for p in extra:
        assert p.rejected != p.chosen and p.rejected in {
            reward._miscopy(p.chosen, w, o, _Fixed(m, u)) for w, o in (("window", "lamp"), ("lamp", "window"))
            for m in ("rest", "all", "run", "count") for u in (0.2, 0.8)}
    assert next(p for p in extra if "window" in p.prompt).category == "format"
    assert extra == reward.add_copy_negatives(pairs, 1.0, seed=0)  # deterministic
    assert len(reward.add_copy_negatives(pairs, 2.5, seed=0)) == 5  # with replacement above 1
    assert reward.add_copy_negatives(pairs, 0.0, seed=0) == []
    assert reward.add_copy_negatives(pairs[:1], 1.0, seed=0) == []  # one copied word: nothing to swap in
    chat = (Message("system", "Be brief."), Message("user", "Repeat the word rope two times."))
    extra = reward.add_copy_negatives([*pairs, _pair(chat, " rope rope.")], 1.0, seed=0)  # a conversation prompt
    assert len(extra) == 3 and sum(p.prompt == chat for p in extra) == 1
    with pytest.raises(ConfigError, match="copy_negatives"):
        reward.Config(copy_negatives=-1.0)


def test_number_negatives_change_only_the_last_number_of_distinct_chosen_answers():
    pairs = [
        _pair("Human: What is 6 plus 8?\nAssistant:", " 6 plus 8 is 14.", category="arithmetic"),
        _pair("Human: What is 6 plus 8?\nAssistant:", " 6 plus 8 is 14.", " idk."),  # same answer: one anchor
        _pair("Human: What is 2 minus 1?\nAssistant:", " 1.", category="arithmetic"),
        _pair("Human: say hi\nAssistant:", " hi.", " no."),  # no number: never an anchor
        _pair("Human: Repeat it\nAssistant:", " a2b a.", " no."),  # a digit inside a word is no number
    ]
    extra = reward.add_number_negatives(pairs, fraction=1.0, seed=0)
    assert len(extra) == 2 and {p.chosen for p in extra} == {" 6 plus 8 is 14.", " 1."}
    for p in extra:
        head, _, tail = p.chosen.rpartition(" ")
        wrong_head, _, wrong_tail = p.rejected.rpartition(" ")
        assert head == wrong_head and p.category == "arithmetic"  # operands and form untouched
        right, wrong = int(tail.rstrip(".")), int(wrong_tail.rstrip("."))
        assert wrong != right and max(0, right - 3) <= wrong <= right + 3 and wrong_tail.endswith(".")
    assert extra == reward.add_number_negatives(pairs, 1.0, seed=0)  # deterministic
    assert len(reward.add_number_negatives(pairs, 3.0, seed=0)) == 6  # with replacement above 1
    assert reward.add_number_negatives(pairs, 0.0, seed=0) == []
    with pytest.raises(ConfigError, match="number_negatives"):
        reward.Config(number_negatives=-1.0)


def test_stage_trains_on_the_mismatched_pairs_but_keeps_stats_of_the_data(world_dir, sft_dir, tmp_path):
    """64 data pairs + 32 mismatched: 96 pairs = 3 steps of 32; reward_stats count only data pairs."""
    common = dict(
        model=ModelConfig(path=str(sft_dir)),
        data=DataConfig(path=str(world_dir / "preferences.jsonl"), max_prompt_len=48, max_len=96),
        mode="head",
        stats_pairs=0,
    )
    train_cfg = TrainConfig(lr=1e-3, batch_size=32, epochs=1, log_every=1, progress=False)
    res = reward.run(reward.Config(**common, train=train_cfg, mismatched_pairs=0.5, out=str(tmp_path / "m")))
    assert res["mismatched_pairs"] == 32 and res["steps"] == 3
    assert json.loads((Path(res["model"]) / "reward_stats.json").read_text())["n"] == 2 * 64
    plain = reward.run(reward.Config(**common, train=train_cfg, out=str(tmp_path / "p")))
    assert plain["mismatched_pairs"] == 0 and plain["steps"] == 2
