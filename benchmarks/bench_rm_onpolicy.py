"""Reward models on a policy's OWN samples, per category, against the world's gold judge.

Held-out pair accuracy (preferences_eval.jsonl) measures a reward model on the world's template
answers; PPO meets the policy's samples instead. This script samples two answers per held-out
prompt from a policy (`--passes` times, temperature 1), keeps the pairs the gold judge orders
strictly, and reports for every reward model given (and for the mean of their normalised scores,
the ensemble PPO uses) how often it orders them as the gold judge does, per category. With
`--lm`, the policy's own summed and mean per-token log-probability are scored too: whether the
backbone "knows" the better answer. `--mix C` (repeatable) scores the ensemble plus C x the mean
log-prob: what PPO optimises with `reward.ref_logprob_coef=C` when the policy is the reference;
`--mix-pmi C` the same with the mean log-prob minus its mean behind the content-free prompt
(`reward.ref_logprob_baseline=empty_prompt`, `rollout.content_free_prompt`).

    OMP_NUM_THREADS=1 python benchmarks/bench_rm_onpolicy.py --policy DEMO/sft/final \
        --world DEMO/world --rm DEMO/reward/final --rm DEMO/reward_2/final --passes 3

Prints one JSON object as its last line: {"pairs": N, "by_category_pairs": {...},
"scorers": {name: {"agreement": a, "by_category": {...}}}}.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import torch


def sample_gold_pairs(policy, tok, world, prompt_path: str, passes: int, seed: int, max_new_tokens: int):
    """(prompt, a, b, category) for every sampled pair the gold judge orders strictly (a the better)."""
    from alignkit.data.load import load_records
    from alignkit.train.iterate import sample_pairs
    from alignkit.train.rollout import load_prompts

    ids, texts = load_prompts(prompt_path, tok, 128)
    cats = [r.category for r in load_records(prompt_path, kind="prompt").records]
    out = []
    for k in range(passes):
        for p, c, (a, b) in zip(texts, cats, sample_pairs(policy, tok, ids, max_new_tokens, 1.0, seed + k)):
            ga, gb = world.score(p, a), world.score(p, b)
            if ga != gb and a.strip() and b.strip():
                out.append((p, a, b, c) if ga > gb else (p, b, a, c))
    return out


def rm_margins(model_dir: str, pairs) -> torch.Tensor:
    """(N,) r(better) - r(worse) of a reward model, on its normalised scale."""
    from alignkit.data.records import PreferencePair
    from alignkit.data.tokenize import TruncationLimits
    from alignkit.train.reward_mix import normalised_pair_scores

    recs = [PreferencePair(prompt=p, chosen=a, rejected=b) for p, a, b, _ in pairs]
    r_a, r_b = normalised_pair_scores(model_dir, recs, TruncationLimits(max_prompt_len=128, max_len=256))
    return r_a - r_b


def lm_margins(policy, tok, pairs, average: bool = False) -> torch.Tensor:
    """(N,) log pi(a|x) - log pi(b|x) under the policy (summed over the response tokens, or the
    mean per token with `average`)."""
    from alignkit.train.reward_mix import response_logprobs

    return (response_logprobs(policy, tok, [(p, a) for p, a, _, _ in pairs], average)
            - response_logprobs(policy, tok, [(p, b) for p, _, b, _ in pairs], average))


def pmi_margins(policy, tok, pairs) -> torch.Tensor:
    """(N,) the mean-log-prob margin minus the same margin behind each prompt's content-free
    prompt (pointwise mutual information per token between the question and the answer)."""
    from alignkit.train.rollout import content_free_prompt

    base = [(content_free_prompt(p), a, b, c) for p, a, b, c in pairs]
    return lm_margins(policy, tok, pairs, average=True) - lm_margins(policy, tok, base, average=True)


def agreement(margins: torch.Tensor, cats: list[str]) -> dict:
    """Share of pairs with margin > 0 (the better answer scored higher), overall and per category."""
    right = (margins > 0).double()
    by = defaultdict(list)
    for r, c in zip(right.tolist(), cats):
        by[c].append(r)
    return {"agreement": float(right.mean()),
            "by_category": {c: sum(v) / len(v) for c, v in sorted(by.items())}}


def main(argv=None) -> dict:
    from alignkit.models.load import load_model, load_tokenizer
    from alignkit.world import load_world

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--policy", required=True, help="the policy whose samples are paired (e.g. DEMO/sft/final)")
    ap.add_argument("--world", required=True)
    ap.add_argument("--rm", action="append", default=[], help="a reward model directory (repeat)")
    ap.add_argument("--prompts", default=None, help="prompt file (default WORLD/eval_prompts.jsonl)")
    ap.add_argument("--passes", type=int, default=3, help="pairs sampled per prompt")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--lm", action="store_true", help="also score pairs by the policy's own log-probability")
    ap.add_argument("--mix", type=float, action="append", default=[],
                    help="also score ensemble + C x the policy's mean log-prob (repeat for several C)")
    ap.add_argument("--mix-pmi", type=float, action="append", default=[],
                    help="also score ensemble + C x the mean log-prob's PMI against the content-free prompt (repeat)")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    world = load_world(args.world)
    policy, tok = load_model(args.policy).eval(), load_tokenizer(args.policy)
    prompts = args.prompts or str(Path(args.world) / "eval_prompts.jsonl")
    pairs = sample_gold_pairs(policy, tok, world, prompts, args.passes, args.seed, args.max_new_tokens)
    cats = [c for *_, c in pairs]
    scorers: dict[str, dict] = {}
    margins = []
    for i, d in enumerate(args.rm):
        m = rm_margins(d, pairs)
        margins.append(m)
        scorers[f"rm{i}"] = {"dir": d, **agreement(m, cats)}
    if len(margins) > 1:
        scorers["ensemble_mean"] = agreement(torch.stack(margins).mean(0), cats)
    if args.lm:
        scorers["policy_logprob"] = agreement(lm_margins(policy, tok, pairs), cats)
    if args.lm or args.mix:
        d_lp = lm_margins(policy, tok, pairs, average=True)
        scorers["policy_mean_logprob"] = agreement(d_lp, cats)
        for c in args.mix:
            scorers[f"ensemble+{c:g}*mean_logprob"] = agreement(torch.stack(margins).mean(0) + c * d_lp, cats)
    if args.mix_pmi:
        d_pmi = pmi_margins(policy, tok, pairs)
        scorers["policy_pmi_mean_logprob"] = agreement(d_pmi, cats)
        for c in args.mix_pmi:
            scorers[f"ensemble+{c:g}*pmi_mean_logprob"] = agreement(torch.stack(margins).mean(0) + c * d_pmi, cats)
    counts = defaultdict(int)
    for c in cats:
        counts[c] += 1
    result = {"policy": args.policy, "pairs": len(pairs), "by_category_pairs": dict(sorted(counts.items())),
              "scorers": scorers, "wall_s": round(time.perf_counter() - t0, 1)}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
