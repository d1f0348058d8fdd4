"""Padding-free packing equals the padded batch: SFT loss, its gradients, per-sequence log-probs;
the DPO-family step (policy and reference passes) and its training loop."""

import pytest
import torch

from alignkit.data.batching import collate_sft
from alignkit.data.packing import pack, per_sequence_sums
from alignkit.data.tokenize import TokenizedSFT
from alignkit.models.chunked import scored_logprobs, sft_loss_of_model
from alignkit.train.reference import response_logps
from tests.test_chunked_logprobs import CHUNK, PAD, V, _llama


def _items():
    g = torch.Generator().manual_seed(5)

    def ids(n):
        return torch.randint(3, V, (n,), generator=g).tolist()

    return [TokenizedSFT(ids(4), ids(7)), TokenizedSFT(ids(11), ids(2)), TokenizedSFT(ids(1), ids(5))]


def test_pack_layout_by_hand():
    b = pack([[5, 6], [7]], [[8], [9, 10]])
    assert b.input_ids.tolist() == [[5, 6, 8, 7, 9, 10]]
    assert b.position_ids.tolist() == [[0, 1, 2, 0, 1, 2]]
    assert b.labels.tolist() == [[-100, -100, 8, -100, 9, 10]]
    assert b.seq_index.tolist() == [0, 0, 0, 1, 1, 1]


def test_packed_equals_padded_sft_loss_grads_and_sequence_logps():
    model = _llama()
    items = _items()
    padded = collate_sft(items, PAD)
    packed = pack([it.prompt_ids for it in items], [it.response_ids for it in items])
    for chunk in (CHUNK, 0):  # chunked head and full logits
        ref, n_ref = sft_loss_of_model(model, padded.input_ids, padded.attention_mask, padded.labels, chunk=chunk)
        got, n_got = sft_loss_of_model(model, packed.input_ids, None, packed.labels, chunk=chunk,
                                       position_ids=packed.position_ids)
        assert int(n_ref) == int(n_got) == sum(len(it.response_ids) for it in items)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        params = list(model.parameters())
        for a, b in zip(torch.autograd.grad(got, params), torch.autograd.grad(ref, params)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    leaky, _ = sft_loss_of_model(model, packed.input_ids, None, packed.labels, chunk=CHUNK,
                                 position_ids=torch.arange(packed.input_ids.shape[1]).unsqueeze(0))
    assert not torch.allclose(leaky, ref)  # one running sequence: tokens see earlier sequences
    sums_ref, _ = response_logps(model, padded.input_ids, padded.attention_mask, padded.labels)
    lp, keep = scored_logprobs(model, packed.input_ids, None, packed.labels, CHUNK, position_ids=packed.position_ids)
    torch.testing.assert_close(per_sequence_sums(lp, keep, packed), sums_ref, rtol=1e-5, atol=1e-5)


def test_sft_stage_packed_training_equals_padded(tmp_path):
    """Two optimizer steps of the one loop with `sft_step` on packed and on padded micro-batches
    (batch 3, accumulation 1) reach the same weights. lr 1e-3: Adam divides by sqrt(v), so on a
    parameter whose gradient is near 0 a rounding-level gradient difference becomes an update
    difference of order lr; 1e-3 keeps that under the 1e-5 tolerance."""
    from alignkit.config import TrainConfig
    from alignkit.train.loop import train
    from alignkit.train.sft import collate_packed, sft_step

    items = _items() * 2
    cfg = TrainConfig(lr=1e-3, batch_size=3, max_steps=2, precision="fp32", progress=False, tensorboard=False,
                      log_every=0, overwrite=True)
    plan = lambda epoch: [[0, 1, 2], [3, 4, 5]]  # noqa: E731
    finals = []
    for name, collate in (("packed", collate_packed), ("padded", lambda b: collate_sft(b, PAD))):
        model = _llama()
        train(model, sft_step, items, collate, plan, cfg, tmp_path / name)
        finals.append(model.state_dict())
    for k in finals[0]:
        torch.testing.assert_close(finals[0][k], finals[1][k], rtol=1e-5, atol=1e-5)


# -- the preference stages -----------------------------------------------------------------------


def _pairs():
    from alignkit.data.tokenize import TokenizedPair

    g = torch.Generator().manual_seed(6)

    def ids(n):
        return torch.randint(3, V, (n,), generator=g).tolist()

    return [TokenizedPair(ids(4), ids(6), ids(2), soft_label=0.9), TokenizedPair(ids(9), ids(1), ids(5)),
            TokenizedPair(ids(2), ids(3), ids(7), soft_label=0.7)]


def _perturbed(model, seed=1, std=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return model


def test_pack_preference_layout():
    from alignkit.data.packing import pack_preference
    from alignkit.data.tokenize import TokenizedPair

    b = pack_preference([TokenizedPair([5], [6, 7], [8]), TokenizedPair([9, 9], [4], [3, 2])])
    assert b.packed.input_ids.tolist() == [[5, 6, 7, 9, 9, 4, 5, 8, 9, 9, 3, 2]]  # chosen 0, 1; rejected 0, 1
    assert b.packed.position_ids.tolist() == [[0, 1, 2, 0, 1, 2, 0, 1, 0, 1, 2, 3]]
    assert b.packed.seq_index.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 3, 3, 3, 3]
    assert b.num_pairs == 2 and b.soft_label is None
    assert [x.tolist() for x in b.split(torch.arange(4))] == [[0, 1], [2, 3]]


def _policy(mode, make):
    """`make()`'s model; for mode 'lora' wrapped in a LoRA adapter whose B matrices are not zero
    (so the policy differs from its adapter-free reference)."""
    model = make()
    if mode == "lora":
        peft = pytest.importorskip("peft", reason="peft is not installed: the LoRA reference needs it")
        model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
        for n, p in model.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.1)
    return model


def _steps_agree(model, layout, padded, loss, mode, make):
    """The DPO-family step on the `layout` batch and on the two-row `padded` batch, with the chunked
    head and with full logits, against the reference of `mode` (a frozen perturbed `make()` copy,
    the LoRA policy's adapter-free base, or none): loss, metrics and gradients equal, fp32, 1e-5.
    Returns the (layout, padded) step outputs per head."""
    from alignkit.config import TrainConfig
    from alignkit.train import dpo
    from alignkit.train.reference import CopyReference, LoraReference, NoReference

    params = [p for p in model.parameters() if p.requires_grad]
    outs = []
    for chunk in (CHUNK, 0):
        cfg = dpo.Config(loss=loss, beta=0.5, train=TrainConfig(logprob_chunk=chunk))  # the step takes `reference`
        if mode == "copy":
            reference = CopyReference(_perturbed(make()), cfg.average_logps, chunk)
        else:
            reference = LoraReference(cfg.average_logps, chunk) if mode == "lora" else NoReference()
        step = dpo.make_preference_step(cfg, reference)
        a, b = step(model, layout), step(model, padded)
        torch.testing.assert_close(a.loss, b.loss, rtol=1e-5, atol=1e-5)
        for k in ("rewards/margins", "logps/chosen", "logps/rejected"):
            assert a.metrics[k] == pytest.approx(b.metrics[k], rel=1e-5, abs=1e-5), k
        ga, gb = torch.autograd.grad(a.loss, params), torch.autograd.grad(b.loss, params)
        assert max(g.abs().max().item() for g in gb) > 1e-4
        for x, y in zip(ga, gb):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
        outs.append((a, b))
    return outs


@pytest.mark.parametrize("loss, mode", [("sigmoid", "copy"), ("ipo", "lora"), ("simpo", "none")])
def test_packed_preference_step_equals_padded(loss, mode):
    """The DPO-family step on the packed [chosen; rejected] sequences (policy pass and in-step
    reference pass, chunked head and full logits) gives the padded step's loss, metrics and
    gradients, fp32, 1e-5: sigmoid DPO against a frozen copy, IPO (averaged log-probs) against
    the LoRA policy's adapter-free base, SimPO with no reference."""
    from alignkit.data.batching import collate_preference
    from alignkit.data.packing import pack_preference
    from alignkit.train import dpo

    model = _policy(mode, _llama)
    items = _pairs()
    padded, packed = dpo.DPOBatch(collate_preference(items, PAD)), dpo.DPOBatch(pack_preference(items))
    for a, b in _steps_agree(model, packed, padded, loss, mode, _llama):
        assert a.weight == b.weight == 3
        assert a.metrics["ntokens"] == b.metrics["ntokens"] == sum(2 * len(x.prompt_ids) + len(x.chosen_ids)
                                                                   + len(x.rejected_ids) for x in items)


def test_dpo_stage_packed_training_equals_padded(tmp_path):
    """Two optimizer steps of the one loop with the DPO step (sigmoid, frozen-copy reference) on
    packed, on prompt-sharing and on padded micro-batches reach the same weights (lr 1e-3, see
    the SFT test)."""
    from alignkit.config import TrainConfig
    from alignkit.train import dpo
    from alignkit.train.loop import train
    from alignkit.train.reference import CopyReference

    items = dpo.Indexed(_pairs() * 2)
    tcfg = TrainConfig(lr=1e-3, batch_size=3, max_steps=2, precision="fp32", progress=False, tensorboard=False,
                       log_every=0, overwrite=True, logprob_chunk=CHUNK)
    cfg = dpo.Config(loss="sigmoid", beta=0.5, reference="copy", train=tcfg)
    plan = lambda epoch: [[0, 1, 2], [3, 4, 5]]  # noqa: E731
    finals = []
    for packing, share in ((True, None), (False, None), (False, (32, 64))):
        reference = CopyReference(_perturbed(_llama()), logprob_chunk=CHUNK)
        model = _llama()
        train(model, dpo.make_preference_step(cfg, reference), items,
              dpo.make_preference_collate(PAD, reference, packing, share), plan, tcfg,
              tmp_path / f"{packing}-{share}", weight_fn=lambda b: float(b.pairs.num_pairs))
        finals.append(model.state_dict())
    for k in finals[0]:
        torch.testing.assert_close(finals[0][k], finals[1][k], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(finals[2][k], finals[1][k], rtol=1e-5, atol=1e-5)


def test_packed_kto_step_equals_padded():
    """KTO on packed examples and packed mismatched pairs (the z0 pass), frozen-copy reference,
    chunked head and full logits: the padded step's loss, z0 and gradients, fp32, 1e-5."""
    from alignkit.config import TrainConfig
    from alignkit.data.tokenize import TokenizedUnpaired
    from alignkit.train import dpo
    from alignkit.train.reference import CopyReference

    pairs = _pairs()
    examples = [TokenizedUnpaired(p.prompt_ids, p.chosen_ids if i % 2 else p.rejected_ids, bool(i % 2))
                for i, p in enumerate(pairs + pairs[:1])]
    items = dpo.Indexed(dpo.make_kto_items(examples, None, seed=0))
    model = _llama()
    params = list(model.parameters())
    for chunk in (CHUNK, 0):
        cfg = dpo.Config(loss="kto", beta=0.5, train=TrainConfig(logprob_chunk=chunk))
        reference = CopyReference(_perturbed(_llama()), False, chunk)
        step = dpo.make_kto_step(cfg, reference)
        batch = [items[j] for j in range(len(items))]
        a = step(model, dpo.make_kto_collate(PAD, reference, packing=True)(batch))
        b = step(model, dpo.make_kto_collate(PAD, reference, packing=False)(batch))
        torch.testing.assert_close(a.loss, b.loss, rtol=1e-5, atol=1e-5)
        assert a.metrics["kl"] == pytest.approx(b.metrics["kl"], rel=1e-5, abs=1e-6) and b.metrics["kl"] > 0
        assert a.metrics["ntokens"] == b.metrics["ntokens"] and a.weight == b.weight == 4
        for x, y in zip(torch.autograd.grad(a.loss, params), torch.autograd.grad(b.loss, params)):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


def test_packing_config_for_dpo():
    from alignkit.config import load_config
    from alignkit.train import dpo

    assert load_config(dpo.Config, None, ["train.packing=true"]).train.packing
    assert load_config(dpo.Config, None, ["train.packing=true", "loss=kto"]).train.packing


# -- shared prompts: one row per pair, the prompt once ------------------------------------------


def test_shared_prompt_layout_by_hand():
    from alignkit.data.packing import collate_shared_prompt, shared_prompt_length
    from alignkit.data.tokenize import TokenizedPair

    items = [TokenizedPair([5, 6, 7], [8, 9], [4]), TokenizedPair([], [3], [2, 1])]
    b = collate_shared_prompt(items, pad_id=0)
    # pair 0: prefix 5 6, chosen branch 7 8 9, rejected branch 7 4; pair 1 (no prompt): 3 | 2 1, padding
    assert b.input_ids.tolist() == [[5, 6, 7, 8, 9, 7, 4], [3, 2, 1, 0, 0, 0, 0]]
    assert b.position_ids.tolist() == [[0, 1, 2, 3, 4, 2, 3], [0, 0, 1, 0, 0, 0, 0]]
    assert b.labels.tolist() == [[-100, -100, -100, 8, 9, -100, 4], [-100, -100, 1, -100, -100, -100, -100]]
    assert b.seq_index.reshape(2, 7).tolist() == [[3, 3, 0, 0, 0, 2, 2], [1, 3, 3, 3, 3, 3, 3]]
    assert [shared_prompt_length(x) for x in items] == [7, 3] and b.tokens == 10 and b.num_pairs == 2
    m = b.attention_mask[0, 0].int().tolist()
    assert m[2] == [1, 1, 1, 0, 0, 0, 0]  # the chosen branch's first token: prefix and itself
    assert m[4] == [1, 1, 1, 1, 1, 0, 0]
    assert m[5] == [1, 1, 0, 0, 0, 1, 0]  # the rejected branch's copy of token 7 never sees the chosen branch
    assert m[6] == [1, 1, 0, 0, 0, 1, 1]
    pad = b.attention_mask[1, 0].int().tolist()
    assert pad[2] == [0, 1, 1, 0, 0, 0, 0] and pad[4] == [0, 0, 0, 0, 1, 0, 0]  # pads: themselves only


@pytest.mark.parametrize("loss, mode, attn", [("sigmoid", "copy", "sdpa"), ("ipo", "lora", "sdpa"),
                                              ("simpo", "none", "eager"), ("sigmoid", "copy", "eager")])
def test_shared_prompt_preference_step_equals_padded(loss, mode, attn):
    """The DPO-family step on the prompt-sharing rows (tree mask; policy and in-step reference
    passes, chunked head and full logits, SDPA and eager attention) gives the two-row padded
    step's loss, metrics and gradients, fp32, 1e-5, with a pair without a prompt among them."""
    from alignkit.data.batching import collate_preference
    from alignkit.data.packing import collate_shared_prompt
    from alignkit.data.tokenize import TokenizedPair
    from alignkit.train import dpo

    def llama():
        m = _llama()
        m.config._attn_implementation = attn
        return m

    model = _policy(mode, llama)
    items = _pairs() + [TokenizedPair([], [7, 8, 9], [10, 11])]
    padded = dpo.DPOBatch(collate_preference(items, PAD))
    shared = dpo.DPOBatch(collate_shared_prompt(items, PAD))
    for a, b in _steps_agree(model, shared, padded, loss, mode, llama):
        assert a.weight == b.weight == 4
        assert a.metrics["ntokens"] == sum(len(x.prompt_ids) + bool(x.prompt_ids) + len(x.chosen_ids)
                                           + len(x.rejected_ids) for x in items)


def test_shared_prompt_needs_custom_mask_attention():
    from alignkit.data.packing import collate_shared_prompt
    from alignkit.train import dpo
    from alignkit.train.reference import response_logps

    model = _llama()
    assert dpo.sharing_prompts(dpo.Config(), model) == (32, 64)
    assert dpo.sharing_prompts(dpo.Config(share_prompt=False), model) is None
    b = collate_shared_prompt(_pairs(), PAD)
    model.config._attn_implementation = "flash_attention_2"
    assert dpo.sharing_prompts(dpo.Config(), model) is None
    with pytest.raises(ValueError, match="custom 4-D attention mask"):
        response_logps(model, **dpo.model_inputs(b))


def test_shared_prompt_is_cheaper_by_hand():
    """H = 256, I = 1024: (4H + 3I) / 2 = 2048 per token, 1 per attention entry. 16 pairs with a
    14-token prompt and 10 / 8-token responses: two rows of 24 cost 2 * 16 * (24 * 2048 + 288) =
    1,582,080, shared rows of 33 cost 16 * (33 * 2048 + 1089) = 1,098,768: shared. One pair with
    512 + 1,536 + 1,536 tokens: 2 * (2048 * 2048 + 2048^2 / 2) = 12,582,912 against
    3585 * 2048 + 3585^2 = 20,194,305: two rows."""
    from alignkit.data.packing import shared_prompt_is_cheaper
    from alignkit.data.tokenize import TokenizedPair

    short = [TokenizedPair([1] * 14, [2] * 10, [3] * 8)] * 16
    assert shared_prompt_is_cheaper(short, 256, 1024)
    long = [TokenizedPair([1] * 512, [2] * 1536, [3] * 1536)]
    assert not shared_prompt_is_cheaper(long, 256, 1024)


@pytest.mark.parametrize("average", [False, True])
def test_precomputed_reference_pass_shares_prompts(average, monkeypatch):
    """The one-off reference pass with `share_prompt` (pairs, prompt once, 2 pairs a forward)
    gives the plain pass's table (every sequence alone in length-sorted padded batches), 1e-5."""
    from alignkit.data.tokenize import TokenizedPair
    from alignkit.train import dpo
    from alignkit.train import reference as ref_lib
    from alignkit.train.reference import precompute_logps

    calls = []
    real = ref_lib.collate_shared_prompt
    monkeypatch.setattr(ref_lib, "collate_shared_prompt", lambda *a: calls.append(1) or real(*a))

    model = _perturbed(_llama())
    items = _pairs() + [TokenizedPair([], [7, 8, 9], [10, 11]), TokenizedPair([4, 5, 6], [7], [8, 9])]
    columns = dpo.preference_columns(items)
    plain = precompute_logps(model, columns, PAD, average, batch_size=4)
    shared = precompute_logps(model, columns, PAD, average, batch_size=4, share_prompt=(32, 64))
    assert set(shared) == {"chosen", "rejected"} and len(calls) == 3  # 5 pairs, 2 a forward, all shared
    for k in plain:
        torch.testing.assert_close(shared[k], plain[k], rtol=1e-5, atol=1e-5)
    assert plain["chosen"].abs().min() > 0
