"""Chunked LM head in the RL passes (rollout old log-probs, update, reference) against the full
logits path, in fp32 at 1e-5: log-probs, entropies, PPO values, and their parameter gradients,
on the RL layout (prompts left-padded, responses right-padded), full rows and prefix-shared
prompts, with and without LoRA; and a tiny PPO iteration with chunking on and off.

The full path is the existing one (`train.logprob_chunk` 0): `response_logits` /
`grouped_response_logits`, `gather_logprobs`, `entropy_from_logits`. Chunks of 3 tokens, so a
pass spans several chunks forward and backward.
"""

from __future__ import annotations

import json

import pytest
import torch

from alignkit.config import load_config
from alignkit.models.load import save_model, tiny_llama
from alignkit.train import ppo
from alignkit.train.rollout import pad_left, pad_right, response_token_stats

CHUNK = 3


def _batch():
    """3 distinct prompts (lengths 3, 1, 2; two repeated, so prefix sharing has work to do),
    6 responses of lengths 4, 1, 2, 3, 2, 1 right-padded to T = 4."""
    prompts = [[3, 4, 5], [6], [7, 8], [3, 4, 5], [7, 8], [6]]
    responses = [[9, 10, 11, 12], [13], [14, 15], [16, 17, 18], [19, 20], [21]]
    p_ids, p_mask = pad_left(prompts, 0)
    r_ids, r_mask = pad_right(responses, 0)
    return torch.cat([p_ids, r_ids], 1), torch.cat([p_mask, r_mask], 1), r_ids, r_mask.float()


def _lora_policy():
    from alignkit.config import ModelConfig
    from alignkit.models.load import apply_lora

    policy = apply_lora(tiny_llama("nano", vocab_size=40, seed=3), ModelConfig(lora_r=4, lora_alpha=8)).eval()
    with torch.no_grad():  # a non-zero B, so the adapter changes the output
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    return policy


def _objective(lp, ent, mask):
    """A weighted sum touching every response token, through both outputs."""
    w = torch.linspace(-1.0, 2.0, mask.numel()).view_as(mask)
    return ((lp + 0.3 * ent) * w * mask).sum()


def _grads(model, loss):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.autograd.grad(loss, params)


@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("share", [False, True])
def test_response_stats_and_grads_equal_full_logits(share, lora):
    if lora:
        pytest.importorskip("peft", reason="peft is not installed: the LoRA case needs it")
    model = _lora_policy() if lora else tiny_llama("nano", vocab_size=40, seed=3).eval()
    ids, mask, r_ids, r_mask = _batch()
    out = {}
    for chunk in (CHUNK, 0):
        lp, ent = response_token_stats(model, ids, mask, r_ids, 0.7, chunk, share_prompt_prefix=share,
                                       entropy=True, entropy_grad=True)
        out[chunk] = (lp * r_mask, ent * r_mask, _grads(model, _objective(lp, ent, r_mask)))
    (lp_c, ent_c, g_c), (lp_f, ent_f, g_f) = out[CHUNK], out[0]
    torch.testing.assert_close(lp_c, lp_f, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent_c, ent_f, rtol=1e-5, atol=1e-5)
    assert lp_f[r_mask.bool()].abs().min() > 0.1 and ent_f[r_mask.bool()].min() > 0.1
    assert max(g.abs().max().item() for g in g_f) > 1e-3
    for a, b in zip(g_c, g_f):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert lp_c[~r_mask.bool()].abs().max() == 0  # padding scores nothing
    if lora:  # the adapter-free reference goes through the same split
        with torch.no_grad(), model.disable_adapter():
            ref_c = response_token_stats(model, ids, mask, r_ids, 0.7, CHUNK, share_prompt_prefix=share)[0] * r_mask
            ref_f = response_token_stats(model, ids, mask, r_ids, 0.7, 0, share_prompt_prefix=share)[0] * r_mask
        torch.testing.assert_close(ref_c, ref_f, rtol=1e-5, atol=1e-5)
        assert (ref_c - lp_c.detach()).abs().max() > 1e-3


def test_chunked_passes_never_call_the_lm_head():
    """The chunked path projects chunk by chunk with the head's weight; the head module itself
    (which would return (B, T, V) logits) never runs. With chunking off it does."""
    model = tiny_llama("nano", vocab_size=40, seed=3).eval()
    calls = []
    model.get_output_embeddings().register_forward_hook(lambda mod, inp, o: calls.append(tuple(o.shape)))
    ids, mask, r_ids, _ = _batch()
    for share in (False, True):
        response_token_stats(model, ids, mask, r_ids, 1.0, CHUNK, share_prompt_prefix=share, entropy=True)
    assert calls == []
    response_token_stats(model, ids, mask, r_ids, 1.0, 0)
    assert calls == [(6, 5, 40)]  # logits_to_keep = T + 1


@pytest.mark.parametrize("value_model", ["shared", "separate"])
def test_actor_critic_token_stats_equal_full_logits(value_model):
    """PPO's policy with its critic: log-probs, values and entropies, and the gradients of the
    PPO-shaped objective (log-probs, values, entropy bonus) equal the full path's."""
    from alignkit.models.heads import RewardModel

    policy = tiny_llama("nano", vocab_size=40, seed=4).eval()
    if value_model == "shared":
        head = ppo.ValueHead(64)
        torch.nn.init.normal_(head.proj.weight, std=0.1, generator=torch.Generator().manual_seed(0))
        ac = ppo.ActorCritic(policy, None, head, temperature=0.8)
    else:
        vm = RewardModel.from_model(tiny_llama("nano", vocab_size=40, seed=5), seed=5).eval()
        ac = ppo.ActorCritic(policy, vm, None, temperature=0.8)
    ids, mask, r_ids, r_mask = _batch()
    out = {}
    for chunk in (CHUNK, 0):
        lp, values, ent = ac.token_stats(ids, mask, r_ids, chunk, entropy_grad=True)
        loss = _objective(lp, ent, r_mask) + (values.float() * r_mask).pow(2).sum()
        out[chunk] = (lp * r_mask, values * r_mask, ent * r_mask, torch.autograd.grad(loss, list(ac.parameters())))
    for a, b in zip(out[CHUNK][:3], out[0][:3]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert out[0][1].abs().max() > 1e-3  # the values are not trivially 0
    for a, b in zip(out[CHUNK][3], out[0][3]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    lp, values, ent = ac.token_stats(ids, mask, r_ids, CHUNK, entropy=False)
    assert ent is None


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    from alignkit.models.bpe import train_bpe_tokenizer

    root = tmp_path_factory.mktemp("chunked-rl")
    tok = train_bpe_tokenizer(["Human: What is one plus two?\nAssistant: three . four five six seven"] * 20, vocab_size=300)
    save_model(tiny_llama("nano", tokenizer=tok, seed=0), tok, root / "sft")
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": f"Human: What is {w} plus two?\nAssistant:"}) + "\n"
                                                for w in ("one", "two", "three", "four")))
    (root / "chunk_rewards.py").write_text("def count_e(prompts, responses):\n    return [r.count('e') / 4 for r in responses]\n")
    return root


def test_ppo_iteration_same_metrics_chunked_and_full(tiny_dirs, monkeypatch):
    """Two PPO iterations (shared value head, entropy bonus, 2 epochs of 2 minibatches) with the
    chunked head (7 tokens a chunk) and with full logits: the same rollouts and the same metrics,
    fp32, to 1e-5. The GRPO/RLOO equivalent is in tests/test_grpo.py."""
    monkeypatch.syspath_prepend(str(tiny_dirs))
    rows = {}
    for chunk in (7, 0):
        out = tiny_dirs / f"ppo-{chunk}"
        ppo.run(load_config(ppo.Config, None, [
            f"model.path={tiny_dirs / 'sft'}", f"data.path={tiny_dirs / 'prompts.jsonl'}", f"out={out}",
            "reward.source=function", "reward.function=chunk_rewards:count_e", "iterations=2", "rollout_batch=4",
            "train.batch_size=2", "ppo_epochs=2", "rollout.max_new_tokens=6", "value_model=shared",
            "ent_coef=0.01", "train.lr=1e-3", "train.precision=fp32", f"train.logprob_chunk={chunk}",
        ]))
        rows[chunk] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows[7]) == len(rows[0]) == 2
    for a, b in zip(rows[7], rows[0]):
        for key in ("reward", "kl", "entropy", "policy_loss", "value_loss", "approx_kl", "ratio_mean",
                    "explained_variance", "grad_norm", "response_length"):
            # abs 1e-5: with 2 threads (CI) the float order differs and policy_loss (~0.065)
            # moved by 1.2e-6 between the paths after two updates; 1 thread agrees to 1e-6
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-5), key
    assert rows[0][1]["kl"] != 0.0 and rows[0][0]["entropy"] > 0  # the second rollout saw updated weights
