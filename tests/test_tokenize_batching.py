"""Tokenisation (safe boundary, chat templates, truncation) and batching (collators, buckets)."""

import random

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from alignkit.data.batching import (
    bucketed_batches,
    collate_preference,
    collate_prompts,
    collate_sft,
    collate_unpaired,
    padding_fraction,
)
from alignkit.data.records import Message, PreferencePair, PromptOnly, SFTExample, UnpairedExample
from alignkit.data.tokenize import (
    TokenizedPair,
    TokenizedPrompt,
    TokenizedSFT,
    TokenizedUnpaired,
    TruncationLimits,
    encode_pair,
    render_prompt,
    tokenize_preference,
    tokenize_prompts,
    tokenize_sft,
    tokenize_unpaired,
)

CORPUS = [
    "What is the capital of France? The capital of France is Paris.",
    "Explain photosynthesis. Plants convert light into chemical energy.",
    "Human: hello there Assistant: hi, how can I help you today?",
    "answer in uppercase: THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG",
] * 5


def _wrap(tok: Tokenizer, **kw) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="[UNK]", **kw
    )


def byte_bpe(add_bos: bool = True) -> PreTrainedTokenizerFast:
    """A small byte-level BPE whose post-processor prepends <s> (like Llama's tokenizer)."""
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<pad>", "<s>", "</s>", "[UNK]", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
        )
    return _wrap(tok, additional_special_tokens=["<|im_end|>"])


@pytest.fixture(scope="module")
def tok():
    return byte_bpe()


def test_safe_boundary_response_equals_response_alone(tok):
    prompt, response = "What is the capital of France?", " The capital of France is Paris."
    enc = encode_pair(tok, prompt, response)
    alone = tok(response, add_special_tokens=False)["input_ids"]
    assert enc.response_ids == alone + [tok.eos_token_id]
    assert enc.prompt_ids[0] == tok.bos_token_id
    assert enc.prompt_ids[1:] == tok(prompt, add_special_tokens=False)["input_ids"]
    assert tok.bos_token_id not in enc.response_ids
    assert enc.input_ids.count(tok.bos_token_id) == 1


def test_no_bos_when_tokenizer_adds_none():
    t = byte_bpe(add_bos=False)
    enc = encode_pair(t, "What is", " Paris")
    assert enc.prompt_ids == t("What is", add_special_tokens=False)["input_ids"]


def test_merge_across_boundary_is_prevented():
    """Joint tokenisation of "xya" + "bc" merges across the boundary; ours keeps them apart.

    The tokenizer has no pre-tokenizer, so merges such as a+b apply wherever "ab" appears and
    the joint ids have a token spanning "a|b": no position separates prompt from response. Ours:
    the prompt is tokenize("xya"), the response exactly tokenize("bc") + EOS, and the SFT labels
    cover exactly those response ids.
    """
    bpe = Tokenizer(models.BPE(unk_token="[UNK]"))
    trainer = trainers.BpeTrainer(vocab_size=40, special_tokens=["<pad>", "<s>", "</s>", "[UNK]"])
    bpe.train_from_iterator(["ab" * 20, "xyab" * 10, "abc" * 10], trainer)
    t = _wrap(bpe)
    prompt, response = "xya", "bc"
    joint = t(prompt + response, add_special_tokens=False)["input_ids"]
    p_alone = t(prompt, add_special_tokens=False)["input_ids"]
    r_alone = t(response, add_special_tokens=False)["input_ids"]
    pieces = [bpe.id_to_token(i) for i in joint]
    prefixes = ["".join(pieces[:k]) for k in range(len(pieces) + 1)]
    assert prompt not in prefixes  # a token of the joint string spans the boundary

    enc = encode_pair(t, prompt, response)
    assert enc.prompt_ids == p_alone and enc.response_ids == r_alone + [t.eos_token_id]
    batch = collate_sft([TokenizedSFT(enc.prompt_ids, enc.response_ids)], pad_id=t.pad_token_id)
    learned = batch.labels[0][batch.labels[0] != -100].tolist()
    assert learned == r_alone + [t.eos_token_id]


def test_truncation_left_prompt_right_response_and_drops(tok):
    prompt = "What is the capital of France? Explain photosynthesis."
    full_prompt = [tok.bos_token_id] + tok(prompt, add_special_tokens=False)["input_ids"]
    response = " The capital of France is Paris."
    full_resp = tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert len(full_prompt) > 6 and len(full_resp) > 4

    limits = TruncationLimits(max_prompt_len=6, max_len=10)
    enc = encode_pair(tok, prompt, response, limits)
    # left truncation keeps BOS plus the LAST 5 prompt tokens
    assert enc.prompt_ids == [tok.bos_token_id] + full_prompt[-5:]
    assert enc.prompt_truncated and enc.response_truncated
    assert enc.response_ids == full_resp[:4]  # cut to max_len; EOS lost
    assert tok.eos_token_id not in enc.response_ids

    examples = [
        SFTExample(prompt, response),  # both cut
        SFTExample("Hi", " Paris."),  # untouched
    ]
    items, stats = tokenize_sft(tok, examples, limits)
    assert len(items) == 2
    assert stats.report()["prompts_truncated"] == 1 and stats.responses_truncated == 1
    assert items[1].response_ids[-1] == tok.eos_token_id

    # a prompt that fills max_len leaves an empty response: dropped and counted
    tight = TruncationLimits(max_prompt_len=6, max_len=7)
    enc = encode_pair(tok, prompt, response, TruncationLimits(max_len=len(full_prompt)))
    assert enc.response_ids == []
    items, stats = tokenize_sft(
        tok, examples + [SFTExample(prompt, response)], TruncationLimits(max_len=len(full_prompt))
    )
    assert stats.dropped == 2 and stats.total == 3 and len(items) == 1
    assert stats.report()["kept"] == 1
    items, stats = tokenize_sft(tok, examples, tight)
    assert all(len(x) <= 7 for x in items) and stats.dropped == 0


def test_limits_are_validated():
    with pytest.raises(ValueError, match="max_prompt_len"):
        TruncationLimits(max_prompt_len=10, max_len=10)
    with pytest.raises(ValueError):
        TruncationLimits(max_len=0)


def test_chat_template_path():
    t = byte_bpe(add_bos=False)
    t.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    conv = (Message("system", "be brief"), Message("user", "hello there"))
    text = render_prompt(t, conv)
    assert text == "<|system|>be brief</s><|user|>hello there</s><|assistant|>"
    enc = encode_pair(t, conv, "hi")
    assert enc.prompt_ids == t(text, add_special_tokens=False)["input_ids"]
    # the template closes the turn with </s> == EOS: exactly one EOS ends the response
    assert enc.response_ids == t("hi", add_special_tokens=False)["input_ids"] + [t.eos_token_id]
    # a plain-string prompt ignores the template
    assert render_prompt(t, "raw prompt") == "raw prompt"


def test_chat_template_with_its_own_end_of_turn_token():
    """ChatML-style: the turn ends with <|im_end|>, which is not EOS: learn <|im_end|> then EOS."""
    t = byte_bpe(add_bos=False)
    t.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    enc = encode_pair(t, (Message("user", "hello"),), "hi")
    im_end = t.convert_tokens_to_ids("<|im_end|>")
    assert enc.response_ids[-2:] == [im_end, t.eos_token_id]


def test_chat_template_keeps_a_single_bos():
    t = byte_bpe(add_bos=True)
    t.chat_template = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    enc = encode_pair(t, (Message("user", "hello"),), "hi")
    assert enc.prompt_ids.count(t.bos_token_id) == 1 and enc.prompt_ids[0] == t.bos_token_id


def test_fallback_without_chat_template(tok):
    conv = (
        Message("system", "Be kind."),
        Message("user", "hello"),
        Message("assistant", "hi"),
        Message("user", "capital of France?"),
    )
    assert render_prompt(tok, conv) == (
        "Be kind.\n\nHuman: hello\n\nAssistant: hi\n\nHuman: capital of France?\n\nAssistant:"
    )
    with pytest.raises(ValueError, match="system"):
        render_prompt(tok, (Message("user", "a"), Message("system", "b")))


def test_tokenize_preference_unpaired_prompts(tok):
    pairs = [
        PreferencePair("Explain photosynthesis.", " Plants convert light.", " idk", margin=2.0),
        PreferencePair("Hi", " hello", " go away", soft_label=0.8),
        PreferencePair("What is the capital of France? " * 3, " Paris", " Lyon"),
    ]
    limits = TruncationLimits(max_prompt_len=8, max_len=9)
    items, stats = tokenize_preference(tok, pairs, limits)
    assert stats.total == 3 and stats.prompts_truncated == 1
    assert items[0].margin == 2.0 and items[0].soft_label is None and items[1].soft_label == 0.8
    for x in items:
        assert len(x.prompt_ids) + len(x.chosen_ids) <= 9 and len(x.prompt_ids) + len(x.rejected_ids) <= 9
    p = tok("Hi", add_special_tokens=True)["input_ids"]
    assert items[1].prompt_ids == p

    un, _ = tokenize_unpaired(tok, [UnpairedExample("Hi", " hello", desirable=False)])
    assert un[0].completion_ids[-1] == tok.eos_token_id and un[0].desirable is False

    prompts, pstats = tokenize_prompts(
        tok,
        [PromptOnly("What is the capital of France?"), PromptOnly("Hi")],
        TruncationLimits(max_prompt_len=4),
    )
    assert len(prompts[0]) == 4 and prompts[0].prompt_ids[0] == tok.bos_token_id
    assert pstats.prompts_truncated == 1


def _label_formula(prompt_lens, total_lens, input_ids):
    """labels[b, t] = input_ids[b, t] if prompt_len[b] <= t < total_len[b] else -100."""
    t = torch.arange(input_ids.shape[1])
    p = torch.tensor(prompt_lens)[:, None]
    n = torch.tensor(total_lens)[:, None]
    keep = (t >= p) & (t < n)
    return torch.where(keep, input_ids, torch.full_like(input_ids, -100))


def test_collate_sft_labels_and_right_padding():
    items = [TokenizedSFT([1, 5, 6], [7, 2]), TokenizedSFT([1, 5], [8, 9, 10, 2])]
    b = collate_sft(items, pad_id=0)
    assert b.input_ids.tolist() == [[1, 5, 6, 7, 2, 0], [1, 5, 8, 9, 10, 2]]
    assert b.attention_mask.tolist() == [[1, 1, 1, 1, 1, 0], [1] * 6]
    assert torch.equal(b.labels, _label_formula([3, 2], [5, 6], b.input_ids))
    assert b.labels.tolist()[0] == [-100, -100, -100, 7, 2, -100]

    b8 = collate_sft(items, pad_id=0, pad_to_multiple_of=8)
    assert b8.input_ids.shape == (2, 8) and b8.attention_mask[:, 6:].sum() == 0
    assert (b8.labels[:, 6:] == -100).all()


def test_preference_batch_layout():
    items = [
        TokenizedPair([1, 5], [7, 2], [8, 8, 8, 2], margin=1.5),
        TokenizedPair([1, 6, 6], [9, 2], [3, 2]),
    ]
    b = collate_preference(items, pad_id=0)
    assert b.num_pairs == 2 and b.input_ids.shape == (4, 6)
    assert b.input_ids.tolist() == [
        [1, 5, 7, 2, 0, 0],  # chosen of pair 0
        [1, 6, 6, 9, 2, 0],  # chosen of pair 1
        [1, 5, 8, 8, 8, 2],  # rejected of pair 0
        [1, 6, 6, 3, 2, 0],  # rejected of pair 1
    ]
    assert torch.equal(b.labels, _label_formula([2, 3, 2, 3], [4, 5, 6, 5], b.input_ids))
    assert b.margin.tolist() == [1.5, 0.0] and b.soft_label is None
    chosen, rejected = b.split(torch.arange(4))
    assert chosen.tolist() == [0, 1] and rejected.tolist() == [2, 3]


def test_collate_prompts_left_padded_and_unpaired():
    b = collate_prompts([TokenizedPrompt([1, 5, 6]), TokenizedPrompt([1, 7])], pad_id=0)
    assert b.input_ids.tolist() == [[1, 5, 6], [0, 1, 7]]
    assert b.attention_mask.tolist() == [[1, 1, 1], [0, 1, 1]]
    u = collate_unpaired(
        [TokenizedUnpaired([1], [4, 2], True), TokenizedUnpaired([1, 3], [2], False)], pad_id=0
    )
    assert u.labels.tolist() == [[-100, 4, 2], [-100, -100, 2]] and u.desirable.tolist() == [True, False]


def _varied_lengths(n=2000, seed=0):
    rng = random.Random(seed)
    return [rng.choice([rng.randint(5, 40), rng.randint(40, 300), rng.randint(300, 1000)]) for _ in range(n)]


def test_bucketed_batches_cover_each_index_once_and_are_deterministic():
    lengths = _varied_lengths(1003)
    batches = bucketed_batches(lengths, batch_size=16, seed=3, epoch=0, bucket_size_multiplier=10)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(lengths)))
    assert sum(len(b) < 16 for b in batches) == 1
    assert batches == bucketed_batches(lengths, batch_size=16, seed=3, epoch=0, bucket_size_multiplier=10)
    assert batches != bucketed_batches(lengths, batch_size=16, seed=3, epoch=1, bucket_size_multiplier=10)
    assert batches != bucketed_batches(lengths, batch_size=16, seed=4, epoch=0, bucket_size_multiplier=10)
    plain = bucketed_batches(lengths, batch_size=16, seed=3, epoch=0, shuffle=False)
    assert sorted(i for b in plain for i in b) == list(range(len(lengths)))


def test_bucketed_batches_cut_padding():
    lengths = _varied_lengths()
    rng = random.Random(0)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    random_batches = [order[i : i + 16] for i in range(0, len(order), 16)]
    bucketed = bucketed_batches(lengths, batch_size=16, seed=0, epoch=0)
    pf_random, pf_bucketed = padding_fraction(lengths, random_batches), padding_fraction(lengths, bucketed)
    assert pf_random > 0.4
    assert pf_bucketed < 0.05 and pf_bucketed < pf_random / 5
    assert padding_fraction([3, 3], [[0, 1]]) == 0.0
    assert padding_fraction([1, 3], [[0, 1]]) == pytest.approx(2 / 6)
