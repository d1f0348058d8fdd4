"""The reference's likelihood as a reward feature: the logistic fit of its weight (reward_mix)."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from alignkit.data.records import PreferencePair
from alignkit.train.reward_mix import (
    ensemble_margins,
    fit_margin_weights,
    fit_ref_logprob_coef,
    response_logprobs,
)


def test_one_feature_fit_is_the_log_odds():
    """Margins +1 on three pairs, -1 on one: the likelihood 3 log s(w) + log s(-w) peaks where
    s(w) = 3/4, w = log 3."""
    w = fit_margin_weights(torch.tensor([[1.0], [1.0], [1.0], [-1.0]]), ridge=0.0)
    assert w.item() == pytest.approx(math.log(3), abs=1e-10)


def test_two_feature_fit_is_stationary_and_follows_the_scale():
    """The fitted weights zero the gradient of the mean log-loss (compared in float64 by hand);
    a feature measured in units 4x larger gets a weight 4x smaller, the other weight unchanged."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 2, generator=g, dtype=torch.float64)
    flip = torch.rand(400, generator=g, dtype=torch.float64) > torch.sigmoid(x @ torch.tensor([1.5, -0.7], dtype=torch.float64))
    x[flip] = -x[flip]  # a pair the label orders the other way has its margins negated
    w = fit_margin_weights(x, ridge=0.0)
    grad = (x * (1 - torch.sigmoid(x @ w))[:, None]).mean(0)
    assert grad.abs().max().item() < 1e-10
    w4 = fit_margin_weights(x * torch.tensor([1.0, 4.0], dtype=torch.float64), ridge=0.0)
    assert w4[0].item() == pytest.approx(w[0].item(), rel=1e-8)
    assert w4[1].item() == pytest.approx(w[1].item() / 4, rel=1e-8)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny world, a nano reference (SFT) model and two nano reward models with stats."""
    from alignkit.models.bpe import train_bpe_tokenizer
    from alignkit.models.heads import RewardModel, RewardStats, save_reward_model
    from alignkit.models.load import save_model, tiny_llama
    from alignkit.world import write_world

    root = tmp_path_factory.mktemp("mix")
    write_world(root / "world", n_pairs=48, n_sft=16, n_pretrain=8, n_eval=8, n_pairs_eval=8, n_cai=8)
    rows = [json.loads(x) for x in (root / "world" / "preferences.jsonl").read_text().splitlines()]
    tok = train_bpe_tokenizer([r["prompt"] + r["chosen"] + r["rejected"] for r in rows], vocab_size=300)
    save_model(tiny_llama("nano", tokenizer=tok, seed=0), tok, root / "sft")
    for seed, (mean, std) in ((1, (0.5, 2.0)), (2, (-0.1, 0.5))):
        rm = RewardModel.from_model(tiny_llama("nano", tokenizer=tok, seed=seed), seed=seed)
        save_reward_model(rm, tok, root / f"rm{seed}", RewardStats(mean=mean, std=std, n=2))
    pairs = [PreferencePair(prompt=r["prompt"], chosen=r["chosen"], rejected=r["rejected"]) for r in rows[:32]]
    return root, tok, pairs


def test_mean_response_logprob_by_hand(tiny):
    """The mean over the response tokens of log softmax(logits)[next token], from a plain forward."""
    from alignkit.data.tokenize import encode_pair
    from alignkit.models.load import load_model

    root, tok, pairs = tiny
    model = load_model(str(root / "sft"))
    got = response_logprobs(model, tok, [(p.prompt, p.chosen) for p in pairs[:3]])
    for i, p in enumerate(pairs[:3]):
        e = encode_pair(tok, p.prompt, p.chosen)
        with torch.no_grad():
            logits = model(torch.tensor([e.input_ids])).logits[0].double()
        P = len(e.prompt_ids)
        lp = torch.log_softmax(logits, -1)[P - 1 : len(e.input_ids) - 1].gather(-1, torch.tensor(e.response_ids)[:, None])
        assert got[i].item() == pytest.approx(lp.mean().item(), abs=1e-5)


def test_ensemble_margins_are_the_mean_of_normalised_members(tiny):
    """Two members with stats (0.5, 2.0) and (-0.1, 0.5): the mean of (r_c - r_r) / std."""
    from alignkit.data.tokenize import TruncationLimits, tokenize_preference
    from alignkit.models.heads import load_reward_model
    from alignkit.train.reward import score_pairs

    root, tok, pairs = tiny
    by_hand = []
    for seed, std in ((1, 2.0), (2, 0.5)):
        items, _ = tokenize_preference(tok, pairs, TruncationLimits(max_prompt_len=10**6 - 1, max_len=10**6))
        r_c, r_r = score_pairs(load_reward_model(str(root / f"rm{seed}")), items, tok.pad_token_id)
        by_hand.append((r_c - r_r) / std)
    got = ensemble_margins([str(root / "rm1"), str(root / "rm2")], pairs)
    assert torch.allclose(got, (by_hand[0] + by_hand[1]) / 2, atol=1e-5)


def test_fit_ref_logprob_coef_on_pairs_the_ensemble_orders_three_times_in_four(tiny):
    """Pairs oriented so the ensemble prefers the labelled answer on 24 of 32: its agreement is
    0.75, its weight positive, coef = b / a, and the weights are the logistic fit of the two
    margins; pairs it orders the wrong way everywhere are refused with the reason."""
    root, tok, pairs = tiny
    dirs = [str(root / "rm1"), str(root / "rm2")]
    m = ensemble_margins(dirs, pairs)
    assert bool((m != 0).all())
    swap = [(bool(v < 0) if i < 24 else bool(v > 0)) for i, v in enumerate(m)]
    oriented = [dataclasses.replace(p, chosen=p.rejected, rejected=p.chosen) if s else p for p, s in zip(pairs, swap)]
    fit = fit_ref_logprob_coef(dirs, str(root / "sft"), oriented)
    a, b = fit["weights"]
    assert fit["agreement"]["reward"] == 0.75 and fit["pairs"] == 32
    assert a > 0 and fit["coef"] == pytest.approx(b / a)
    from alignkit.models.load import load_model
    ref = load_model(str(root / "sft"))
    d_lp = (response_logprobs(ref, tok, [(p.prompt, p.chosen) for p in oriented])
            - response_logprobs(ref, tok, [(p.prompt, p.rejected) for p in oriented]))
    w = fit_margin_weights(torch.stack([ensemble_margins(dirs, oriented), d_lp], 1))
    assert w.tolist() == pytest.approx([a, b], rel=1e-6)
    wrong = [dataclasses.replace(p, chosen=p.rejected, rejected=p.chosen) if v > 0 else p for p, v in zip(pairs, m)]
    with pytest.raises(ValueError, match="do not order them as labelled"):
        fit_ref_logprob_coef(dirs, str(root / "sft"), wrong)


def test_reward_mix_command_writes_the_fit(tiny, tmp_path, capsys):
    """`alignkit reward mix` on a pairs file gives the library's fit; a missing data.path is a
    one-line error naming the key."""
    from alignkit.cli import main

    root, _, pairs = tiny
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}) + "\n"
                            for p in pairs))
    args = ["reward", "mix", f"model={root / 'rm1'}", f"ensemble=[{root / 'rm2'}]", f"reference={root / 'sft'}"]
    assert main([*args, f"data.path={data}", f"out={tmp_path / 'fit.json'}"]) == 0
    got = json.loads((tmp_path / "fit.json").read_text())
    want = fit_ref_logprob_coef([str(root / "rm1"), str(root / "rm2")], str(root / "sft"), pairs)
    assert got["coef"] == pytest.approx(want["coef"]) and got["agreement"] == pytest.approx(want["agreement"])
    capsys.readouterr()
    assert main(args) == 2
    assert "'data.path' is required" in capsys.readouterr().err
