"""PPO-RLHF: rollout layout and EOS handling, reward sources, the KL-penalised reward, value
heads, one PPO update, the adaptive KL coefficient, and a tiny end-to-end run."""

from __future__ import annotations

import dataclasses
import json
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import LlamaConfig

from alignkit.config import ConfigError, load_config
from alignkit.losses.kl import AdaptiveKLController
from alignkit.models.heads import RewardModel, RewardStats
from alignkit.models.load import save_model, tiny_llama
from alignkit.train import ppo
from alignkit.train.rollout import (
    FunctionSource,
    RewardConfig,
    RewardModelSource,
    Rollout,
    RolloutConfig,
    baseline_prompt_ids,
    build_reward_source,
    collect_rollout,
    combine_ensemble,
    content_free_prompt,
    gold_comparison,
    pad_left,
    pad_right,
    prompt_batches,
    ref_logprob_bonus,
    response_logprobs,
)

# ------------------------------------------------------------------ a scripted language model
PAD, EOS = 0, 1
NEXT = {0: 2, 1: 2, 2: 3, 3: 4, 4: 5, 5: EOS, 6: 7, 7: 6}
"""Token k is always followed by NEXT[k]: 2 -> 3 -> 4 -> 5 -> EOS, while 6 <-> 7 never ends."""


class ScriptedLM(nn.Module):
    """Puts logit 50 on NEXT[last token] at every position (other logits 0), so sampling at
    temperature 1 is deterministic and the log-prob of the scripted token is ~0 while any
    other token's is ~-50: a log-prob read at the wrong position shows up at once."""

    def __init__(self):
        super().__init__()
        self.config = LlamaConfig(vocab_size=8, hidden_size=8, num_hidden_layers=1, num_attention_heads=1,
                                  intermediate_size=8, eos_token_id=EOS, pad_token_id=PAD)
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, use_cache=None,
                logits_to_keep=0, **kwargs):
        table = torch.tensor([NEXT[i] for i in range(8)])
        logits = torch.nn.functional.one_hot(table[input_ids], 8).float() * 50.0 + self.dummy
        if logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        return SimpleNamespace(logits=logits)


class LetterTokenizer:
    eos_token_id, pad_token_id = EOS, PAD

    def decode(self, ids, skip_special_tokens=True):
        return "".join("abcdefgh"[i] for i in ids if i not in (PAD, EOS))


def _lp(model):
    return lambda ids, mask, r_ids: (response_logprobs(model, ids, mask, r_ids), None)


def test_rollout_layout_masks_and_eos():
    """Prompts [2,3], [6], [4] with max_new_tokens=3 give responses
        [4,5,EOS] (finished), [7,6,7] (never ends: cut, unfinished), [5,EOS] (finished, 2 tokens)
    so T = 3; prompts are left-padded to P = 2, responses right-padded. Scores are the decoded
    length ('ef' 2, 'hgh' 3, 'f' 1) minus the missing-EOS penalty 0.5 on the unfinished row."""
    lm, tok = ScriptedLM(), LetterTokenizer()
    source = FunctionSource(lambda p, r: [float(len(x)) for x in r])
    ro = collect_rollout(lm, tok, [[2, 3], [6], [4]], ["p0", "p1", "p2"], source,
                         RolloutConfig(max_new_tokens=3), logprob_fn=_lp(lm), missing_eos_penalty=0.5, seed=0)
    assert ro.prompt_ids.tolist() == [[2, 3], [PAD, 6], [PAD, 4]]
    assert ro.prompt_mask.tolist() == [[1, 1], [0, 1], [0, 1]]
    assert ro.response_ids.tolist() == [[4, 5, EOS], [7, 6, 7], [5, EOS, PAD]]
    assert ro.response_mask.tolist() == [[1, 1, 1], [1, 1, 1], [1, 1, 0]]
    assert ro.finished.tolist() == [True, False, True]
    assert ro.responses == ["ef", "hgh", "f"]
    assert ro.raw_scores.tolist() == [2.0, 3.0, 1.0]
    assert ro.scores.tolist() == [2.0, 2.5, 1.0]
    # the scripted token's log-prob is ~0 at every valid position, exactly 0 on padding
    assert ro.logprobs.abs().max() < 1e-6
    assert ro.attention_mask.tolist() == [[1, 1, 1, 1, 1], [0, 1, 1, 1, 1], [0, 1, 1, 1, 0]]
    assert ro.response_length.tolist() == [3, 3, 2]


def test_rollout_groups_are_contiguous():
    lm, tok = ScriptedLM(), LetterTokenizer()
    source = FunctionSource(lambda p, r: [float(len(x)) for x in r])
    ro = collect_rollout(lm, tok, [[2, 3], [4]], ["a", "b"], source, RolloutConfig(max_new_tokens=4),
                         logprob_fn=None, group_size=3)
    assert ro.prompts == ["a", "a", "a", "b", "b", "b"]
    assert ro.prompt_ids.tolist() == [[2, 3]] * 3 + [[PAD, 4]] * 3
    assert ro.group_size == 3 and len(ro) == 6
    assert torch.equal(ro.logprobs, torch.zeros(6, 3))  # no log-prob pass was asked for


def test_response_logprobs_match_unpadded_naive_reference():
    """Batched log-probs with left-padded prompts and right-padded responses equal a plain
    per-row computation without padding: log softmax(logits[len(prompt) - 1 + t])[response[t]]."""
    model = tiny_llama("nano", vocab_size=40, seed=1).eval()
    prompts = [[5, 6, 7, 8], [9], [10, 11]]
    responses = [[12, 13], [14, 15, 16, 17], [18]]
    p_ids, p_mask = pad_left(prompts, 0)
    r_ids, r_mask = pad_right(responses, 0)
    with torch.no_grad():
        lp = response_logprobs(model, torch.cat([p_ids, r_ids], 1), torch.cat([p_mask, r_mask], 1), r_ids)
        for b, (p, r) in enumerate(zip(prompts, responses)):
            logits = model(torch.tensor([p + r])).logits[0].log_softmax(-1)
            naive = [logits[len(p) - 1 + t, tok].item() for t, tok in enumerate(r)]
            assert lp[b, : len(r)].tolist() == pytest.approx(naive, abs=1e-5)


def test_prompt_batches_cover_every_prompt_each_epoch():
    it = prompt_batches(5, 2, seed=0)
    first = [next(it) for _ in range(5)]  # 10 indices = two epochs of 5
    flat = [i for b in first for i in b]
    assert sorted(flat[:5]) == list(range(5)) and sorted(flat[5:]) == list(range(5))


# ------------------------------------------------------------------ reward sources
def test_reward_from_module_function(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def length(prompts, responses):\n    return [len(r) - len(p) for p, r in zip(prompts, responses)]\n"
        "def short(prompts, responses):\n    return [1.0]\n"
        "def nan(prompts, responses):\n    return [float('nan')] * len(responses)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    source = build_reward_source(RewardConfig(source="function", function="my_rewards:length"))
    scores, raw = source(["ab", "c"], ["abcd", "c"], None, None)
    assert scores.tolist() == [2.0, 0.0] and raw.tolist() == [2.0, 0.0]
    clipped = build_reward_source(RewardConfig(source="function", function="my_rewards:length", clip=1.0))
    assert clipped(["ab", "c"], ["abcd", "c"], None, None)[0].tolist() == [1.0, 0.0]
    with pytest.raises(ValueError, match="returned 1 scores for 2"):
        build_reward_source(RewardConfig(source="function", function="my_rewards:short"))(["a", "b"], ["x", "y"], None, None)
    with pytest.raises(ValueError, match="finite"):
        build_reward_source(RewardConfig(source="function", function="my_rewards:nan"))(["a"], ["x"], None, None)
    with pytest.raises(ValueError, match="module:function"):
        build_reward_source(RewardConfig(source="function", function="my_rewards"))
    with pytest.raises(ValueError, match="no attribute"):
        build_reward_source(RewardConfig(source="function", function="my_rewards:missing"))
    with pytest.raises(ValueError, match="needs world"):
        build_reward_source(RewardConfig(source="gold"))


def test_reward_model_source_normalises_with_stored_stats_and_clips():
    rm = RewardModel.from_model(tiny_llama("nano", vocab_size=40, seed=2), seed=2).eval()
    ids = torch.tensor([[0, 5, 6, 7], [8, 9, 10, 11]])
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    with torch.no_grad():
        raw = rm(ids, mask)
    rm.stats = RewardStats(mean=float(raw.mean()), std=float((raw[0] - raw[1]).abs()) / 4, n=2)
    scores, got_raw = RewardModelSource(rm, normalize=True)(None, None, ids, mask)
    assert got_raw.tolist() == pytest.approx(raw.tolist())
    # the two raw rewards sit at mean -/+ half their gap = mean -/+ 2 std
    assert sorted(scores.tolist()) == pytest.approx([-2.0, 2.0], abs=1e-4)
    clipped, _ = RewardModelSource(rm, normalize=True, clip=1.5)(None, None, ids, mask)
    assert sorted(clipped.tolist()) == pytest.approx([-1.5, 1.5])
    rm.stats = None
    with pytest.raises(ValueError, match="reward_stats"):
        RewardModelSource(rm, normalize=True)


def test_combine_ensemble_by_hand():
    scores = torch.tensor([[1.0, 2.0], [3.0, 0.0]])  # 2 members x 2 responses
    assert combine_ensemble(scores, "mean").tolist() == [2.0, 1.0]
    assert combine_ensemble(scores, "min").tolist() == [1.0, 0.0]
    # members' population std is 1 for both responses
    assert combine_ensemble(scores, "uwo", coef=0.5).tolist() == [1.5, 0.5]
    one = torch.tensor([[0.3, -1.2]])
    for mode in ("mean", "min", "uwo"):
        assert torch.equal(combine_ensemble(one, mode, coef=2.0), one[0])
    with pytest.raises(ValueError, match="ensemble mode"):
        combine_ensemble(scores, "max")


def test_reward_model_ensemble_normalises_each_member_then_combines():
    ids = torch.tensor([[0, 5, 6, 7], [8, 9, 10, 11]])
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    members, normalised = [], []
    for seed, (mean, std) in zip((2, 3, 4), ((0.0, 1.0), (0.5, 2.0), (-1.0, 0.25))):
        rm = RewardModel.from_model(tiny_llama("nano", vocab_size=40, seed=seed), seed=seed).eval()
        rm.stats = RewardStats(mean=mean, std=std, n=2)
        with torch.no_grad():
            normalised.append((rm(ids, mask) - mean) / std)
        members.append(rm)
    want = torch.stack(normalised)
    for mode, expect in (("mean", want.mean(0)), ("min", want.min(0).values),
                         ("uwo", want.mean(0) - 0.7 * want.std(0, unbiased=False))):
        got, _ = RewardModelSource(members[0], ensemble=members[1:], mode=mode, coef=0.7)(None, None, ids, mask)
        assert got.tolist() == pytest.approx(expect.tolist(), abs=1e-5)
    single, _ = RewardModelSource(members[0])(None, None, ids, mask)
    alone, _ = RewardModelSource(members[0], mode="uwo", coef=3.0)(None, None, ids, mask)
    assert torch.equal(single, alone)
    members[2].stats = None
    with pytest.raises(ValueError, match="ensemble member 2"):
        RewardModelSource(members[0], ensemble=members[1:])
    with pytest.raises(ConfigError, match="reward.ensemble"):
        RewardConfig(source="gold", ensemble=("a",))
    with pytest.raises(ConfigError, match="ensemble_mode"):
        RewardConfig(ensemble_mode="max")
    with pytest.raises(ConfigError, match="normalize=true"):
        RewardConfig(model="/a", ensemble=("/b",), normalize=False)
    with pytest.raises(ConfigError, match="twice"):
        RewardConfig(model="/a", ensemble=("/b", "/a"))


def test_gold_comparison_counts_ties_half():
    world = SimpleNamespace(judge=lambda p, r: SimpleNamespace(total={"good": 1.0, "ok": 0.5, "bad": 0.0}[r]))
    out = gold_comparison(world, ["q"] * 4, ["good", "ok", "bad", "ok"], ["bad", "ok", "good", "bad"])
    assert (out["wins"], out["ties"], out["losses"]) == (2, 1, 1)
    assert out["win_rate"] == pytest.approx((2 + 0.5) / 4)
    assert out["gold"] == pytest.approx(2.0 / 4) and out["gold_ref"] == pytest.approx(1.5 / 4)


# ------------------------------------------------------------------ rewards, advantages
def _rollout(logp, ref, mask, scores, values=None) -> Rollout:
    B, T = mask.shape
    return Rollout(
        prompt_ids=torch.ones(B, 1, dtype=torch.long), prompt_mask=torch.ones(B, 1, dtype=torch.long),
        response_ids=torch.ones(B, T, dtype=torch.long), response_mask=mask, logprobs=logp, ref_logprobs=ref,
        values=torch.zeros(B, T) if values is None else values, scores=scores, raw_scores=scores,
        finished=torch.ones(B, dtype=torch.bool), prompts=[""] * B, responses=[""] * B,
    )


def test_kl_penalised_reward_layout_and_gae():
    """beta = 0.1, k1: kl_t = logp_t - ref_t.
        row 0 (3 tokens): kl = [0.5, 0, -1]  -> rewards [-0.05, 0, +0.1 + score 1] = [-0.05, 0, 1.1]
        row 1 (1 token, then padding holding garbage 9s): kl = [0.5] -> [-0.05 + 2, 0, 0]
    With V = 0, gamma = lam = 1 the advantages are reverse cumulative sums:
        row 0: [1.05, 1.1, 1.1], row 1: [1.95, 0, 0]; returns equal them."""
    mask = torch.tensor([[1.0, 1, 1], [1, 0, 0]])
    logp = torch.tensor([[-1.0, -2, -3], [-0.5, 9, 9]])
    ref = torch.tensor([[-1.5, -2, -2], [-1.0, 9, 9]])
    cfg = ppo.Config(gamma=1.0, lam=1.0, whiten_advantages=False, kl_estimator="k1")
    batch, rewards, kl = ppo.make_batch(_rollout(logp, ref, mask, torch.tensor([1.0, 2.0])), 0.1, cfg)
    def close(x, expected):
        return torch.allclose(x, torch.tensor(expected), atol=1e-6)

    assert close(kl, [[0.5, 0, -1], [0.5, 0, 0]])
    assert close(rewards, [[-0.05, 0, 1.1], [1.95, 0, 0]])
    assert close(batch.advantages, [[1.05, 1.1, 1.1], [1.95, 0, 0]])
    assert close(batch.returns, [[1.05, 1.1, 1.1], [1.95, 0, 0]])
    # k3 = exp(ref - logp) - (ref - logp) - 1: for row 0 token 0, exp(-0.5) + 0.5 - 1
    _, _, kl3 = ppo.make_batch(_rollout(logp, ref, mask, torch.tensor([1.0, 2.0])), 0.1,
                               ppo.Config(kl_estimator="k3"))
    assert kl3[0, 0].item() == pytest.approx(math.exp(-0.5) - 0.5)
    # whitening: valid advantages get mean 0 and (unbiased) std 1
    wb, _, _ = ppo.make_batch(_rollout(logp, ref, mask, torch.tensor([1.0, 2.0])), 0.1, ppo.Config(gamma=1.0, lam=1.0))
    valid = wb.advantages[mask.bool()]
    assert valid.mean().item() == pytest.approx(0.0, abs=1e-6) and valid.std().item() == pytest.approx(1.0, abs=1e-4)



def test_ref_logprob_bonus_lands_on_the_last_token_of_each_response():
    """reward.ref_logprob_coef = 2: the bonus is 2 x the reference's mean log-prob over the response
    tokens, added to the score on the last token. Row 0 ref [-1.5, -2, -2.5] (mean -2) -> -4;
    row 1 ref [-1.0] (padding ignored) -> -2. Every other per-token reward and the KL are unchanged;
    ro.scores (what the monitor reads) is not touched."""
    mask = torch.tensor([[1.0, 1, 1], [1, 0, 0]])
    logp = torch.tensor([[-1.0, -2, -3], [-0.5, 9, 9]])
    ref = torch.tensor([[-1.5, -2, -2.5], [-1.0, 9, 9]])
    ro = _rollout(logp, ref, mask, torch.tensor([1.0, 2.0]))
    plain = ppo.Config(gamma=1.0, lam=1.0, whiten_advantages=False, kl_estimator="k1")
    bonus = dataclasses.replace(plain, reward=dataclasses.replace(plain.reward, ref_logprob_coef=2.0))
    _, r0, kl0 = ppo.make_batch(ro, 0.1, plain)
    _, r1, kl1 = ppo.make_batch(ro, 0.1, bonus)
    assert torch.allclose(r1 - r0, torch.tensor([[0.0, 0, -4], [-2, 0, 0]]), atol=1e-6)
    assert torch.equal(kl0, kl1) and ro.scores.tolist() == [1.0, 2.0]
    empty = _rollout(logp, ref, torch.zeros(2, 3), torch.tensor([1.0, 2.0]))
    assert ref_logprob_bonus(empty, 2.0).tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match="ref_logprob_coef"):
        ref_logprob_bonus(_rollout(logp, None, mask, torch.tensor([1.0, 2.0])), 2.0)


def test_ref_surprise_penalty_counts_tokens_below_the_probability():
    """reward.ref_surprise_coef = 0.5 at prob 0.01 (log 0.01 = -4.605): row 0's reference
    log-probs [-1, -5, -4.6] hold one token below it -> -0.5; row 1's [-6, pad -9, pad -9] one
    real token below (padding ignored) -> -0.5; with prob 0.1 (log -2.303) row 0 counts two ->
    -1.0. It lands on the last token like the bonus and adds to it; the KL is unchanged."""
    from alignkit.train.rollout import ref_surprise_penalty

    mask = torch.tensor([[1.0, 1, 1], [1, 0, 0]])
    logp = torch.tensor([[-1.0, -2, -3], [-0.5, 9, 9]])
    ref = torch.tensor([[-1.0, -5, -4.6], [-6.0, -9, -9]])
    ro = _rollout(logp, ref, mask, torch.tensor([1.0, 2.0]))
    assert ref_surprise_penalty(ro, 0.5, 0.01).tolist() == pytest.approx([-0.5, -0.5])
    assert ref_surprise_penalty(ro, 0.5, 0.1).tolist() == pytest.approx([-1.0, -0.5])
    assert ref_surprise_penalty(ro, 0.0, 0.01).tolist() == [0.0, 0.0]
    plain = ppo.Config(gamma=1.0, lam=1.0, whiten_advantages=False, kl_estimator="k1")
    both = dataclasses.replace(plain, reward=dataclasses.replace(plain.reward, ref_surprise_coef=0.5,
                                                                 ref_logprob_coef=1.0))
    _, r0, kl0 = ppo.make_batch(ro, 0.1, plain)
    _, r1, kl1 = ppo.make_batch(ro, 0.1, both)
    bonus = ref_logprob_bonus(ro, 1.0)  # [-3.533, -6]
    assert torch.allclose(r1 - r0, torch.tensor([[0.0, 0, bonus[0] - 0.5], [bonus[1] - 0.5, 0, 0]]), atol=1e-6)
    assert torch.equal(kl0, kl1)
    with pytest.raises(ValueError, match="ref_surprise_coef"):
        ref_surprise_penalty(_rollout(logp, None, mask, torch.tensor([1.0, 2.0])), 0.5, 0.01)


def test_ref_logprob_bonus_minus_the_content_free_baseline():
    """reward.ref_logprob_baseline: the feature is the mean of ref - baseline. Row 0: ref
    [-1.5, -2, -2.5] - base [-0.5, -1, -1.5] = [-1, -1, -1] -> 2 x -1 = -2; row 1: -1.0 - (-3.0) = 2
    -> +4 (padding's 9s ignored): an answer likelier behind its question than behind none earns."""
    mask = torch.tensor([[1.0, 1, 1], [1, 0, 0]])
    logp = torch.tensor([[-1.0, -2, -3], [-0.5, 9, 9]])
    ro = _rollout(logp, torch.tensor([[-1.5, -2, -2.5], [-1.0, 9, 9]]), mask, torch.tensor([1.0, 2.0]))
    ro.ref_baseline_logprobs = torch.tensor([[-0.5, -1, -1.5], [-3.0, 9, 9]])
    assert ref_logprob_bonus(ro, 2.0).tolist() == pytest.approx([-2.0, 4.0])
    plain = ppo.Config(gamma=1.0, lam=1.0, whiten_advantages=False, kl_estimator="k1")
    bonus = dataclasses.replace(plain, reward=dataclasses.replace(plain.reward, ref_logprob_coef=2.0,
                                                                  ref_logprob_baseline="empty_prompt"))
    _, r0, kl0 = ppo.make_batch(ro, 0.1, plain)
    _, r1, kl1 = ppo.make_batch(ro, 0.1, bonus)
    assert torch.allclose(r1 - r0, torch.tensor([[0.0, 0, -2], [4, 0, 0]]), atol=1e-6) and torch.equal(kl0, kl1)
    with pytest.raises(ConfigError, match="ref_logprob_coef > 0"):
        RewardConfig(ref_logprob_baseline="empty_prompt")
    with pytest.raises(ConfigError, match="reward.ref_logprob_baseline"):
        RewardConfig(ref_logprob_coef=1.0, ref_logprob_baseline="question")


def test_content_free_prompt_empties_the_last_human_turn_only():
    assert content_free_prompt("Human: What is 16 minus 9?\nAssistant:") == "Human: \nAssistant:"
    assert (content_free_prompt("\n\nHuman: hi\n\nAssistant: hello\n\nHuman: What is 2 plus 2?\n\nAssistant:")
            == "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: \n\nAssistant:")
    assert content_free_prompt("Human:\nAssistant:") == "Human:\nAssistant:"
    with pytest.raises(ValueError, match="Human:"):
        content_free_prompt("<|im_start|>user\nWhat is 2 plus 2?<|im_end|>")
    with pytest.raises(ValueError, match="Assistant:"):
        content_free_prompt("Human: no answer marker")


class _IdTokenizer:
    """Decodes any id (tiny_llama samples all of its vocabulary); encodes nothing."""

    eos_token_id, pad_token_id = EOS, PAD

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(i) for i in ids if i not in (PAD, EOS))


def test_rollout_baseline_logprobs_are_the_reference_behind_the_content_free_prompt():
    """ref_baseline_logprobs[r, t] = log softmax(ref(baseline + response)[len(baseline) - 1 + t])[response[t]],
    computed per row without padding; rows of one prompt's group share its baseline, and the
    sampled tokens, the policy's and the reference's log-probs are those of a rollout without it."""
    policy = tiny_llama("nano", vocab_size=40, seed=1).eval()
    ref = tiny_llama("nano", vocab_size=40, seed=2).eval()
    source = FunctionSource(lambda p, r: [0.0] * len(r))
    def ref_fn(ids, mask, r_ids):
        return response_logprobs(ref, ids, mask, r_ids)

    kw = dict(logprob_fn=_lp(policy), ref_logprob_fn=ref_fn, group_size=2, seed=3)
    prompts, baselines = [[5, 6, 7], [8]], [[5, 9], [10, 11, 12]]
    plain = collect_rollout(policy, _IdTokenizer(), prompts, ["a", "b"], source, RolloutConfig(max_new_tokens=4), **kw)
    ro = collect_rollout(policy, _IdTokenizer(), prompts, ["a", "b"], source, RolloutConfig(max_new_tokens=4),
                         baseline_ids=baselines, **kw)
    assert plain.ref_baseline_logprobs is None
    assert torch.equal(ro.response_ids, plain.response_ids) and torch.equal(ro.ref_logprobs, plain.ref_logprobs)
    for r in range(4):
        n = int(ro.response_mask[r].sum())
        resp, base = ro.response_ids[r, :n].tolist(), baselines[r // 2]
        logits = ref(torch.tensor([base + resp])).logits[0].log_softmax(-1)
        want = torch.stack([logits[len(base) - 1 + t, tok] for t, tok in enumerate(resp)])
        assert torch.allclose(ro.ref_baseline_logprobs[r, :n], want, atol=1e-5)
        assert ro.ref_baseline_logprobs[r, n:].abs().sum() == 0
    with pytest.raises(ValueError, match="ref_logprob_baseline"):
        collect_rollout(policy, _IdTokenizer(), prompts, ["a", "b"], source, RolloutConfig(max_new_tokens=4),
                        logprob_fn=None, baseline_ids=baselines)


def test_baseline_prompt_ids_tokenise_each_content_free_prompt():
    from alignkit.models.bpe import train_bpe_tokenizer

    tok = train_bpe_tokenizer(["Human: What is one plus two?\nAssistant: three"] * 5, vocab_size=300)
    texts = ["Human: What is one plus two?\nAssistant:", "Human: What is two plus two?\nAssistant:"]
    assert baseline_prompt_ids(tok, texts, "none") is None
    from alignkit.data.tokenize import encode_prompt

    want = encode_prompt(tok, "Human: \nAssistant:")[0]
    assert baseline_prompt_ids(tok, texts, "empty_prompt") == [want, want]
    assert tok.decode(want, skip_special_tokens=True) == "Human: \nAssistant:"

# ------------------------------------------------------------------ value heads
def _ids():
    p_ids, p_mask = pad_left([[3, 4, 5], [6]], 0)
    r_ids, r_mask = pad_right([[7, 8], [9, 10, 11]], 0)
    return torch.cat([p_ids, r_ids], 1), torch.cat([p_mask, r_mask], 1), r_ids, r_mask


def test_shared_value_head_reads_the_position_before_each_token():
    policy = tiny_llama("nano", vocab_size=40, seed=4).eval()
    head = ppo.ValueHead(64)
    assert head(torch.randn(2, 3, 64)).abs().max() == 0  # starts at V = 0
    torch.nn.init.normal_(head.proj.weight)
    ac = ppo.ActorCritic(policy, None, head)
    ids, mask, r_ids, _ = _ids()
    with torch.no_grad():
        logits, values = ac(ids, mask, r_ids)
        assert logits.shape == (2, 3, 40) and values.shape == (2, 3)
        # row 1 without padding: prompt [6], response [9, 10, 11]; V_t from column len(prompt) - 1 + t
        hidden = policy.model(torch.tensor([[6, 9, 10, 11]])).last_hidden_state[0]
        assert values[1].tolist() == pytest.approx(head(hidden[0:3]).tolist(), abs=1e-5)


def test_separate_value_model_shapes_and_padding_invariance():
    vm = RewardModel.from_model(tiny_llama("nano", vocab_size=40, seed=5), seed=5).eval()
    ac = ppo.ActorCritic(tiny_llama("nano", vocab_size=40, seed=4).eval(), vm, None)
    ids, mask, r_ids, _ = _ids()
    with torch.no_grad():
        logits, values = ac(ids, mask, r_ids)
        assert logits.shape == (2, 3, 40) and values.shape == (2, 3)
        alone = vm(torch.tensor([[3, 4, 5, 7, 8]]), torch.ones(1, 5, dtype=torch.long), per_token=True)[0]
        assert values[0, :2].tolist() == pytest.approx(alone[2:4].tolist(), abs=1e-5)
    with pytest.raises(ValueError, match="exactly one"):
        ppo.ActorCritic(ac.policy, vm, ppo.ValueHead(64))


# ------------------------------------------------------------------ one PPO update
def test_ppo_update_moves_logprobs_in_the_direction_of_the_advantage():
    """Row 0 has advantage +1 on every token, row 1 advantage -1. Before the update the
    ratio is 1 and the surrogate is -mean(A) = 0 (same token counts). One gradient step must
    raise log pi(row 0) and lower log pi(row 1), so the surrogate, evaluated again against the
    same old log-probs, drops below 0."""
    torch.manual_seed(0)
    policy = tiny_llama("nano", vocab_size=40, seed=6).eval()
    ac = ppo.ActorCritic(policy, None, ppo.ValueHead(64))
    p_ids, p_mask = pad_left([[3, 4], [5, 6]], 0)
    r_ids, r_mask = pad_right([[7, 8, 9], [10, 11, 12]], 0)
    ids, mask = torch.cat([p_ids, r_ids], 1), torch.cat([p_mask, r_mask], 1)
    with torch.no_grad():
        logits, values = ac(ids, mask, r_ids)
    from alignkit.train.rollout import gather_logprobs

    old = gather_logprobs(logits, r_ids)
    m = r_mask.float()
    adv = torch.tensor([[1.0] * 3, [-1.0] * 3])
    batch = ppo.Batch(ids, mask, r_ids, m, old, values, adv, torch.zeros(2, 3))
    cfg = load_config(ppo.Config, None, ["ppo_epochs=1", "train.batch_size=2", "train.lr=1e-3", "train.max_grad_norm=0"])
    opts = [torch.optim.SGD(ac.policy_parameters(), lr=1e-2), torch.optim.SGD(ac.value_parameters(), lr=1e-2)]
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0) for o in opts]
    stats = ppo.ppo_update(ac, batch, cfg, opts, scheds, torch.Generator().manual_seed(0))
    assert stats["policy_loss"] == pytest.approx(0.0, abs=1e-6)  # ratio 1, mean advantage 0
    assert stats["clipfrac"] == 0.0 and stats["updates"] == 1.0
    with torch.no_grad():
        new = gather_logprobs(ac(ids, mask, r_ids)[0], r_ids)
    assert new[0].sum() > old[0].sum() and new[1].sum() < old[1].sum()
    from alignkit.losses.policy import ppo_policy_loss

    after, _ = ppo_policy_loss(new, old, adv, m)
    assert after.item() < -1e-4
    # the value head (returns 0, values 0) had nothing to learn
    assert stats["value_loss"] == pytest.approx(0.0, abs=1e-12)


def test_ppo_update_grad_accum_matches_one_micro_batch():
    """The same minibatch split into 2 micro-batches with unequal token counts gives the same
    parameters as one micro-batch (weights: each micro-batch's share of the tokens)."""
    def run(accum):
        policy = tiny_llama("nano", vocab_size=40, seed=7).eval()
        ac = ppo.ActorCritic(policy, None, ppo.ValueHead(64))
        p_ids, p_mask = pad_left([[3, 4], [5], [6, 7, 8]], 0)
        r_ids, r_mask = pad_right([[7, 8, 9], [10], [11, 12]], 0)
        ids, mask = torch.cat([p_ids, r_ids], 1), torch.cat([p_mask, r_mask], 1)
        g = torch.Generator().manual_seed(1)
        batch = ppo.Batch(ids, mask, r_ids, r_mask.float(), torch.zeros(3, 3) - 3.0, torch.zeros(3, 3),
                          torch.randn(3, 3, generator=g), torch.randn(3, 3, generator=g))
        cfg = load_config(ppo.Config, None, ["ppo_epochs=1", "train.batch_size=3", f"train.grad_accum={accum}",
                                            "train.max_grad_norm=0"])
        opts = [torch.optim.SGD(ac.policy_parameters(), lr=0.1), torch.optim.SGD(ac.value_parameters(), lr=0.1)]
        scheds = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0) for o in opts]
        ppo.ppo_update(ac, batch, cfg, opts, scheds, torch.Generator().manual_seed(0))
        return torch.cat([p.detach().flatten() for p in ac.parameters()])

    assert torch.allclose(run(1), run(2), atol=1e-6)


# ------------------------------------------------------------------ the adaptive KL coefficient
def test_adaptive_beta_moves_toward_target():
    """Ziegler et al. 2019: e = clip(KL / target - 1, -0.2, 0.2), beta *= 1 + e * n / horizon.
    target 6, horizon 100, n = 10:
        KL 12  -> e = +0.2 (clipped)  -> beta 0.1 * 1.02 = 0.102
        KL 3   -> e = -0.2 (clipped)  -> 0.1 * 0.98 = 0.098
        KL 6.6 -> e = +0.1            -> 0.1 * 1.01 = 0.101"""
    for kl, expected in ((12.0, 0.102), (3.0, 0.098), (6.6, 0.101)):
        c = AdaptiveKLController(0.1, target=6.0, horizon=100.0)
        assert c.update(kl, n_steps=10) == pytest.approx(expected)
    # closed loop: a policy whose KL is 0.6 / beta settles where KL = target, i.e. beta = 0.1
    c = AdaptiveKLController(0.02, target=6.0, horizon=100.0)
    for _ in range(400):
        c.update(0.6 / c.beta, n_steps=10)
    assert c.beta == pytest.approx(0.1, rel=0.02)


# ------------------------------------------------------------------ end to end
WORDS = "Human: What is one plus two?\nAssistant: three . four five six seven eight nine ten"


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    from alignkit.models.bpe import train_bpe_tokenizer

    root = tmp_path_factory.mktemp("ppo")
    tok = train_bpe_tokenizer([WORDS] * 20, vocab_size=300)
    save_model(tiny_llama("nano", tokenizer=tok, seed=0), tok, root / "sft")
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Human: What is {w} plus two?\nAssistant:"}) + "\n"
                               for w in ("one", "two", "three", "four", "five", "six")))
    (root / "rewards_mod.py").write_text("def count_e(prompts, responses):\n    return [r.count('e') / 4 for r in responses]\n")
    return root


def test_ppo_run_end_to_end(tiny_dirs, monkeypatch):
    """Separate value model and adaptive KL; the shared head runs in the LoRA test below."""
    monkeypatch.syspath_prepend(str(tiny_dirs))
    out = tiny_dirs / "out-separate"
    cfg = load_config(ppo.Config, None, [
        f"model.path={tiny_dirs / 'sft'}", f"data.path={tiny_dirs / 'prompts.jsonl'}", f"out={out}",
        "reward.source=function", "reward.function=rewards_mod:count_e", "iterations=2", "rollout_batch=4",
        "train.batch_size=2", "ppo_epochs=2", "rollout.max_new_tokens=6", "value_model=separate",
        "kl_target=1.0", "kl_horizon=10",
    ])
    result = ppo.run(cfg)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("reward", "kl", "entropy", "clipfrac", "approx_kl", "value_loss", "explained_variance",
                "response_length", "beta"):
        assert all(math.isfinite(r[key]) for r in rows), key
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-5)  # first rollout: policy == reference
    assert rows[0]["beta"] == pytest.approx(0.05)
    assert rows[1]["beta"] < rows[0]["beta"]  # KL ~0 is under the target 1: beta falls
    assert rows[0]["updates"] == 4  # 2 epochs x 2 minibatches
    assert (out / "final" / "config.json").is_file() and result["peak_mem_mb"] > 0


def test_ppo_bf16_rollout_log_probs_round_like_the_update(tiny_dirs, monkeypatch):
    """Under bf16 autocast (a GPU's default; forced here on the CPU) the rollout's log-prob and
    reference passes run under the update's autocast: one epoch over one minibatch then has
    ratio 1 (approx_kl 0) and the first KL is 0, not the fp32-vs-bf16 rounding gap."""
    monkeypatch.syspath_prepend(str(tiny_dirs))
    out = tiny_dirs / "out-bf16"
    ppo.run(load_config(ppo.Config, None, [
        f"model.path={tiny_dirs / 'sft'}", f"data.path={tiny_dirs / 'prompts.jsonl'}", f"out={out}",
        "reward.source=function", "reward.function=rewards_mod:count_e", "iterations=1", "rollout_batch=4",
        "train.batch_size=4", "ppo_epochs=1", "rollout.max_new_tokens=6", "train.precision=bf16",
    ]))
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert row["ratio_mean"] == pytest.approx(1.0, abs=1e-6)  # first order in the rounding gap
    assert row["kl"] == pytest.approx(0.0, abs=1e-6) and row["clipfrac"] == 0.0


def test_ppo_lora_reference_is_the_adapter_free_policy(tiny_dirs, monkeypatch):
    """With LoRA no second model is loaded; the first rollout's KL is exactly 0 because the
    adapter starts as a no-op (B = 0), and a saved policy is a plain merged model."""
    monkeypatch.syspath_prepend(str(tiny_dirs))
    out = tiny_dirs / "out-lora"
    cfg = load_config(ppo.Config, None, [
        f"model.path={tiny_dirs / 'sft'}", f"data.path={tiny_dirs / 'prompts.jsonl'}", f"out={out}",
        "reward.source=function", "reward.function=rewards_mod:count_e", "iterations=2", "rollout_batch=4",
        "train.batch_size=4", "ppo_epochs=2", "rollout.max_new_tokens=6", "value_model=shared",
        "model.lora_r=4", "train.lr=0.01",
    ])
    ppo.run(cfg)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["kl"] == 0.0
    assert rows[1]["kl"] != 0.0  # the adapter moved the policy away from the reference
    assert not (out / "final" / "adapter_config.json").exists()


def test_ppo_reference_option_sets_the_kl_anchor(tiny_dirs, monkeypatch):
    """`reference` replaces model.path as the KL anchor: a copy of the start model gives KL 0 on
    the first rollout, another model a positive KL; with LoRA it is a config error."""
    from alignkit.config import ConfigError
    from alignkit.models.load import load_tokenizer

    monkeypatch.syspath_prepend(str(tiny_dirs))
    tok = load_tokenizer(str(tiny_dirs / "sft"))
    save_model(tiny_llama("nano", tokenizer=tok, seed=1), tok, tiny_dirs / "other")
    base = [f"model.path={tiny_dirs / 'sft'}", f"data.path={tiny_dirs / 'prompts.jsonl'}",
            "reward.source=function", "reward.function=rewards_mod:count_e", "iterations=1", "rollout_batch=4",
            "train.batch_size=4", "ppo_epochs=1", "rollout.max_new_tokens=6"]
    first_kl = {}
    for name in ("sft", "other"):
        out = tiny_dirs / f"out-ref-{name}"
        ppo.run(load_config(ppo.Config, None, [*base, f"out={out}", f"reference={tiny_dirs / name}"]))
        first_kl[name] = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["kl"]
    assert first_kl["sft"] == pytest.approx(0.0, abs=1e-5)
    assert first_kl["other"] > 0.1
    with pytest.raises(ConfigError, match="reference"):
        ppo.run(load_config(ppo.Config, None, [*base, f"out={tiny_dirs / 'x'}", f"reference={tiny_dirs / 'sft'}",
                                                "model.lora_r=4"]))


def test_monitor_alarm_stops_ppo_and_keeps_the_checkpoint_before_it(tiny_dirs, monkeypatch, capsys):
    """A rule that always holds (length correlation above -1) with warm-up 1 and patience 1 fires
    at iteration 2; monitor.stop=true ends the run there and the final model is the iteration-1
    checkpoint, not the policy updated at iteration 2."""
    from alignkit.train import checkpoint as ckpt

    monkeypatch.syspath_prepend(str(tiny_dirs))
    out = tiny_dirs / "out-monitor"
    cfg = load_config(ppo.Config, None, [
        f"model.path={tiny_dirs / 'sft'}", f"data.path={tiny_dirs / 'prompts.jsonl'}", f"out={out}",
        "reward.source=function", "reward.function=rewards_mod:count_e", "iterations=4", "rollout_batch=4",
        "train.batch_size=2", "ppo_epochs=1", "rollout.max_new_tokens=6", "train.save_every=1",
        "train.keep_checkpoints=0", "train.lr=1e-3", "monitor.warmup=1", "monitor.patience=1",
        "monitor.length_corr_max=-1", "monitor.stop=true",
    ])
    result = ppo.run(cfg)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and [r["monitor/alarm"] for r in rows] == [0.0, 1.0]
    assert {"monitor/length_corr", "monitor/refusal_rate", "monitor/repetition_rate"} <= set(rows[0])
    assert rows[1]["monitor/alarm/length_corr"] == 1.0 and not any(k.startswith("monitor/alarm/") for k in rows[0])
    assert result["monitor"]["first_alarm"] == 2
    assert result["monitor"]["stopped"]["restored"].endswith("step-1")
    assert "reward-hacking monitor, iteration 2: length_corr" in capsys.readouterr().err
    from safetensors.torch import load_file

    saved = load_file(str(out / "checkpoints" / "step-1" / "model.safetensors"))
    final = load_file(str(out / "final" / "model.safetensors"))
    policy = {k[len("policy."):]: v for k, v in saved.items() if k.startswith("policy.")}
    assert policy and all(torch.equal(final[k], v) for k, v in policy.items() if k in final)
    assert not ckpt.step_dirs(out / "checkpoints")[-1][1].name.endswith("2")


def test_ppo_feeds_judge_agreement_from_fresh_pairs(tiny_dirs):
    """PPO against a reward model, with the same reward model as the monitor's judge and no
    missing-EOS penalty: the proxy and the judge are one function, so they agree on every fresh
    pair they both order (1.0); judge_pairs=0 leaves the statistic out."""
    from alignkit.models.heads import RewardModel, RewardStats, write_reward_dir
    from alignkit.models.load import load_tokenizer

    tok = load_tokenizer(str(tiny_dirs / "sft"))
    rm_dir = tiny_dirs / "rm-judge"
    write_reward_dir(RewardModel.from_model(tiny_llama("nano", tokenizer=tok, seed=3), seed=3), tok, rm_dir,
                     RewardStats(mean=0.5, std=2.0, n=1))
    base = [f"model.path={tiny_dirs / 'sft'}", f"data.path={tiny_dirs / 'prompts.jsonl'}", "reward.source=model",
            f"reward.model={rm_dir}", "reward.missing_eos_penalty=0", "iterations=1", "rollout_batch=4",
            "train.batch_size=4", "ppo_epochs=1", "rollout.max_new_tokens=6", f"monitor.judge={rm_dir}",
            "monitor.judge_pairs=4"]
    out = tiny_dirs / "out-judge"
    ppo.run(load_config(ppo.Config, None, [*base, f"out={out}"]))
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert row["monitor/judge_pairs"] > 0 and row["monitor/judge_agreement"] == 1.0
    # the judge scores the rollout as the reward does: no gap, its score the mean reward
    assert row["monitor/proxy_gap"] == pytest.approx(0.0, abs=1e-5)
    assert row["monitor/judge_score"] == pytest.approx(row["reward"], abs=1e-5)
    assert 0.0 <= row["monitor/ref_surprise_tokens"] <= 1.0 and 0.0 <= row["monitor/ref_surprise"] <= 1.0
    # reward.ref_logprob_coef: the same first rollout (same seed), the feature in the optimised
    # total and logged apart, while `reward` and the monitor's comparison with its judge ignore it
    out = tiny_dirs / "out-judge-bonus"
    ppo.run(load_config(ppo.Config, None, [*base, f"out={out}", "reward.ref_logprob_coef=2"]))
    bonus = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert bonus["ref_logprob_bonus"] < 0 and bonus["reward"] == pytest.approx(row["reward"], abs=1e-6)
    assert bonus["total_reward"] - row["total_reward"] == pytest.approx(bonus["ref_logprob_bonus"], abs=1e-5)
    assert bonus["monitor/proxy_gap"] == pytest.approx(0.0, abs=1e-5)
    assert "ref_logprob_bonus" not in row
    # reward.ref_logprob_baseline=empty_prompt: the same rollout, a different feature (its PMI form)
    out = tiny_dirs / "out-judge-pmi"
    ppo.run(load_config(ppo.Config, None, [*base, f"out={out}", "reward.ref_logprob_coef=2",
                                           "reward.ref_logprob_baseline=empty_prompt"]))
    pmi = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert pmi["reward"] == pytest.approx(row["reward"], abs=1e-6) and pmi["ref_logprob_bonus"] != bonus["ref_logprob_bonus"]
    assert pmi["total_reward"] - row["total_reward"] == pytest.approx(pmi["ref_logprob_bonus"], abs=1e-5)
    out = tiny_dirs / "out-judge-off"
    ppo.run(load_config(ppo.Config, None, [*base, f"out={out}", "monitor.judge_pairs=0"]))
    assert "monitor/judge_agreement" not in json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
