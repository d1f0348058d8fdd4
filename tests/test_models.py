"""alignkit.models: presets, save/load, BPE tokenizer, LoRA, and our generation loop."""

from __future__ import annotations

import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from alignkit.config import ModelConfig
from alignkit.models.bpe import CHAT_TEMPLATE, train_bpe_tokenizer
from alignkit.models.generate import (
    HFGenerator,
    RowNoise,
    SamplingParams,
    filter_logits,
    generate_text,
    new_kv_cache,
    preallocate_kv_cache,
    sample_rows,
)
from alignkit.models.load import (
    PRESETS,
    apply_lora,
    build_model,
    load_model,
    load_tokenizer,
    save_model,
    tiny_llama,
)
from alignkit.models.logprobs import position_ids_from_mask

CORPUS = [
    "Human: What is 2 + 3?\nAssistant: 5",
    "Human: Answer in uppercase: what colour is the sky?\nAssistant: BLUE",
    "Human: Who founded Velmora?\nAssistant: I don't know.",
    "The quick brown fox jumps over the lazy dog. Ünïcödé, 日本語, emoji 🙂!",
] * 20


@pytest.fixture(scope="module")
def tok():
    return train_bpe_tokenizer(CORPUS, vocab_size=400)


def _scrambled(preset: str = "nano", vocab: int = 300, seed: int = 1):
    """A tiny model with large random weights: its greedy outputs vary from token to token (a
    freshly initialised one repeats one token, which would make the generation tests vacuous)."""
    model = tiny_llama(preset, vocab, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


PROMPTS = [[5, 6, 7, 8, 9, 10, 44, 45, 46], [11, 12], [13, 14, 15, 16], [100]]


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits


# presets, save and load


@pytest.mark.parametrize("preset", list(PRESETS))
def test_presets_build_and_run(preset, tok):
    model = tiny_llama(preset, tokenizer=tok)
    cfg = model.config
    assert cfg.hidden_size == PRESETS[preset]["hidden_size"]
    assert cfg.vocab_size == len(tok) and cfg.max_position_embeddings == 512
    assert cfg.eos_token_id == tok.eos_token_id and cfg.pad_token_id == tok.pad_token_id
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight
    logits = model(input_ids=torch.tensor([[3, 4, 5]])).logits
    assert logits.shape == (1, 3, len(tok)) and torch.isfinite(logits).all()


def test_tiny_llama_is_seeded_and_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    a, b, c = (
        tiny_llama("nano", 100, seed=3),
        tiny_llama("nano", 100, seed=3),
        tiny_llama("nano", 100, seed=4),
    )
    assert torch.equal(torch.random.get_rng_state(), state)
    wa, wb, wc = (m.model.layers[0].mlp.up_proj.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    with pytest.raises(ValueError, match="valid: nano, tiny, small"):
        tiny_llama("huge", 100)


def test_save_load_round_trip_same_logits(tok, tmp_path):
    model = tiny_llama("nano", tokenizer=tok, seed=7)
    out = save_model(model, tok, tmp_path / "m")
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    ids = tok("Human: What is 2 + 3?")["input_ids"]
    loaded = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True)
    assert torch.equal(_logits(model, ids), _logits(loaded, ids))
    assert torch.equal(_logits(model, ids), _logits(load_model(out), ids))
    tok2 = load_tokenizer(out)
    assert tok2(CORPUS[3])["input_ids"] == tok(CORPUS[3])["input_ids"]


def test_save_replaces_existing_dir_atomically(tok, tmp_path):
    out = tmp_path / "m"
    save_model(tiny_llama("nano", tokenizer=tok, seed=1), tok, out)
    (out / "stale.txt").write_text("old")
    model2 = tiny_llama("nano", tokenizer=tok, seed=2)
    save_model(model2, tok, out)
    assert not (out / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temp or backup dirs left
    assert torch.equal(_logits(load_model(out), [3, 4]), _logits(model2, [3, 4]))


def test_failed_save_keeps_old_dir(tok, tmp_path, monkeypatch):
    out = tmp_path / "m"
    save_model(tiny_llama("nano", tokenizer=tok, seed=1), tok, out)
    before = sorted(os.listdir(out))

    def boom(*a, **k):
        raise OSError("disk full")

    model = tiny_llama("nano", tokenizer=tok, seed=2)
    monkeypatch.setattr(model, "save_pretrained", boom)
    with pytest.raises(OSError, match="disk full"):
        save_model(model, tok, out)
    assert sorted(os.listdir(out)) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_load_errors_name_the_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        load_model(missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(FileNotFoundError, match="no weights"):
        load_model(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match=str(missing)):
        load_tokenizer(missing)


def test_load_tokenizer_sets_pad_to_eos_when_missing(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg.pop("pad_token", None)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    loaded = load_tokenizer(tmp_path)
    assert loaded.pad_token == loaded.eos_token == "<|eos|>"


def test_build_model_from_preset_and_path(tok, tmp_path):
    model = build_model(ModelConfig(preset="nano"), tok)
    assert model.config.hidden_size == 64
    save_model(model, tok, tmp_path / "m")
    again = build_model(ModelConfig(path=str(tmp_path / "m")), tok)
    assert torch.equal(_logits(model, [5, 6]), _logits(again, [5, 6]))


# BPE tokenizer


def test_bpe_round_trips_arbitrary_text(tok):
    texts = [
        "",
        " leading space",
        "a  b\t\tc\n\n",
        "Ünïcödé 日本語 🙂🙃",
        "never seen: ẞ ʬ ⅞ \x00\x7f",
        "x" * 300,
    ]
    for text in texts:
        ids = tok(text)["input_ids"]
        assert tok.decode(ids) == text
    assert tok("hello")["input_ids"][0] != tok.bos_token_id  # nothing added automatically


def test_bpe_is_deterministic(tmp_path):
    a = train_bpe_tokenizer(CORPUS, 400)
    b = train_bpe_tokenizer(list(CORPUS), 400, out_dir=tmp_path)
    assert a.get_vocab() == b.get_vocab()
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()
    loaded = AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    assert loaded.get_vocab() == a.get_vocab()
    assert loaded(CORPUS[3])["input_ids"] == a(CORPUS[3])["input_ids"]
    assert (loaded.pad_token, loaded.eos_token, loaded.chat_template) == (
        a.pad_token,
        a.eos_token,
        CHAT_TEMPLATE,
    )


def test_bpe_special_tokens(tok):
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id) == (0, 1, 2)
    assert tok.pad_token_id != tok.eos_token_id
    assert tok.decode([5, tok.eos_token_id, tok.pad_token_id], skip_special_tokens=True) == tok.decode([5])
    with pytest.raises(ValueError, match="at least"):
        train_bpe_tokenizer(CORPUS, 100)


def test_chat_template(tok):
    msgs = [{"role": "user", "content": "What is 2 + 3?"}]
    prompt = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert prompt == "Human: What is 2 + 3?\nAssistant:"
    full = msgs + [{"role": "assistant", "content": "5"}, {"role": "user", "content": "And 1 + 1?"}]
    rendered = tok.apply_chat_template(
        [{"role": "system", "content": "Be brief."}] + full, tokenize=False, add_generation_prompt=True
    )
    assert rendered == "System: Be brief.\nHuman: What is 2 + 3?\nAssistant: 5\nHuman: And 1 + 1?\nAssistant:"
    # prompt + " " + answer is the conversation with the answer: responses start with a space
    assert prompt + " 5" == tok.apply_chat_template(full[:2], tokenize=False)


# LoRA


def test_lora_applies_and_merged_save_matches(tok, tmp_path):
    cfg = ModelConfig(preset="nano", lora_r=4, lora_alpha=8, lora_targets="q_proj,v_proj")
    model = build_model(cfg, tok)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    assert any("q_proj" in n for n in names) and not any("k_proj" in n for n in names)
    with torch.no_grad():  # LoRA B starts at zero; give the adapter an effect to merge
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    ids = tok("Human: hi\nAssistant:")["input_ids"]
    before = _logits(model, ids)
    save_model(model, tok, tmp_path / "merged")
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), local_files_only=True)
    assert not any("lora" in k for k in loaded.state_dict())
    torch.testing.assert_close(_logits(loaded, ids), before, atol=1e-5, rtol=1e-5)
    assert torch.equal(_logits(model, ids), before)  # the caller's model still has its adapters
    assert any("lora_A" in n for n, _ in model.named_parameters())


def test_lora_all_linear_and_adapter_only(tok, tmp_path):
    base_dir = tmp_path / "base"
    save_model(tiny_llama("nano", tokenizer=tok), tok, base_dir)
    model = apply_lora(load_model(base_dir), ModelConfig(lora_r=2))
    targets = {n.split(".")[-4] for n, p in model.named_parameters() if "lora_A" in n}
    assert targets == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    save_model(model, tok, tmp_path / "adapter", adapter_only=True)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    again = load_model(tmp_path / "adapter")
    torch.testing.assert_close(_logits(again, [4, 5, 6]), _logits(model, [4, 5, 6]))
    assert apply_lora(tiny_llama("nano", 50), ModelConfig(lora_r=0)).__class__.__name__ == "LlamaForCausalLM"


# generation


def test_greedy_cache_equals_no_cache_equals_alone():
    model = _scrambled()
    params = SamplingParams(max_new_tokens=24, greedy=True, stop_at_eos=False)
    cached = HFGenerator(model, batch_size=8).generate(PROMPTS, params)
    uncached = HFGenerator(model, batch_size=8, use_cache=False).generate(PROMPTS, params)
    alone = [HFGenerator(model).generate([p], params)[0] for p in PROMPTS]
    assert list(cached) == list(uncached) == alone
    assert all(len(r) == 24 for r in cached) and cached.finished == [False] * 4
    assert len(set(cached[0])) > 5  # the outputs really vary


def test_greedy_equals_hf_generate_left_padded():
    model = _scrambled()
    n = 20
    P = max(map(len, PROMPTS))
    ids = torch.zeros(len(PROMPTS), P, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(PROMPTS):
        ids[i, P - len(p) :] = torch.tensor(p)
        mask[i, P - len(p) :] = 1
    hf = model.generate(
        ids, attention_mask=mask, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    ours = HFGenerator(model, batch_size=2).generate(
        PROMPTS, SamplingParams(max_new_tokens=n, greedy=True, stop_at_eos=False)
    )
    assert hf[:, P:].tolist() == list(ours)


def test_stop_at_eos_and_order():
    model = _scrambled()
    free = HFGenerator(model).generate(
        PROMPTS, SamplingParams(max_new_tokens=12, greedy=True, stop_at_eos=False)
    )
    eos = free[1][3]  # pretend the 4th greedy token of prompt 1 is EOS
    model.config.eos_token_id = eos
    out = HFGenerator(model).generate(PROMPTS, SamplingParams(max_new_tokens=12, greedy=True))
    for r, (row, full) in enumerate(zip(out, free)):
        cut = full.index(eos) + 1 if eos in full else len(full)
        assert row == full[:cut]
        assert out.finished[r] == (eos in full)
    assert out.finished[1] and out[1][-1] == eos and len(out[1]) <= 4


def test_seeded_sampling_is_reproducible():
    model = _scrambled()
    params = SamplingParams(
        max_new_tokens=16, temperature=0.9, top_p=0.9, top_k=50, seed=123, stop_at_eos=False
    )
    gen = HFGenerator(model, batch_size=2)
    a, b = gen.generate(PROMPTS, params), gen.generate(PROMPTS, params)
    c = gen.generate(PROMPTS, SamplingParams(**{**params.__dict__, "seed": 124}))
    assert list(a) == list(b) and list(a) != list(c)
    no_cache = HFGenerator(model, batch_size=2, use_cache=False).generate(PROMPTS, params)
    assert list(no_cache) == list(a)


@pytest.mark.parametrize("vocab", [2, 15, 16, 300, 4099])
def test_sample_rows_draws_what_per_row_multinomial_draws(vocab):
    """Each row's token and its generator's state afterwards equal torch.multinomial(probs[r], 1,
    generator=g_r), the per-row draw seeded rollouts were recorded with (bit for bit, 40 rows)."""
    g = torch.Generator().manual_seed(vocab)
    probs = (torch.randn(40, vocab, generator=g) * 3).softmax(-1)
    probs[0] = 0.0
    probs[0, vocab - 1] = 1.0  # a one-hot row must give its token
    mine = [torch.Generator().manual_seed(1000 + r) for r in range(40)]
    theirs = [torch.Generator().manual_seed(1000 + r) for r in range(40)]
    got = sample_rows(probs, mine)
    want = torch.cat([torch.multinomial(p, 1, generator=t) for p, t in zip(probs, theirs)])
    assert torch.equal(got, want) and got[0] == vocab - 1
    assert all(torch.equal(a.get_state(), b.get_state()) for a, b in zip(mine, theirs))
    if vocab > 2:
        assert len(set(got.tolist())) > 3  # the rows really draw different tokens
    probs[1, 0] = float("nan")
    with pytest.raises(RuntimeError, match="inf, nan or element < 0"):
        sample_rows(probs, mine)


@pytest.mark.parametrize("budget", [1, 3 * 6 * 300, 1 << 22])
def test_row_noise_draws_what_per_step_sample_rows_draws(budget):
    """RowNoise's pre-drawn blocks (1 step, 3 steps and all 7 steps per block) give, step after
    step, bitwise the tokens of sample_rows drawing each step from the rows' generators."""
    g = torch.Generator().manual_seed(0)
    steps = [(torch.randn(6, 300, generator=g) * 2).softmax(-1) for _ in range(7)]
    noise = RowNoise([torch.Generator().manual_seed(50 + r) for r in range(6)], steps=7, budget=budget)
    per_step = [torch.Generator().manual_seed(50 + r) for r in range(6)]
    got = torch.stack([sample_rows(p, noise) for p in steps])
    want = torch.stack([sample_rows(p, per_step) for p in steps])
    assert torch.equal(got, want)
    assert len(set(got.flatten().tolist())) > 10


def test_preallocated_kv_cache_gives_the_concatenated_cache_logits():
    """Left-padded prompts prefilled, then 12 decode steps: the logits with the preallocated
    layers are bitwise those with transformers' growing (torch.cat) cache, at every step."""
    model = _scrambled().eval()
    P = max(map(len, PROMPTS))
    ids = torch.tensor([[0] * (P - len(p)) + p for p in PROMPTS])
    mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in PROMPTS])
    caches = [new_kv_cache(model), new_kv_cache(model)]
    with torch.no_grad():
        outs = [model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                      past_key_values=c, use_cache=True).logits[:, -1] for c in caches]
        preallocate_kv_cache(caches[1], 12)
        assert type(caches[1].layers[0]).__name__ == "_PreallocatedLayer"
        for _ in range(12):
            assert torch.equal(outs[0], outs[1])
            token = outs[0].argmax(-1, keepdim=True)  # (B, 1)
            mask = torch.cat([mask, torch.ones_like(token)], dim=1)
            pos = position_ids_from_mask(mask)[:, -1:]
            outs = [model(input_ids=token, attention_mask=mask, position_ids=pos, past_key_values=c,
                          use_cache=True).logits[:, -1] for c in caches]
        assert torch.equal(outs[0], outs[1])
        assert caches[1].get_seq_length() == P + 12
        with pytest.raises(RuntimeError, match="preallocated KV cache full"):
            model(input_ids=token, attention_mask=torch.cat([mask, torch.ones_like(token)], dim=1),
                  past_key_values=caches[1], use_cache=True)


def test_generate_restores_train_mode_and_no_grad():
    model = _scrambled()
    model.train()
    HFGenerator(model).generate([[1, 2]], SamplingParams(max_new_tokens=2))
    assert model.training
    model.eval()
    HFGenerator(model).generate([[1, 2]], SamplingParams(max_new_tokens=2))
    assert not model.training
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        HFGenerator(model).generate([[1], []], SamplingParams())


def test_filter_logits_by_hand():
    # probs of [2, 1, 0, -inf] logits: e^2, e^1, e^0 over their sum = 0.665, 0.245, 0.090
    logits = torch.tensor([[2.0, 1.0, 0.0, -1e9]])
    assert torch.isinf(filter_logits(logits, top_k=2)[0, 2:]).all()
    kept = ~torch.isinf(filter_logits(logits, top_p=0.7))  # 0.665 < 0.7 -> the second is needed
    assert kept.tolist() == [[True, True, False, False]]
    kept = ~torch.isinf(filter_logits(logits, top_p=0.6))  # 0.665 >= 0.6 -> top token alone
    assert kept.tolist() == [[True, False, False, False]]


def test_generate_text(tok):
    model = tiny_llama("nano", tokenizer=tok)
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is 2 + 3?"}], tokenize=False, add_generation_prompt=True
    )
    out = generate_text(
        model, tok, [prompt, "Human: hi\nAssistant:"], SamplingParams(max_new_tokens=5, seed=0)
    )
    assert len(out) == 2 and all(isinstance(s, str) for s in out)
    assert all("<|eos|>" not in s and "<|pad|>" not in s for s in out)
