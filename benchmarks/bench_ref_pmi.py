"""The SFT model's likelihood of candidate answers: mean, sum, and PMI against a content-free prompt.

For every held-out prompt of a demo's world this scores a fixed set of candidates under the SFT
model: the harmful-request refusal template (" I can't help with that, it could hurt someone."),
" I don't know.", the world's ideal, terse ("mediocre") and wrong answers (arithmetic, facts,
format, benign: `World.render`), the SFT model's greedy answer and four samples at temperature 1.
Features: the summed and the mean per-token log-prob, and the same minus their value behind a
baseline prompt (PMI): `hh_empty` = `rollout.content_free_prompt` ("Human: \\nAssistant:", what
`reward.ref_logprob_baseline=empty_prompt` uses), `hh_noq` ("Human:\\nAssistant:"), `empty` (BOS
only). Per category and feature: how often a correct answer (ideal or terse) beats the refusal
and a wrong answer, the agreement with the gold judge over every candidate pair it orders
strictly, and the gold score of each prompt's top candidate (what a pure maximiser would pick).

    OMP_NUM_THREADS=1 python benchmarks/bench_ref_pmi.py --demo /tmp/fulldemo

Prints one JSON object as its last line: {"candidates": N, "features": {name: {metric: {category: x}}}}.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import time
from collections import defaultdict
from pathlib import Path

import torch

REFUSAL = " I can't help with that, it could hurt someone."
BASELINES = {"hh_empty": None, "hh_noq": "Human:\nAssistant:", "empty": ""}  # None: content_free_prompt(prompt)


def candidates(world, texts, cats, greedy, samples) -> list[tuple[int, str, str]]:
    """(prompt index, kind, response) for every distinct non-empty candidate of every prompt."""
    out = []
    for i, (p, c) in enumerate(zip(texts, cats)):
        task, seen = world.task(p), set()
        rows = [("refusal", REFUSAL), ("unsure", " I don't know.")]
        if c in ("arithmetic", "format", "facts", "benign"):
            rows += [("ideal", world.render(task, "ideal", random.Random(0)))]
            rows += [("mediocre", world.render(task, "mediocre", random.Random(k))) for k in (1, 2)]
            rows += [("wrong", world.render(task, "wrong", random.Random(10 + k))) for k in range(3)]
        rows += [("greedy", greedy[i])] + [("sample", r) for r in samples[i]]
        for kind, r in rows:
            if r.strip() and r not in seen:
                seen.add(r)
                out.append((i, kind, r))
    return out


def metrics(f: torch.Tensor, gold: torch.Tensor, cands, cats) -> dict:
    """Per category: correct > refusal, correct > wrong, pairwise agreement with gold, gold of the argmax."""
    acc = {k: defaultdict(lambda: [0.0, 0]) for k in ("correct>refusal", "correct>wrong", "pair_agree", "gold_of_argmax")}
    by_prompt = defaultdict(list)
    for j, (i, _, _) in enumerate(cands):
        by_prompt[i].append(j)

    def add(name, c, x):
        acc[name][c][0] += x
        acc[name][c][1] += 1

    for i, js in by_prompt.items():
        c = cats[i]
        for a, b in itertools.combinations(js, 2):
            if gold[a] != gold[b]:
                add("pair_agree", c, float((f[a] - f[b]) * (gold[a] - gold[b]) > 0))
        add("gold_of_argmax", c, float(gold[max(js, key=lambda j: float(f[j]))]))
        good = [j for j in js if cands[j][1] in ("ideal", "mediocre")]
        for g in good:
            for j in js:
                if cands[j][1] in ("refusal", "wrong"):
                    add(f"correct>{cands[j][1]}", c, float(f[g] > f[j]))
    return {k: {c: round(s / n, 3) for c, (s, n) in sorted(v.items())} for k, v in acc.items()}


def main(argv=None) -> dict:
    from alignkit.data.load import load_records
    from alignkit.models.load import load_model, load_tokenizer
    from alignkit.train.iterate import sample_pairs
    from alignkit.train.reward_mix import response_logprobs
    from alignkit.train.rollout import content_free_prompt, load_prompts
    from alignkit.world import load_world

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--demo", required=True, type=Path, help="a finished demo folder (its sft/final and world)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    world = load_world(str(args.demo / "world"))
    model, tok = load_model(str(args.demo / "sft/final")).eval(), load_tokenizer(str(args.demo / "sft/final"))
    path = str(args.demo / "world/eval_prompts.jsonl")
    ids, texts = load_prompts(path, tok, 128)
    cats = [r.category for r in load_records(path, kind="prompt").records]
    greedy = [json.loads(line)["response"] for line in open(args.demo / "sft/eval_responses.jsonl")]
    passes = [list(sample_pairs(model, tok, ids, 24, 1.0, args.seed + k)) for k in range(2)]
    samples = [[r for pair in rows for r in pair] for rows in zip(*passes)]
    cands = candidates(world, texts, cats, greedy, samples)
    gold = torch.tensor([world.score(texts[i], r) for i, _, r in cands])
    feats = {}
    for avg, name in ((False, "sum"), (True, "mean")):
        cond = response_logprobs(model, tok, [(texts[i], r) for i, _, r in cands], avg)
        feats[name] = cond
        for b, prompt in BASELINES.items():
            base = [(content_free_prompt(texts[i]) if prompt is None else prompt, r) for i, _, r in cands]
            feats[f"pmi_{name}[{b}]"] = cond - response_logprobs(model, tok, base, avg)
    res = {name: metrics(f, gold, cands, cats) for name, f in feats.items()}
    out = {"demo": str(args.demo), "candidates": len(cands), "features": res, "wall_s": round(time.perf_counter() - t0, 1)}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
