"""Chunked LM head (alignkit.models.chunked) against the full-logits path: values and gradients.

The reference is the plain path written out here: full (B, T, V) logits from the model's own
forward, `log_softmax`, gather, masked sum. Chunks are made small (7 tokens) so every batch
spans several of them, forward and backward.
"""

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from alignkit.models import chunked
from alignkit.models.chunked import Head, chunked_logprobs, sft_loss_of_model, split_head
from alignkit.models.logprobs import position_ids_from_mask
from alignkit.train.reference import response_logps

V, PAD, CHUNK = 301, 0, 7


def _llama(tie=False):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, pad_token_id=PAD, tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg).float()


def _batch(side: str, seed=0):
    """Three rows of lengths 9, 14, 5 with labels -100 on a 3-token prompt and on padding."""
    g = torch.Generator().manual_seed(seed)
    lens, T = [9, 14, 5], 14
    ids = torch.full((3, T), PAD)
    mask = torch.zeros(3, T, dtype=torch.long)
    labels = torch.full((3, T), -100)
    for r, n in enumerate(lens):
        row = torch.randint(1, V, (n,), generator=g)
        sl = slice(0, n) if side == "right" else slice(T - n, T)
        ids[r, sl], mask[r, sl] = row, 1
        lab = row.clone()
        lab[:3] = -100
        labels[r, sl] = lab
    return ids, mask, labels


def _full(model, ids, mask, labels):
    """Plain reference: (summed NLL, per-row summed log-probs) from full logits."""
    logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
    lp = F.log_softmax(logits[:, :-1].float(), -1)  # (B, T-1, V)
    tgt = labels[:, 1:]
    keep = tgt != -100
    tok = lp.gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1) * keep
    return -tok.sum(), tok.sum(-1)


def _grads(model, loss):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.autograd.grad(loss, params)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("tie", [False, True])
def test_sft_loss_and_grads_equal_full(side, tie):
    model = _llama(tie)
    ids, mask, labels = _batch(side)
    assert split_head(model) is not None
    ref, _ = _full(model, ids, mask, labels)
    got, n = sft_loss_of_model(model, ids, mask, labels, chunk=CHUNK)
    assert int(n) == (labels[:, 1:] != -100).sum()
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(_grads(model, got), _grads(model, ref)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("side", ["left", "right"])
def test_response_logps_equal_full_with_lora(side):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    for n, p in model.named_parameters():  # non-zero B so the adapter changes the output
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    ids, mask, labels = _batch(side, seed=1)
    _, ref = _full(model, ids, mask, labels)
    got, counts = response_logps(model, ids, mask, labels, logprob_chunk=CHUNK)
    old, _ = response_logps(model, ids, mask, labels, logprob_chunk=0)  # the existing full-logits path
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(old, ref, rtol=1e-5, atol=1e-5)
    w = torch.tensor([0.3, -1.0, 2.0])
    for a, b in zip(_grads(model, (got * w).sum()), _grads(model, (ref * w).sum())):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    with model.disable_adapter():  # the LoRA reference mode: adapters off, same split path
        _, ref0 = _full(model, ids, mask, labels)
        got0, _ = response_logps(model, ids, mask, labels, logprob_chunk=CHUNK)
    torch.testing.assert_close(got0, ref0, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got0, got)


def test_chunked_logprobs_hand_head():
    """A 2-token vocabulary, hidden size 1, W = [[1], [-1]], no bias: logits (h, -h), so
    log p(token 0) = h - log(e^h + e^-h) = -log(1 + e^{-2h}); softcap 1 gives tanh(h), -tanh(h)."""
    h = torch.tensor([[0.0], [1.0], [-2.0]], requires_grad=True)
    w = torch.tensor([[1.0], [-1.0]])
    y = torch.zeros(3, dtype=torch.long)
    got = chunked_logprobs(h, y, Head(w, None), chunk=2)
    torch.testing.assert_close(got, -torch.log1p(torch.exp(-2 * h.detach()[:, 0])))
    (g,) = torch.autograd.grad(got.sum(), h)  # d/dh -log(1 + e^{-2h}) = 2 / (1 + e^{2h})
    torch.testing.assert_close(g[:, 0], 2 / (1 + torch.exp(2 * h.detach()[:, 0])))
    capped = chunked_logprobs(h, y, Head(w, None, softcap=1.0), chunk=2)
    torch.testing.assert_close(capped, -torch.log1p(torch.exp(-2 * torch.tanh(h.detach()[:, 0]))))


def test_softcapped_gemma2_equals_full():
    torch.manual_seed(0)
    cfg = Gemma2Config(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=8, max_position_embeddings=128, pad_token_id=PAD,
                       final_logit_softcapping=3.0, attn_implementation="eager")
    model = Gemma2ForCausalLM(cfg).float()
    assert split_head(model)[1].softcap == 3.0
    ids, mask, labels = _batch("right", seed=2)
    ref, _ = _full(model, ids, mask, labels)
    got, _ = sft_loss_of_model(model, ids, mask, labels, chunk=CHUNK)
    assert chunked._VERIFIED[type(model)]
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(_grads(model, got), _grads(model, ref)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_unsplittable_models_fall_back():
    """GPT-2 has no `get_decoder` split in every version; a LoRA-wrapped head is not a plain
    Linear. Either way the numbers are the full path's."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64)).eval()
    lora_head = peft.get_peft_model(_llama(), peft.LoraConfig(r=2, target_modules=["lm_head"]))
    assert split_head(lora_head) is None
    ids, mask, labels = _batch("left", seed=3)
    for model in (gpt2, lora_head):
        ref, _ = _full(model, ids, mask, labels)
        got, _ = sft_loss_of_model(model, ids, mask, labels, chunk=CHUNK)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_ddp_wrapped_model_equal_full(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        model = _llama()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        ids, mask, labels = _batch("left", seed=4)
        ref, _ = _full(model, ids, mask, labels)
        ref_grads = _grads(model, ref)
        got, _ = sft_loss_of_model(ddp, ids, mask, labels, chunk=CHUNK)
        got.backward()
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        for p, b in zip(model.parameters(), ref_grads):
            torch.testing.assert_close(p.grad, b, rtol=1e-5, atol=1e-5)
        assert model.get_output_embeddings()(torch.ones(1, 32)).shape == (1, V)  # head restored
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("scale, softcap, temperature", [(1.0, None, 1.0), (0.5, 3.0, 0.7), (2.0, None, 1.3)])
def test_hand_written_backward_equals_autograd(scale, softcap, temperature):
    """`chunked_logprobs` / `chunked_stats` (a custom backward: recompute the chunk's logits, form
    (onehot - softmax) * dz/da by hand) against autograd through the plain full computation, for
    the hidden states, the head weight and a bias, with logit scaling, soft-capping and a
    temperature; the entropy metric equals `entropy_from_logits`."""
    from alignkit.losses.policy import entropy_from_logits
    from alignkit.models.chunked import chunked_stats

    g = torch.Generator().manual_seed(0)
    h0, w0, b0 = torch.randn(11, 8, generator=g), torch.randn(50, 8, generator=g), torch.randn(50, generator=g)
    y = torch.randint(0, 50, (11,), generator=g)
    weights = torch.linspace(-1, 1, 11)

    def full(h, w, b):
        z = F.linear(h, w, b) * scale
        if softcap:
            z = torch.tanh(z / softcap) * softcap
        return (z / temperature).log_softmax(-1)

    leaves = [t.clone().requires_grad_() for t in (h0, w0, b0)]
    ref = full(*leaves)
    ref_lp = ref.gather(-1, y[:, None]).squeeze(-1)
    ref_grads = torch.autograd.grad((ref_lp * weights).sum(), leaves)
    for fn in ("logprobs", "stats"):
        leaves = [t.clone().requires_grad_() for t in (h0, w0, b0)]
        head = Head(leaves[1], leaves[2], scale, softcap, temperature)
        if fn == "logprobs":
            lp = chunked_logprobs(leaves[0], y, head, chunk=4)
        else:
            lp, ent = chunked_stats(leaves[0], y, head, chunk=4)
            torch.testing.assert_close(ent, entropy_from_logits(ref.detach()), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lp, ref_lp.detach(), rtol=1e-5, atol=1e-5)
        for a, b in zip(torch.autograd.grad((lp * weights).sum(), leaves), ref_grads):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_bf16_autocast_gradients_are_as_close_to_float32_as_the_full_path():
    """Under bf16 autocast the head matmuls run in bf16 on both paths (the chunked backward's
    grad_W products too, summed in float32): against the float32 gradients, the chunked path's
    error is no larger than the full-logits path's (2x slack for rounding luck) and both are at
    bf16's scale."""
    g = torch.Generator().manual_seed(0)
    h0, w0 = torch.randn(40, 16, generator=g), torch.randn(64, 16, generator=g)
    y = torch.randint(0, 64, (40,), generator=g)
    weights = torch.linspace(-1, 1, 40)

    def grads(chunk: int | None, bf16: bool):
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            if chunk is None:
                lp = F.linear(h, w).float().log_softmax(-1).gather(-1, y[:, None]).squeeze(-1)
            else:
                lp = chunked_logprobs(h, y, Head(w, None, 1.0, None, 1.0), chunk=chunk)
        return torch.autograd.grad((lp * weights).sum(), (h, w))

    exact = grads(None, False)
    full, chunk = grads(None, True), grads(6, True)
    for e, f, c in zip(exact, full, chunk):
        err_full, err_chunk = (f - e).abs().max().item(), (c - e).abs().max().item()
        assert err_chunk <= 2 * err_full + 1e-6, (err_chunk, err_full)
        assert err_chunk < 0.05 * e.abs().max().item()


def test_segment_sums_round_once():
    """Per-row sums of 1,536 log-probs near -12 (a DPO response at a 128k vocabulary) are the
    float64 sums rounded once to float32 (a float32 `index_add` drifts by ~1e-2 here); gradient
    is one per value."""
    g = torch.Generator().manual_seed(0)
    values = (-11.8 + 0.5 * torch.randn(3 * 1536, generator=g)).requires_grad_(True)
    index = torch.arange(3).repeat_interleave(1536)
    got = chunked.segment_sums(values, index, 4)
    exact = torch.zeros(4, dtype=torch.float64).index_add(0, index, values.detach().double())
    assert got.dtype == torch.float32
    assert torch.equal(got, exact.float())  # row 3 has no values: exactly 0
    got.sum().backward()
    assert torch.equal(values.grad, torch.ones_like(values))


def test_block_cap_splits_large_vocabularies(monkeypatch):
    """With MAX_BLOCK at 3 x V logits a chunk holds 3 tokens whatever `chunk` asks: the head is
    called once per 3 tokens, and values and gradients still equal the full log-softmax."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(10, 8, generator=g, requires_grad=True)
    w = torch.randn(V, 8, generator=g, requires_grad=True)
    y = torch.randint(0, V, (10,), generator=g)
    calls = []
    monkeypatch.setattr(chunked, "MAX_BLOCK", 3 * V)
    monkeypatch.setattr(Head, "logits", lambda self, x, out=None: calls.append(len(x)) or F.linear(x, self.weight))
    got = chunked_logprobs(h, y, Head(w, None), chunk=1024)
    want = F.log_softmax(h @ w.T, -1).gather(-1, y[:, None])[:, 0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert calls == [3, 3, 3, 1]
    ga = torch.autograd.grad(got.sum(), (h, w))
    gb = torch.autograd.grad(want.sum(), (h, w))
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_fused_logsumexp_is_torch_logsumexp_and_entropy_is_exact():
    """`_lse_stats` (one pass of exponentials kept for the entropy) gives bitwise
    `torch.logsumexp` and the plain gather - logsumexp log-probs, and entropies equal to a
    float64 computation, on flat, peaked (one logit 40 above the rest: entropy ~1e-13) and
    large-offset rows, where lse - E[z] would cancel."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(6, 5000, generator=g) * torch.tensor([0.1, 1.0, 3.0, 1.0, 1.0, 1.0])[:, None]
    z[3, 17] += 40.0  # peaked
    z[4] = z[1] + 1000.0  # row 1 offset: the same distribution up to float32 rounding of the logits
    z[5, :2500] = -30.0
    y = torch.randint(0, 5000, (6,), generator=g)
    lp, lse, ent = chunked._lse_stats(z.clone(), y, True)
    assert torch.equal(lse, z.logsumexp(-1))
    assert torch.equal(lp, z.gather(-1, y[:, None])[:, 0] - z.logsumexp(-1))
    q = z.double().log_softmax(-1)
    want = -(q.exp() * q).sum(-1)
    torch.testing.assert_close(ent.double(), want, rtol=1e-5, atol=1e-6)
    assert ent[3] < 1e-5 and abs(ent[4] - ent[1]) < 1e-3  # peaked ~0; the offset changes nothing
    lp2, lse2, none = chunked._lse_stats(z.clone(), y, False)
    assert torch.equal(lp2, lp) and torch.equal(lse2, lse) and none is None


def test_entropy_under_bf16_autocast_is_float32_accurate():
    """Under bf16 autocast the head's matmul runs in bf16, but the entropy of those (bf16) logits
    is summed in float32: within 1e-5 of a float64 entropy of the same logits (a bf16 dot
    product there was 6e-3 off)."""
    from alignkit.models.chunked import chunked_stats

    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(64, 32, generator=g), torch.randn(4096, 32, generator=g) * 0.3
    y = torch.randint(0, 4096, (64,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, ent = chunked_stats(h, y, Head(w, None), chunk=16)
    q = F.linear(h.bfloat16(), w.bfloat16()).double().log_softmax(-1)
    torch.testing.assert_close(ent.double(), -(q.exp() * q).sum(-1), rtol=0, atol=1e-5)


@pytest.mark.parametrize("bias, scale, softcap, temperature", [(False, 1.0, None, 1.0), (True, 0.5, 3.0, 0.7)])
def test_logits_into_a_reused_block_are_the_out_of_place_logits(bias, scale, softcap, temperature):
    """`Head.logits(h, out=block)` (mm / addmm into the block, post-processing in place) is bitwise
    the plain path, for a short last chunk too; under autocast the block is not used."""
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(40, 8, generator=g), (torch.randn(40, generator=g) if bias else None)
    head = Head(w, b, scale, softcap, temperature)
    block = torch.full((6, 40), float("nan"))
    for n in (6, 3):
        h = torch.randn(n, 8, generator=g)
        got = head.logits(h, block)
        assert got.data_ptr() == block.data_ptr() and torch.equal(got, head.logits(h))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = head.logits(h, block)
    assert low.dtype == torch.bfloat16 and low.data_ptr() != block.data_ptr()
