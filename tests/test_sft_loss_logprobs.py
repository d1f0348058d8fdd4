"""SFT loss and response log-probs: hand-computed values, a naive reference, masking, padding."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from alignkit.data.batching import collate_preference, collate_sft
from alignkit.data.tokenize import TokenizedPair, TokenizedSFT
from alignkit.losses.sft import sft_loss, token_logprobs
from alignkit.models.logprobs import forward_logits, per_token_logprobs, sequence_logprobs

V = 48
PAD = 0


@pytest.fixture(scope="module")
def gpt2():
    """Learned absolute position embeddings: left padding shifts them unless positions come from the mask."""
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=128, pad_token_id=PAD)
    return GPT2LMHeadModel(cfg).eval()


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=PAD,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(params=["llama", "gpt2"])
def model(request):
    return request.getfixturevalue(request.param)


def _items(seed=0):
    g = torch.Generator().manual_seed(seed)

    def ids(n):
        return torch.randint(3, V, (n,), generator=g).tolist()

    return [
        TokenizedSFT([1] + ids(4), ids(3) + [2]),
        TokenizedSFT([1] + ids(9), ids(6) + [2]),
        TokenizedSFT([1] + ids(2), ids(1) + [2]),
    ]


def _left_pad(input_ids, attention_mask, labels, extra=0):
    """Move each row's padding to the left (plus `extra` more pad columns)."""
    b, t = input_ids.shape
    ids = torch.full((b, t + extra), PAD)
    mask = torch.zeros((b, t + extra), dtype=torch.long)
    lab = torch.full((b, t + extra), -100)
    for i in range(b):
        n = int(attention_mask[i].sum())
        ids[i, t + extra - n :] = input_ids[i, :n]
        mask[i, t + extra - n :] = 1
        lab[i, t + extra - n :] = labels[i, :n]
    return ids, mask, lab


def test_sft_loss_by_hand():
    """B=1, T=4, V=3, input [p0, p1, r1, r2] with labels [-100, -100, 1, 2].

    After the shift, logits[t] predicts labels[t+1]:
      t=0 -> label -100: ignored (its logits are garbage on purpose)
      t=1 -> label 1, logits [0, 0, 0]: p = 1/3, loss ln 3
      t=2 -> label 2, logits [0, 0, ln 2]: p = 2 / (1 + 1 + 2) = 1/2, loss ln 2
      t=3 -> nothing to predict
    loss_sum = ln 3 + ln 2 = ln 6 = 1.791759..., n_tokens = 2.
    """
    logits = torch.tensor([[[50.0, -50.0, 7.0], [0.0, 0.0, 0.0], [0.0, 0.0, math.log(2)], [9.0, 9.0, -9.0]]])
    labels = torch.tensor([[-100, -100, 1, 2]])
    loss_sum, n = sft_loss(logits, labels)
    assert loss_sum.item() == pytest.approx(math.log(6), abs=1e-6)
    assert n.item() == 2
    lp = token_logprobs(logits, labels)
    assert lp.shape == (1, 3)
    assert lp[0].tolist() == pytest.approx([0.0, -math.log(3), -math.log(2)], abs=1e-6)


def test_sft_loss_matches_naive_cross_entropy_on_a_model(model):
    b = collate_sft(_items(), pad_id=PAD)
    logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
    loss_sum, n = sft_loss(logits, b.labels)
    ref = F.cross_entropy(
        logits[:, :-1].reshape(-1, V), b.labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum"
    )
    assert n.item() == sum(len(x.response_ids) for x in _items())
    assert loss_sum.item() == pytest.approx(ref.item(), rel=1e-6)
    naive = torch.log_softmax(logits[:, :-1], -1).gather(-1, b.labels[:, 1:].clamp(min=0)[..., None])[..., 0]
    naive = naive * (b.labels[:, 1:] != -100)
    assert torch.allclose(token_logprobs(logits, b.labels), naive, atol=1e-6)


def test_prompt_and_padding_get_no_gradient():
    torch.manual_seed(1)
    labels = torch.tensor([[-100, -100, 5, 6, -100, -100], [-100, 3, 4, 2, 7, -100]])
    logits = torch.randn(2, 6, 10, requires_grad=True)
    loss_sum, _ = sft_loss(logits, labels)
    loss_sum.backward()
    scored = torch.zeros(2, 6, dtype=torch.bool)
    scored[:, :-1] = labels[:, 1:] != -100  # logits[t] is scored iff labels[t+1] is a response token
    assert (logits.grad[~scored] == 0).all()
    assert (logits.grad[scored].abs().sum(-1) > 0).all()

    # perturbing the logits at prompt/padding positions changes nothing
    bumped = logits.detach().clone()
    bumped[~scored] += 100 * torch.randn_like(bumped[~scored])
    assert sft_loss(bumped, labels)[0].item() == pytest.approx(loss_sum.item(), abs=1e-5)


def test_logprobs_and_loss_invariant_to_padding_side_and_amount(model):
    items = _items(seed=2)
    right = collate_sft(items, pad_id=PAD)
    extra = collate_sft(items, pad_id=PAD, pad_to_multiple_of=32)
    left = _left_pad(right.input_ids, right.attention_mask, right.labels, extra=5)

    with torch.no_grad():
        one_by_one = torch.cat(
            [
                sequence_logprobs(model, b.input_ids, b.attention_mask, b.labels)
                for b in (collate_sft([x], pad_id=PAD) for x in items)
            ]
        )
        r = sequence_logprobs(model, right.input_ids, right.attention_mask, right.labels)
        e = sequence_logprobs(model, extra.input_ids, extra.attention_mask, extra.labels)
        lft = sequence_logprobs(model, *left)
        losses = [
            sft_loss(forward_logits(model, ids, m), lab)[0]
            for ids, m, lab in ((right.input_ids, right.attention_mask, right.labels), left)
        ]
    assert torch.allclose(r, one_by_one, atol=1e-5)
    assert torch.allclose(e, one_by_one, atol=1e-5)
    assert torch.allclose(lft, one_by_one, atol=1e-5)
    assert losses[0].item() == pytest.approx(losses[1].item(), abs=1e-4)
    assert losses[0].item() == pytest.approx(-one_by_one.sum().item(), abs=1e-4)


def test_left_padding_needs_position_ids(gpt2):
    """Without mask-derived positions, left padding shifts GPT-2's absolute positions.

    (Llama's rotary encoding is relative, so a constant shift changes its log-probs only by
    rounding; absolute position embeddings change them outright.)
    """
    model = gpt2
    b = collate_sft(_items(seed=3), pad_id=PAD)
    ids, mask, lab = _left_pad(b.input_ids, b.attention_mask, b.labels, extra=3)
    with torch.no_grad():
        ours = sequence_logprobs(model, ids, mask, lab)
        naive = token_logprobs(model(input_ids=ids, attention_mask=mask).logits, lab).sum(-1)
    assert not torch.allclose(ours, naive, atol=1e-3)


def test_per_token_and_average(model):
    b = collate_sft(_items(), pad_id=PAD)
    with torch.no_grad():
        lp, mask = per_token_logprobs(model, b.input_ids, b.attention_mask, b.labels)
        total = sequence_logprobs(model, b.input_ids, b.attention_mask, b.labels)
        avg = sequence_logprobs(model, b.input_ids, b.attention_mask, b.labels, average=True)
    assert lp.shape == mask.shape == (3, b.input_ids.shape[1] - 1)
    assert (lp[~mask] == 0).all() and (lp[mask] < 0).all()
    assert torch.allclose(avg, total / mask.sum(-1))


def test_preference_stack_one_forward_equals_separate(model):
    pairs = [TokenizedPair([1, 4, 5], [6, 7, 2], [8, 2]), TokenizedPair([1, 9], [10, 2], [11, 12, 13, 2])]
    b = collate_preference(pairs, pad_id=PAD)
    with torch.no_grad():
        chosen, rejected = b.split(sequence_logprobs(model, b.input_ids, b.attention_mask, b.labels))
        for i, p in enumerate(pairs):
            for resp, got in ((p.chosen_ids, chosen[i]), (p.rejected_ids, rejected[i])):
                s = collate_sft([TokenizedSFT(p.prompt_ids, resp)], pad_id=PAD)
                ref = sequence_logprobs(model, s.input_ids, s.attention_mask, s.labels)[0]
                assert got.item() == pytest.approx(ref.item(), abs=1e-5)


def test_token_logprobs_bf16_close_to_float():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 50) * 3
    labels = torch.randint(0, 50, (2, 5))
    labels[0, :2] = -100
    ref = token_logprobs(logits, labels)
    got = token_logprobs(logits.bfloat16(), labels)
    assert got.dtype == torch.float32
    assert torch.allclose(got, token_logprobs(logits.bfloat16().float(), labels), atol=1e-5)
    assert torch.allclose(got, ref, atol=0.1)
