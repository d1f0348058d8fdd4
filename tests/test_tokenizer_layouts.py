"""Prompt/continuation boundaries with the tokenizer layouts real models use, built here from
the `tokenizers` library: byte-level BPE (GPT-2 / Qwen / Llama-3), SentencePiece-style Metaspace
with a prepended "▁" (Llama-2 / Mistral), its legacy normaliser form (Prepend + Replace), and a
chat template with special tokens. The continuation's ids must be those of the joint encoding,
for scoring (benchmarks) and for training (SFT, preference pairs)."""

import math

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from alignkit.data.records import Message, PreferencePair, SFTExample
from alignkit.data.tokenize import (
    continuation_ids,
    encode_prompt,
    end_of_turn_ids,
    tokenize_preference,
    tokenize_sft,
)
from alignkit.eval.bench.common import HFLM
from alignkit.models.load import tiny_llama

CORPUS = ["Question: what is the capital of France? Answer: A", "Answer: B", "Answer: C", "Answer: D",
          "The answer is Paris and the capital is big.", "Human: hello there\n\nAssistant: hi, how are you?",
          "ok A B C D a b c d Paris France capital answer question"] * 20
SPECIAL = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]


def _wrap(tok: Tokenizer, template: str | None = None) -> PreTrainedTokenizerFast:
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   clean_up_tokenization_spaces=False)
    if template:
        fast.chat_template = template
    return fast


def byte_level() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIAL,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return _wrap(tok)


def metaspace() -> PreTrainedTokenizerFast:
    """The tokenizer.json layout of newer Llama-2 / Mistral conversions: Metaspace pre-tokenizer."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=200, special_tokens=[*SPECIAL, "<unk>"]))
    return _wrap(tok)


def legacy_sentencepiece() -> PreTrainedTokenizerFast:
    """The older Llama-2 tokenizer.json: a normaliser that prepends "▁" and replaces spaces."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Strip(" ", 1, 0)])
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=200, special_tokens=[*SPECIAL, "<unk>"]))
    return _wrap(tok)


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

LAYOUTS = {"byte_level": byte_level, "metaspace": metaspace, "legacy_sentencepiece": legacy_sentencepiece}


@pytest.fixture(scope="module", params=list(LAYOUTS))
def tok(request):
    return LAYOUTS[request.param]()


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_sentencepiece_layout_adds_a_spurious_token_when_encoded_alone():
    """The defect this guards against (the Prepend + Replace normaliser of Llama-2 / Mistral
    tokenizer.json files): " A" alone is ['▁', '▁A'] where "Answer: A" ends in '▁A'. (The
    Metaspace pre-tokenizer of current `tokenizers` does not double the "▁"; its joint and
    separate encodings agree on these texts, and the tests below cover it too.)"""
    t = legacy_sentencepiece()
    assert t.convert_ids_to_tokens(_ids(t, " A")) == ["▁", "▁A"]
    assert t.convert_ids_to_tokens(continuation_ids(t, "Answer:", " A")) == ["▁A"]
    assert t.convert_ids_to_tokens(continuation_ids(t, "Answer:", " Paris")) == ["▁Paris"]


def test_continuation_is_the_tail_of_the_joint_encoding(tok):
    for ctx, cont in [("Answer:", " A"), ("Question: what is the capital of France? Answer:", " Paris"),
                      ("Human: hello there\n\nAssistant:", " hi, how are you?")]:
        joint, head = _ids(tok, ctx + cont), _ids(tok, ctx)
        assert joint[: len(head)] == head
        assert continuation_ids(tok, ctx, cont) == joint[len(head):]


def test_byte_level_joint_equals_separate_so_nothing_moves():
    t = byte_level()
    for ctx, cont in [("Answer:", " A"), ("The answer is", " Paris")]:
        assert continuation_ids(t, ctx, cont) == _ids(t, cont)


def test_a_merge_across_the_boundary_falls_back_to_separate_encoding():
    """Byte-level BPE: "Pa" + "ris" is one merged token in the joint text, so the context's
    ids are no prefix; the continuation is then encoded alone (no prompt token is ever taught)."""
    t = byte_level()
    head, joint = _ids(t, "the answer is Pa"), _ids(t, "the answer is Paris")
    if joint[: len(head)] == head:
        pytest.skip("this vocabulary has no merge across the boundary")
    assert continuation_ids(t, "the answer is Pa", "ris") == _ids(t, "ris")


def test_training_tokens_are_the_tokens_produced_after_the_prompt(tok):
    """SFT and preference tokenisation: prompt ids + response ids == joint encoding (+ EOS)."""
    prompt, response, rejected = "Question: what is the capital of France? Answer:", " Paris", " A"
    (sft,), _ = tokenize_sft(tok, [SFTExample(prompt, response)])
    eos = end_of_turn_ids(tok, prompt)
    assert sft.prompt_ids == encode_prompt(tok, prompt)[0]
    full = _ids(tok, prompt + response)
    assert sft.response_ids == full[len(_ids(tok, prompt)):] + eos
    (pair,), _ = tokenize_preference(tok, [PreferencePair(prompt, response, rejected)])
    assert pair.chosen_ids == sft.response_ids
    assert pair.rejected_ids == _ids(tok, prompt + rejected)[len(_ids(tok, prompt)):] + eos


def test_chat_template_with_special_tokens():
    t = legacy_sentencepiece()
    t.chat_template = CHATML
    prompt = (Message("user", "what is the capital of France?"),)
    (sft,), _ = tokenize_sft(t, [SFTExample(prompt, "Paris")])
    rendered = t.apply_chat_template([{"role": "user", "content": "what is the capital of France?"}],
                                     tokenize=False, add_generation_prompt=True)
    assert rendered.endswith("<|im_start|>assistant\n")
    start = t.convert_tokens_to_ids("<|im_start|>")
    assert start in sft.prompt_ids and start not in sft.response_ids
    joint = _ids(t, rendered + "Paris")
    assert sft.response_ids[: len(joint) - len(_ids(t, rendered))] == joint[len(_ids(t, rendered)):]


@pytest.fixture(scope="module")
def sp_model():
    t = legacy_sentencepiece()
    model = tiny_llama("nano", tokenizer=t, seed=0).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model, t


def test_loglikelihood_equals_a_joint_encoding_reference(sp_model):
    """HFLM scores equal: (BOS when the tokenizer adds one) + joint ids of context + continuation,
    summed log-softmax over the continuation's positions, written plainly here."""
    model, t = sp_model
    bos = [t.bos_token_id] if encode_prompt(t, "x")[0][:1] == [t.bos_token_id] else []
    reqs = [("Answer:", " A"), ("Answer:", " B"), ("Question: what is the capital of France? Answer:", " Paris"),
            ("The answer is", " Paris and the capital")]
    got = HFLM(model, t, batch_size=3).loglikelihood(reqs)
    for (ctx, cont), value in zip(reqs, got):
        head = bos + _ids(t, ctx)
        full = bos + _ids(t, ctx + cont)
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([full])).logits[0].double(), -1)
        ref = sum(float(logp[i - 1, full[i]]) for i in range(len(head), len(full)))
        assert value == pytest.approx(ref, abs=1e-5)


def test_two_token_continuation_by_hand(sp_model):
    """log p(c1 c2 | ctx) = log softmax(z_{n-1})[c1] + log softmax(z_n)[c2], where z_t are the
    logits after token t and n the context's last position; each log softmax is z - log sum exp z."""
    model, t = sp_model
    ctx, cont = "Answer:", " Paris France"
    cont_ids = continuation_ids(t, ctx, cont)
    if len(cont_ids) != 2:
        pytest.skip(f"this vocabulary splits the continuation into {len(cont_ids)} tokens")
    ids = encode_prompt(t, ctx)[0] + cont_ids
    with torch.no_grad():
        z = model(torch.tensor([ids])).logits[0].double()
    n = len(ids) - 3  # logits at position n predict the first continuation token
    by_hand = 0.0
    for pos, tok_id in ((n, cont_ids[0]), (n + 1, cont_ids[1])):
        row = z[pos].tolist()
        m = max(row)
        by_hand += row[tok_id] - (m + math.log(sum(math.exp(v - m) for v in row)))
    assert HFLM(model, t).loglikelihood([(ctx, cont)])[0] == pytest.approx(by_hand, abs=1e-5)
