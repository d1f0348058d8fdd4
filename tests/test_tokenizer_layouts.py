"""The prompt/continuation boundary under each real tokenizer layout, built here (no downloads).

Layouts: byte-level BPE (GPT-2 style); SentencePiece-style BPE with a Metaspace pre-tokenizer
(`prepend_scheme="first"`, the Mistral / newer Llama-2 layout); the legacy Llama-2 layout (no
pre-tokenizer, a normaliser that prepends "▁" and replaces spaces, a decoder that strips the first
space); each wrapped in transformers' PreTrainedTokenizerFast, with chat templates that use special
tokens. The rule under test: the continuation's tokens are those that follow the prompt's tokens in
the joint encoding of prompt + continuation, in scoring (HFLM) and in training (SFT, preference,
unpaired, reward model).
"""

from types import SimpleNamespace

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from alignkit.data.records import Message, PreferencePair, SFTExample, UnpairedExample
from alignkit.data.tokenize import (
    TruncationLimits,
    continuation_ids,
    decode_response,
    encode_pair,
    encode_prompt,
    render_prompt,
    tokenize_preference,
    tokenize_sft,
    tokenize_unpaired,
)
from alignkit.eval.bench.common import HFLM

SPECIAL = ["<pad>", "<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "Question: what is the capital of France? Answer: A Paris",
    "Question: which city is largest? Answer: B New York",
    "Answer: C Answer: D Answer: A B C D",
    "The capital of France is Paris and New York is in the United States.",
    "Human: hello there Assistant: hi, how can I help you today?",
    "user assistant system hello hi Paris France",
] * 8
LLAMA2_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}"
    "{{ '[INST] ' + m['content'] + ' [/INST]' }}{% else %}{{ ' ' + m['content'] + ' ' + eos_token }}"
    "{% endif %}{% endfor %}"
)
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _wrap(tok: Tokenizer) -> PreTrainedTokenizerFast:
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"], clean_up_tokenization_spaces=False,
    )


def byte_level() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return _wrap(tok)


def _sentencepiece_bpe() -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIAL, show_progress=False))
    return tok


def metaspace() -> PreTrainedTokenizerFast:
    return _wrap(_sentencepiece_bpe())


def legacy_sentencepiece() -> PreTrainedTokenizerFast:
    """Llama-2's tokenizer.json layout: Prepend + Replace normaliser, no pre-tokenizer."""
    tok = _sentencepiece_bpe()
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = None
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return _wrap(tok)


LAYOUTS = {"byte_level": byte_level, "metaspace": metaspace, "legacy_sp": legacy_sentencepiece}


@pytest.fixture(scope="module", params=list(LAYOUTS))
def tok(request):
    return LAYOUTS[request.param]()


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def _pieces(tok, ids):
    return tok.convert_ids_to_tokens(ids)


def _joint_split(tok, prompt_text, response):
    """The plain reference: the joint ids after the prompt's own ids (asserting they are a prefix)."""
    p, joint = _ids(tok, prompt_text), _ids(tok, prompt_text + response)
    assert joint[: len(p)] == p
    return joint[len(p) :]


def test_the_layouts_disagree_on_separate_encoding():
    """Why separate encoding is wrong: legacy " A" alone is ['▁', '▁A'] while "Answer: A" ends in
    '▁A'; Metaspace "A" alone is '▁A', yet after "Answer:" with no space it is 'A'. Byte-level:
    both ways agree for a space-led continuation."""
    legacy, meta, byte = legacy_sentencepiece(), metaspace(), byte_level()
    assert _pieces(legacy, _ids(legacy, " A")) == ["▁", "▁A"]
    assert _pieces(legacy, _ids(legacy, "Answer: A"))[-1] == "▁A"
    assert _pieces(legacy, continuation_ids(legacy, "Answer:", " A")[0]) == ["▁A"]
    assert _pieces(meta, _ids(meta, "A")) == ["▁A"]
    assert _pieces(meta, continuation_ids(meta, "Answer:", "A")[0]) == ["A"]
    for prompt, cont in [("Answer:", " A"), ("Question: which city is largest?", " New York"), ("Paris", " and")]:
        assert continuation_ids(byte, prompt, cont) == (_ids(byte, cont), True)


def test_fallback_when_the_prompt_is_not_a_prefix(tok):
    """A prompt ending in a space glues to the next word in the joint text ("Answer: A"), so its
    ids are no prefix: the continuation is then tokenised alone, and the fallback is reported."""
    ids, joint = continuation_ids(tok, "Answer: ", "A")
    assert not joint and ids == _ids(tok, "A")
    items, stats = tokenize_sft(tok, [SFTExample("Answer: ", "A"), SFTExample("Answer:", " A")])
    assert stats.boundary_fallbacks == 1 and stats.report()["boundary_fallbacks"] == 1


CASES = [
    ("Question: what is the capital of France?\nAnswer:", " Paris"),
    ("Question: which city is largest? Answer:", " B New York"),
    ("Human: hello there Assistant:", "hi, how can I help you today?"),
    ("The capital of France is", " Paris and New York"),
]


@pytest.mark.parametrize("prompt, response", CASES)
def test_training_tokenisation_is_the_joint_split(tok, prompt, response):
    """SFT, preference (DPO, reward model), unpaired (KTO) and encode_pair (the reward-model judge)
    all learn exactly the tokens that follow the prompt in the joint encoding, then EOS; the prompt
    is BOS + its own encoding. Byte-level: identical to the former separate encoding."""
    want = _joint_split(tok, prompt, response) + [tok.eos_token_id]
    prompt_ids = [tok.bos_token_id] + _ids(tok, prompt)
    sft, _ = tokenize_sft(tok, [SFTExample(prompt, response)])
    assert (sft[0].prompt_ids, sft[0].response_ids) == (prompt_ids, want)
    pairs, stats = tokenize_preference(tok, [PreferencePair(prompt, response, " Lyon")])
    assert pairs[0].prompt_ids == prompt_ids and pairs[0].chosen_ids == want
    assert pairs[0].rejected_ids == _joint_split(tok, prompt, " Lyon") + [tok.eos_token_id]
    assert stats.boundary_fallbacks == 0
    un, _ = tokenize_unpaired(tok, [UnpairedExample(prompt, response, desirable=True)])
    assert un[0].completion_ids == want
    assert encode_pair(tok, prompt, response).input_ids == prompt_ids + want
    if isinstance(tok.backend_tokenizer.pre_tokenizer, pre_tokenizers.ByteLevel):
        assert want == _ids(tok, response) + [tok.eos_token_id]


def test_truncation_cuts_the_joint_split(tok):
    """Limits apply after the split: the prompt keeps BOS + its last tokens, the response its
    first ones, and the kept response tokens are still those of the joint encoding."""
    prompt, response = CASES[0]
    full_p = [tok.bos_token_id] + _ids(tok, prompt)
    full_r = _joint_split(tok, prompt, response) + [tok.eos_token_id]
    limits = TruncationLimits(max_prompt_len=5, max_len=6)
    enc = encode_pair(tok, prompt, response, limits)
    assert enc.prompt_ids == [tok.bos_token_id] + full_p[-4:] and enc.prompt_truncated
    assert enc.response_ids == full_r[:1] and enc.response_truncated == (len(full_r) > 1)


@pytest.mark.parametrize("template", ["chatml", "llama2"])
def test_chat_templates_train_the_rendered_tokens(tok, template):
    """The prompt ids plus the response ids are the template's own rendering of the whole
    conversation, tokenised as one text, up to the end of the assistant's content (ChatML: through
    <|im_end|>, a special token, then EOS). Llama-2's template puts " " before the content (the
    lead): "Paris" and " Paris" train the same ids."""
    t = tok  # the module fixture; the template is set for this test only
    t.chat_template = CHATML_TEMPLATE if template == "chatml" else LLAMA2_TEMPLATE
    conv = (Message("user", "what is the capital of France?"),)
    try:
        enc = encode_pair(t, conv, "Paris")
        full_text = t.apply_chat_template(
            [{"role": "user", "content": conv[0].content}, {"role": "assistant", "content": "Paris"}], tokenize=False
        )
        full = _ids(t, full_text)
        if full[0] != t.bos_token_id:
            full = [t.bos_token_id] + full
        ours = enc.input_ids
        assert ours[-1] == t.eos_token_id and ours.count(t.bos_token_id) == 1
        assert ours[:-1] == full[: len(ours) - 1]
        assert enc.prompt_ids == encode_prompt(t, conv)[0]
        if template == "chatml":
            assert ours[-2] == t.convert_tokens_to_ids("<|im_end|>")
        else:
            assert t.decode(enc.response_ids, skip_special_tokens=True).strip() == "Paris"
            assert encode_pair(t, conv, " Paris").input_ids == ours
        assert render_prompt(t, conv) == full_text[: len(render_prompt(t, conv))]
    finally:
        t.chat_template = None


def test_decode_response_round_trips(tok):
    """A generated response decodes to the text that re-encodes (joint) to the same ids, so pairs
    sampled online (iterate, CAI) train on the tokens the policy produced."""
    prompt = "Question: which city is largest? Answer:"
    p_ids = encode_prompt(tok, prompt)[0]
    gen = _joint_split(tok, prompt, " B New York")
    text = decode_response(tok, p_ids, gen)
    assert text == " B New York"
    assert encode_pair(tok, prompt, text).response_ids == gen + [tok.eos_token_id]


# -- scoring ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tok):
    from alignkit.models.load import tiny_llama

    return tiny_llama("nano", tokenizer=tok, seed=0).eval()


def _reference_loglikelihood(model, tok, prompt, cont):
    """lm-eval's `_encode_pair` written plainly, then one unpadded forward of BOS + whole."""
    n = len(prompt) - len(prompt.rstrip())
    if n:
        prompt, cont = prompt[:-n], prompt[-n:] + cont
    whole, ctx = _ids(tok, prompt + cont), _ids(tok, prompt)
    c_ids = whole[len(ctx) :]
    ids = torch.tensor([[tok.bos_token_id] + whole])
    with torch.no_grad():
        lp = model(input_ids=ids).logits[0].double().log_softmax(-1)
    start = 1 + len(ctx)
    return sum(float(lp[start - 1 + j, t]) for j, t in enumerate(c_ids))


def test_hflm_equals_a_joint_encoding_reference(tok, tiny):
    """MMLU-style letters (single-token path), multi-token answers, and a prompt ending in a space,
    within 1e-5 of the plain reference; under the legacy layout the old separate encoding scored
    " A" as two tokens, which this would catch."""
    prompt = "Question: which city is largest?\nA. Paris\nB. New York\nAnswer:"
    requests = [(prompt, f" {x}") for x in "ABCD"] + [(prompt, " B New York"), ("The capital of France is", " Paris")]
    requests += [("Answer: ", "A"), ("Answer: ", "B")]
    got = HFLM(tiny, tok, batch_size=3).loglikelihood(requests)
    for (p, c), g in zip(requests, got):
        assert g == pytest.approx(_reference_loglikelihood(tiny, tok, p, c), abs=1e-5), (p, c)
    one_token = [len(continuation_ids(tok, prompt, f" {x}")[0]) for x in "ABCD"]
    assert one_token == [1, 1, 1, 1]


class Bigram(torch.nn.Module):
    """A causal LM whose next-token logits depend only on the current token: logits = table[id]."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = torch.nn.Parameter(table)
        self.config = SimpleNamespace(max_position_embeddings=64)

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=None):
        return SimpleNamespace(logits=self.table[input_ids])  # (B, T, V)


def test_two_token_continuation_by_hand():
    """Legacy layout, "Answer:" + " A B": the joint split is ['▁A', '▁B'] (the separate encoding
    would add a leading '▁'). With logits 0 except table[last, '▁A'] = log 3 (last: the final
    token of "Answer:") and table['▁A', '▁B'] = log 5, over V tokens:
        log p = log(3 / (V - 1 + 3)) + log(5 / (V - 1 + 5)).
    """
    t = legacy_sentencepiece()
    a, b = t.convert_tokens_to_ids(["▁A", "▁B"])
    assert continuation_ids(t, "Answer:", " A B") == ([a, b], True)
    assert _pieces(t, _ids(t, " A B")) == ["▁", "▁A", "▁B"]
    colon = _ids(t, "Answer:")[-1]
    V = len(t)
    table = torch.zeros(V, V, dtype=torch.float64)
    table[colon, a] = torch.log(torch.tensor(3.0, dtype=torch.float64))
    table[a, b] = torch.log(torch.tensor(5.0, dtype=torch.float64))
    want = torch.log(torch.tensor(3 / (V + 2), dtype=torch.float64)) + torch.log(torch.tensor(5 / (V + 4), dtype=torch.float64))
    got = HFLM(Bigram(table), t).loglikelihood([("Answer:", " A B"), ("Answer:", " A")])
    assert got[0] == pytest.approx(float(want), abs=1e-6)  # HFLM reads log-probs in float32
    assert got[1] == pytest.approx(float(torch.log(torch.tensor(3 / (V + 2), dtype=torch.float64))), abs=1e-6)  # HFLM reads log-probs in float32


def test_llm_judge_label_tokens_follow_the_question():
    """The judge reads P("A") at the position after "Better answer:": under the legacy layout the
    label's variants are the tokens after that text ('▁A', and 'A' glued to the colon when the
    joint split holds), never the spurious pair ['▁', '▁A'] of " A" encoded alone."""
    from alignkit.feedback.judges import LLMJudge
    from alignkit.models.load import tiny_llama

    t = legacy_sentencepiece()
    judge = LLMJudge(tiny_llama("nano", tokenizer=t, seed=0), t)
    variants = [_pieces(t, v) for v in judge.variants[0]]
    assert ["▁A"] in variants and ["▁", "▁A"] not in variants
    byte = byte_level()
    assert LLMJudge(tiny_llama("nano", tokenizer=byte, seed=0), byte).variants[0] == [_ids(byte, "A"), _ids(byte, " A")]
