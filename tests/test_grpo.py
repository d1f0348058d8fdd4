"""GRPO / RLOO: group layout and advantage registry, KL in the reward or in the loss, the
update with and without a separate old-log-prob pass, and tiny end-to-end runs of both stages."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from alignkit.config import load_config
from alignkit.losses.kl import kl_k3
from alignkit.models.load import save_model, tiny_llama
from alignkit.train import grpo, rloo
from alignkit.train.rollout import (
    Rollout,
    gather_logprobs,
    grouped_response_logits,
    pad_left,
    pad_right,
    response_logits,
)


def test_advantage_registry_on_groups_worked_by_hand():
    """G = 3, groups [1, 2, 3] and [5, 5, 5] (contiguous in the flat batch).
    grpo:    mean 2, unbiased std 1 -> [-1, 0, 1];   equal group -> 0
    dr_grpo: no std division        -> [-1, 0, 1];   0
    rloo:    r_i - mean of the others: 1 - 2.5, 2 - 2, 3 - 1.5 = [-1.5, 0, 1.5];   0"""
    r = torch.tensor([1.0, 2, 3, 5, 5, 5])
    expected = {"grpo": [-1, 0, 1, 0, 0, 0], "dr_grpo": [-1, 0, 1, 0, 0, 0], "rloo": [-1.5, 0, 1.5, 0, 0, 0]}
    for name, want in expected.items():
        assert grpo.ADVANTAGES[name](r, 3).tolist() == pytest.approx(want, abs=1e-5), name
    # dr_grpo keeps the scale: doubling the rewards doubles its advantages, grpo's stay put
    assert grpo.ADVANTAGES["dr_grpo"](2 * r, 3)[0].item() == pytest.approx(-2.0)
    assert grpo.ADVANTAGES["grpo"](2 * r, 3)[0].item() == pytest.approx(-1.0, abs=1e-5)


def _rollout(logp, ref, mask, scores, group_size) -> Rollout:
    B, T = mask.shape
    return Rollout(
        prompt_ids=torch.ones(B, 1, dtype=torch.long), prompt_mask=torch.ones(B, 1, dtype=torch.long),
        response_ids=torch.ones(B, T, dtype=torch.long), response_mask=mask, logprobs=logp, ref_logprobs=ref,
        values=None, scores=scores, raw_scores=scores, finished=torch.ones(B, dtype=torch.bool),
        prompts=[""] * B, responses=[""] * B, group_size=group_size,
    )


def test_kl_in_the_reward_is_subtracted_before_the_baseline():
    """beta 0.5, k1, one group of 2: row 0 kl = 0.4 + 0.2 (third token is padding, ignored),
    row 1 kl = 1.0. Rewards: 1 - 0.5 * 0.6 = 0.7 and 1 - 0.5 * 1.0 = 0.5; RLOO: +0.2, -0.2.
    With kl_in = loss the scores pass through unchanged."""
    mask = torch.tensor([[1.0, 1, 0], [1, 0, 0]])
    logp = torch.tensor([[-1.0, -1.0, 7.0], [-1.0, 3.0, 3.0]])
    ref = torch.tensor([[-1.4, -1.2, 0.0], [-2.0, 0.0, 0.0]])
    ro = _rollout(logp, ref, mask, torch.tensor([1.0, 1.0]), 2)
    cfg = grpo.Config(kl_in="reward", kl_coef=0.5, kl_estimator="k1", advantage="rloo")
    seq = grpo.sequence_rewards(ro, cfg)
    assert seq.tolist() == pytest.approx([0.7, 0.5])
    assert grpo.ADVANTAGES["rloo"](seq, 2).tolist() == pytest.approx([0.2, -0.2])
    assert grpo.sequence_rewards(ro, grpo.Config(kl_in="loss", kl_coef=0.5)).tolist() == [1.0, 1.0]
    # reward.ref_logprob_coef 0.5 adds 0.5 x the mean reference log-prob: row 0 (-1.4 - 1.2) / 2 = -1.3
    # -> -0.65, row 1 -2.0 -> -1.0 (the padding token's 0.0 is not counted)
    bonus = dataclasses.replace(cfg, reward=dataclasses.replace(cfg.reward, ref_logprob_coef=0.5))
    assert grpo.sequence_rewards(ro, bonus).tolist() == pytest.approx([0.7 - 0.65, 0.5 - 1.0])
    # with the content-free baseline [-0.4, -0.2] / [-2.5]: row 0 mean(-1.0, -1.0) = -1 -> -0.5,
    # row 1 -2.0 + 2.5 = 0.5 -> +0.25
    ro.ref_baseline_logprobs = torch.tensor([[-0.4, -0.2, 5.0], [-2.5, 5.0, 5.0]])
    assert grpo.sequence_rewards(ro, bonus).tolist() == pytest.approx([0.7 - 0.5, 0.5 + 0.25])


def test_old_logprob_pass_only_when_needed():
    base = grpo.Config(prompts_per_step=2, group_size=4, train=dataclasses.replace(grpo.Config().train, batch_size=8))
    assert not grpo.needs_old_logprobs(base)
    assert grpo.needs_old_logprobs(dataclasses.replace(base, updates_per_rollout=2))
    assert grpo.needs_old_logprobs(dataclasses.replace(base, kl_in="reward"))
    assert grpo.needs_old_logprobs(dataclasses.replace(base, train=dataclasses.replace(base.train, batch_size=4)))


def _batch(policy, seed=0):
    p_ids, p_mask = pad_left([[3, 4], [5], [6, 7, 8], [9]], 0)
    r_ids, r_mask = pad_right([[7, 8, 9], [10], [11, 12], [13, 14]], 0)
    ids, mask = torch.cat([p_ids, r_ids], 1), torch.cat([p_mask, r_mask], 1)
    with torch.no_grad():
        logp = gather_logprobs(response_logits(policy, ids, mask, 3), r_ids) * r_mask
    return Rollout(p_ids, p_mask, r_ids, r_mask.float(), logp, None, None, torch.zeros(4), torch.zeros(4),
                   torch.ones(4, dtype=torch.bool), [""] * 4, [""] * 4, group_size=2)


def _update(cfg, ro, adv, seed=8, lr=0.5):
    policy = tiny_llama("nano", vocab_size=40, seed=seed).eval()
    opt = torch.optim.SGD(policy.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    grpo.grpo_update(policy, ro, adv, cfg, opt, sched, torch.Generator().manual_seed(0))
    return policy


def test_one_update_without_an_old_logprob_pass_equals_one_with_it():
    """With one update on one minibatch, old_logp = logp.detach() (no extra forward) gives the
    same step as old log-probs computed beforehand (kl_in=reward with beta 0 forces that pass)."""
    ro = _batch(tiny_llama("nano", vocab_size=40, seed=8).eval())
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    train = dataclasses.replace(grpo.Config().train, batch_size=4, max_grad_norm=0.0)
    lazy = grpo.Config(prompts_per_step=2, group_size=2, kl_coef=0.0, kl_in="loss", train=train)
    eager = dataclasses.replace(lazy, kl_in="reward")
    assert not grpo.needs_old_logprobs(lazy) and grpo.needs_old_logprobs(eager)
    a, b = _update(lazy, ro, adv), _update(eager, ro, adv)
    moved = [(pa - pb).abs().max().item() for pa, pb in zip(a.parameters(), b.parameters())]
    assert max(moved) < 1e-6
    start = tiny_llama("nano", vocab_size=40, seed=8)
    assert max((pa - p0).abs().max().item() for pa, p0 in zip(a.parameters(), start.parameters())) > 1e-4


def test_kl_in_the_loss_pulls_the_policy_toward_the_reference():
    """Zero advantages leave only beta * k3(pi, pi_ref) in the loss: one step must lower it."""
    ref_model = tiny_llama("nano", vocab_size=40, seed=9).eval()
    ro = _batch(tiny_llama("nano", vocab_size=40, seed=8).eval())
    ids, mask = ro.input_ids, ro.attention_mask
    with torch.no_grad():
        ro.ref_logprobs = gather_logprobs(response_logits(ref_model, ids, mask, 3), ro.response_ids) * ro.response_mask
    train = dataclasses.replace(grpo.Config().train, batch_size=4, max_grad_norm=0.0)
    cfg = grpo.Config(prompts_per_step=2, group_size=2, kl_coef=1.0, kl_in="loss", train=train)

    def k3(policy):
        with torch.no_grad():
            lp = gather_logprobs(response_logits(policy, ids, mask, 3), ro.response_ids)
        m = ro.response_mask
        return (kl_k3(lp, ro.ref_logprobs) * m).sum() / m.sum()

    before = k3(tiny_llama("nano", vocab_size=40, seed=8).eval())
    after = k3(_update(cfg, ro, torch.zeros(4), lr=0.05))
    assert after < before - 1e-4


# ------------------------------------------------------------------ shared prompt prefix
def _grouped_batch():
    """3 prompts of lengths 3, 1, 2 (left-padded to P = 3), each twice, rows interleaved (the
    grouped path must not rely on contiguous groups); responses of lengths 4, 1, 2, 3, 2, 1
    (right-padded to T = 4)."""
    prompts = [[3, 4, 5], [6], [7, 8], [3, 4, 5], [7, 8], [6]]
    responses = [[9, 10, 11, 12], [13], [14, 15], [16, 17, 18], [19, 20], [21]]
    p_ids, p_mask = pad_left(prompts, 0)
    r_ids, r_mask = pad_right(responses, 0)
    return p_ids, p_mask, r_ids, r_mask


def _token_counter(model):
    """Shapes of every input_ids batch the embedding sees, to count the tokens through the model."""
    shapes = []
    core = model.get_base_model() if hasattr(model, "get_base_model") else model
    core.model.embed_tokens.register_forward_hook(lambda mod, inp, out: shapes.append(tuple(inp[0].shape)))
    return shapes


def _full_and_grouped(model, temperature=0.7):
    p_ids, p_mask, r_ids, r_mask = _grouped_batch()
    T = r_ids.shape[1]
    full = gather_logprobs(response_logits(model, torch.cat([p_ids, r_ids], 1), torch.cat([p_mask, r_mask], 1),
                                           T, temperature), r_ids)
    grouped = gather_logprobs(grouped_response_logits(model, p_ids, p_mask, r_ids, r_mask, temperature), r_ids)
    return full, grouped, r_mask.float()


def test_grouped_response_logprobs_and_gradients_equal_full_rows():
    """Each distinct prompt runs once, its KV cache gathered to its rows, then only the response
    tokens: log-probs equal the full-row forward (fp32, 1e-5) on every response token, and so do
    the parameter gradients of a weighted sum of them (the prompt positions get the summed
    gradient of their rows). Tokens through the model: 3 prompts x P 3 + 6 rows x (T - 1) 3 = 27,
    against 6 x (3 + 4) = 42 for full rows."""
    model = tiny_llama("nano", vocab_size=40, seed=3).eval()
    weights = torch.linspace(-1.0, 2.0, 24).view(6, 4)
    grads = []
    for path in (0, 1):
        model.zero_grad()
        full, grouped, mask = _full_and_grouped(model)
        ((full, grouped)[path] * mask * weights).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert (full - grouped).mul(mask).abs().max().item() < 1e-5
    assert full[mask.bool()].abs().min() > 0.1 and max(g.abs().max().item() for g in grads[0]) > 1e-3
    assert max((a - b).abs().max().item() for a, b in zip(*grads)) < 1e-5

    shapes = _token_counter(model)
    with torch.no_grad():
        _full_and_grouped(model)
    assert shapes == [(6, 7), (3, 3), (6, 3)]  # full rows, then prefill of the 3 prompts + 3 response tokens


def test_grouped_logits_without_repeats_and_with_one_response_token():
    """No repeated prompt: one plain forward of the full rows. T = 1: the prefill alone (the
    prompt's last position predicts the only token)."""
    model = tiny_llama("nano", vocab_size=40, seed=3).eval()
    shapes = _token_counter(model)
    p_ids, p_mask = pad_left([[3, 4], [5], [6, 7, 8]], 0)
    r_ids, r_mask = pad_right([[9, 10], [11], [12, 13]], 0)
    with torch.no_grad():
        a = grouped_response_logits(model, p_ids, p_mask, r_ids, r_mask)
        b = response_logits(model, torch.cat([p_ids, r_ids], 1), torch.cat([p_mask, r_mask], 1), 2)
    assert torch.equal(a, b) and shapes == [(3, 5), (3, 5)]

    shapes.clear()
    p_ids, p_mask = pad_left([[3, 4], [3, 4], [5]], 0)
    r_ids, r_mask = pad_right([[9], [10], [11]], 0)
    with torch.no_grad():
        a = grouped_response_logits(model, p_ids, p_mask, r_ids, r_mask)
        b = response_logits(model, torch.cat([p_ids, r_ids], 1), torch.cat([p_mask, r_mask], 1), 1)
    assert shapes == [(2, 2), (3, 3)] and (a - b).abs().max().item() < 1e-5


def test_grouped_logits_through_a_lora_policy_and_its_adapter_free_reference():
    """The peft wrapper passes the cache through: with the adapter (random B, so it changes the
    output) and with it disabled (GRPO's LoRA reference), grouped equals full rows."""
    from alignkit.config import ModelConfig
    from alignkit.models.load import apply_lora

    policy = apply_lora(tiny_llama("nano", vocab_size=40, seed=3), ModelConfig(lora_r=4, lora_alpha=8)).eval()
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
        full, grouped, mask = _full_and_grouped(policy)
        with policy.disable_adapter():
            ref_full, ref_grouped, _ = _full_and_grouped(policy)
    assert (full - ref_full).mul(mask).abs().max() > 1e-3  # the adapter matters
    assert (full - grouped).mul(mask).abs().max() < 1e-5
    assert (ref_full - ref_grouped).mul(mask).abs().max() < 1e-5


def test_generation_prefills_each_distinct_prompt_once():
    """HFGenerator with share_prefix: a batch of 2 prompts x 3 copies is prefilled as 2 rows and
    samples the same tokens as prefilling all 6 (same seed), greedy and sampled."""
    from alignkit.models.generate import HFGenerator, SamplingParams

    model = tiny_llama("nano", vocab_size=40, seed=3).eval()
    shapes = _token_counter(model)
    prompts = [[3, 4, 5]] * 3 + [[6, 7]] * 3
    for params in (SamplingParams(max_new_tokens=6, seed=5, stop_at_eos=False), SamplingParams(max_new_tokens=6, greedy=True)):
        shapes.clear()
        shared = HFGenerator(model, batch_size=8).generate(prompts, params)
        assert shapes[0] == (2, 3) and shapes[1:] == [(6, 1)] * 5
        plain = HFGenerator(model, batch_size=8, share_prefix=False).generate(prompts, params)
        assert shapes[6] == (6, 3)
        assert list(shared) == list(plain) and all(len(r) == 6 for r in shared)


# ------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    from alignkit.models.bpe import train_bpe_tokenizer

    root = tmp_path_factory.mktemp("grpo")
    tok = train_bpe_tokenizer(["Human: What is one plus two?\nAssistant: three . four five six seven"] * 20, vocab_size=300)
    save_model(tiny_llama("nano", tokenizer=tok, seed=0), tok, root / "sft")
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": f"Human: What is {w} plus two?\nAssistant:"}) + "\n"
                                                for w in ("one", "two", "three", "four")))
    (root / "grpo_rewards.py").write_text("def count_e(prompts, responses):\n    return [r.count('e') / 4 for r in responses]\n")
    return root


@pytest.mark.parametrize("stage", [grpo, rloo])
def test_stage_runs_end_to_end(tiny_dirs, monkeypatch, stage):
    monkeypatch.syspath_prepend(str(tiny_dirs))
    out = tiny_dirs / stage.__name__.rsplit(".", 1)[1]
    cfg = load_config(stage.Config, None, [
        f"model.path={tiny_dirs / 'sft'}", f"data.path={tiny_dirs / 'prompts.jsonl'}", f"out={out}",
        "reward.source=function", "reward.function=grpo_rewards:count_e", "iterations=2", "prompts_per_step=2",
        "group_size=3", "rollout.max_new_tokens=5", "train.batch_size=6", "train.lr=1e-3",
    ])
    assert cfg.advantage == ("rloo" if stage is rloo else "grpo")
    assert cfg.kl_in == ("reward" if stage is rloo else "loss")
    result = stage.run(cfg)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("reward", "kl", "kl_k3", "entropy", "clipfrac", "approx_kl", "response_length", "reward_std_in_group"):
        assert all(math.isfinite(r[key]) for r in rows), key
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-5) and rows[0]["approx_kl"] == pytest.approx(0.0, abs=1e-6)
    assert result["advantage"] == cfg.advantage and (out / "final" / "config.json").is_file()


@pytest.mark.parametrize("stage", [grpo, rloo])
def test_sharing_the_prompt_prefix_and_chunking_give_the_same_first_step(tiny_dirs, monkeypatch, stage):
    """share_prompt_prefix on and off, chunked LM head (train.logprob_chunk 7: several chunks per
    pass) and full logits (0): the same rollout (the generator and seed do not depend on either),
    hence the same metrics of the first step, through the reference pass and the update (and the
    old-log-prob pass, which RLOO's kl_in=reward needs). Only the sharing runs go through the
    grouped forward: `grouped_response_logits` with full logits, `chunked._grouped_hidden` chunked."""
    from alignkit.models import chunked
    from alignkit.train import rollout

    monkeypatch.syspath_prepend(str(tiny_dirs))
    calls = []

    def spy(fn):
        def wrapped(*args, **kwargs):
            calls.append((fn.__name__, args[1].shape[0]))
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(rollout, "grouped_response_logits", spy(grouped_response_logits))
    monkeypatch.setattr(chunked, "_grouped_hidden", spy(chunked._grouped_hidden))
    rows = {}
    for share in (True, False):
        for chunk in (7, 0):
            out = tiny_dirs / f"share-{stage.__name__.rsplit('.', 1)[1]}-{share}-{chunk}"
            cfg = load_config(stage.Config, None, [
                f"model.path={tiny_dirs / 'sft'}", f"data.path={tiny_dirs / 'prompts.jsonl'}", f"out={out}",
                "reward.source=function", "reward.function=grpo_rewards:count_e", "iterations=1", "prompts_per_step=2",
                "group_size=3", "rollout.max_new_tokens=5", "train.batch_size=6", "train.lr=1e-3",
                "train.precision=fp32",  # the paths agree to 1e-5 in fp32; bf16 (a GPU) rounds them apart
                f"share_prompt_prefix={str(share).lower()}", f"train.logprob_chunk={chunk}",
            ])
            stage.run(cfg)
            rows[share, chunk] = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
            name = "_grouped_hidden" if chunk else "grouped_response_logits"
            # reference + update, plus the old log-probs when the KL is in the reward
            assert calls == ([(name, 6)] * (3 if cfg.kl_in == "reward" else 2) if share else [])
            calls.clear()
    for key in ("reward", "kl", "kl_k3", "loss", "entropy", "approx_kl", "grad_norm", "response_length"):
        for run in rows:
            assert rows[run][key] == pytest.approx(rows[True, 0][key], rel=1e-5, abs=1e-6), (key, run)
    assert rows[True, 7]["grad_norm"] > 0 and rows[True, 7]["entropy"] > 0


def test_group_size_one_is_a_config_error(tiny_dirs):
    from alignkit.config import ConfigError

    cfg = load_config(grpo.Config, None, [f"model.path={tiny_dirs / 'sft'}", f"data.path={tiny_dirs / 'prompts.jsonl'}",
                                          "group_size=1"])
    with pytest.raises(ConfigError, match="group_size"):
        grpo.run(cfg)


@pytest.mark.parametrize("share", [True, False])
@pytest.mark.parametrize("stage", [grpo, rloo])
def test_bf16_rollout_passes_round_like_the_update(tiny_dirs, monkeypatch, stage, share):
    """Under bf16 autocast (a GPU's default; forced here on the CPU) the reference and old-log-prob
    passes run under the update's autocast, so before the first step the policy equals its
    reference to within bf16 noise: the KL is ~0, not the fp32-vs-bf16 rounding gap."""
    monkeypatch.syspath_prepend(str(tiny_dirs))
    out = tiny_dirs / f"bf16-{stage.__name__.rsplit('.', 1)[1]}-{share}"
    cfg = load_config(stage.Config, None, [
        f"model.path={tiny_dirs / 'sft'}", f"data.path={tiny_dirs / 'prompts.jsonl'}", f"out={out}",
        "reward.source=function", "reward.function=grpo_rewards:count_e", "iterations=1", "prompts_per_step=2",
        "group_size=3", "rollout.max_new_tokens=5", "train.batch_size=6", "train.lr=1e-3", "train.precision=bf16",
        f"share_prompt_prefix={str(share).lower()}",
    ])
    stage.run(cfg)
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert row["kl"] == pytest.approx(0.0, abs=1e-6) and row["approx_kl"] == pytest.approx(0.0, abs=1e-6)
