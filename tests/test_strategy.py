"""alignkit/train/strategy.py pieces that need no process group (the strategies themselves are
tested under torchrun in tests/test_distributed.py)."""

from types import SimpleNamespace

import torch

from alignkit.train.strategy import share_fp32_master


def _zero(params, masters, **kw):
    return SimpleNamespace(fp16_partitioned_groups_flat=params, fp32_partitioned_groups_flat=masters,
                           optimizer=torch.optim.AdamW([torch.zeros(1)]), **kw)


def test_share_fp32_master_by_hand():
    """Only an exact fp32 copy is replaced by its parameter partition (4 floats = 16 bytes freed);
    a bf16 partition keeps its fp32 master, and so does a master that is not a copy."""
    params = [torch.arange(4.0), torch.arange(3.0).bfloat16(), torch.ones(2)]
    masters = [params[0].clone(), params[1].float(), torch.zeros(2)]
    masters[0].ds_id = "0_3"
    kept = list(masters)
    zero = _zero(params, masters)
    assert share_fp32_master(zero) == 16
    assert zero.fp32_partitioned_groups_flat[0] is params[0] and params[0].requires_grad and params[0].ds_id == "0_3"
    assert zero.fp32_partitioned_groups_flat[1] is kept[1] and zero.fp32_partitioned_groups_flat[2] is kept[2]
    # an optimizer step on the shared master updates the parameter partition itself
    zero.optimizer.param_groups[0]["params"] = [params[0]]
    params[0].grad = torch.ones(4)
    zero.optimizer.step()
    assert (params[0].detach() < torch.arange(4.0)).all()


def test_share_fp32_master_leaves_offload_and_existing_state_alone():
    p = torch.arange(4.0)
    assert share_fp32_master(_zero([p], [p.clone()], offload_optimizer=True)) == 0
    zero = _zero([p], [p.clone()])
    zero.optimizer.state[zero.fp32_partitioned_groups_flat[0]] = {"step": 1}
    assert share_fp32_master(zero) == 0
    assert share_fp32_master(None) == 0


def test_meta_twin_takes_over_gathered_tensors_and_keeps_ties():
    """MetaTwin: the structure costs nothing (meta); `materialise` makes the gathered tensors of
    the right dtype the twin's parameters (same storage, no second full copy), copies in the
    others (another dtype), re-ties a tied head, and the twin computes what the model computes;
    `release` sends it back to the meta device."""
    from alignkit.models.load import tiny_llama
    from alignkit.train.strategy import MetaTwin

    model = tiny_llama("nano", vocab_size=50, seed=1).eval()
    model.config.tie_word_embeddings = True
    model.tie_weights()
    twin = MetaTwin(model)
    assert all(p.is_meta for p in twin.module.parameters())
    full = {n: p.detach().clone() for n, p in model.named_parameters()}  # as a gather hands them over
    assert "lm_head.weight" not in full  # named_parameters lists a tied weight once
    name = "model.norm.weight"
    full[name] = full[name].double()  # another dtype: copied in, cast to the twin's
    ptrs = {n: t.data_ptr() for n, t in full.items()}
    m = twin.materialise(full)
    got = dict(m.named_parameters())
    assert all(got[n].data_ptr() == ptrs[n] for n in ptrs if n != name)
    assert got[name].data_ptr() != ptrs[name] and got[name].dtype == torch.float32
    assert m.lm_head.weight is m.model.embed_tokens.weight
    ids = torch.tensor([[3, 7, 9, 11]])
    with torch.no_grad():
        torch.testing.assert_close(m(ids).logits, model(ids).logits, rtol=0, atol=0)
    twin.release()
    assert all(p.is_meta for p in twin.module.parameters())
