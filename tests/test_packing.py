"""Padding-free packing equals the padded batch: SFT loss, its gradients, per-sequence log-probs."""

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
