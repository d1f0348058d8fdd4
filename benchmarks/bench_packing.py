"""Padding-free packing against padded batches at real length spreads (SFT and DPO steps).

    python benchmarks/bench_packing.py                       # HH-RLHF and dpo_en_demo lengths, 3 rounds
    python benchmarks/bench_packing.py --data-dir /work/shared/data --batch 8 --max-len 512 --steps 6

Lengths: the prompts and responses of HH-RLHF (`hh-rlhf/harmless-base-test.jsonl.gz`: the prompt is
the transcript up to its last "Assistant:", chosen and rejected the rest) and LLaMA-Factory's
`dpo_en_demo.json` (the conversation's turns, then chosen / rejected), tokenised with a byte-level
BPE of 8,192 tokens trained on those texts (`alignkit.models.bpe`), each sequence cut to
`--max-len` tokens (the prompt keeps its last max-len / 2 at most). The token ids themselves are
the texts'.

Model: a Llama of hidden 256, 4 layers (4 heads, MLP 1024), vocab 8,192, fp32, one thread; the DPO
reference is a frozen copy and the policy that copy plus seeded noise. A step is the stage's own
step function (`sft.sft_step`, `dpo.make_preference_step`, sigmoid, beta 0.1) and its backward
(no optimizer step: it is the same in every mode).

Modes, each on the same `--steps` batches of `--batch` examples:
  padded-random    random batches padded to their longest member (TRL's default sampler)
  padded-bucketed  alignkit's default plan (`bucketed_batches`: similar lengths together), padded
  packed-random    the random batches, each packed into one row (`train.packing=true`)

Rounds alternate the modes' order; throughput = non-padding tokens (prompt + response, per sequence)
per second of the steps after the first; ratios are medians of the per-round ratios. Before timing,
the first random batch's loss is computed packed and padded (they must agree to float32 rounding).
The last line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODES = ("padded-random", "padded-bucketed", "packed-random")


def load_sets(data_dir: Path) -> dict[str, list[tuple[str, str, str]]]:
    """{name: [(prompt, chosen, rejected)]} from the two public files."""
    sets = {}
    with gzip.open(data_dir / "hh-rlhf" / "harmless-base-test.jsonl.gz", "rt") as f:
        rows = [json.loads(line) for line in f]
    hh = []
    for r in rows:
        cut = r["chosen"].rfind("\n\nAssistant:") + len("\n\nAssistant:")
        if cut >= len("\n\nAssistant:") and r["rejected"][:cut] == r["chosen"][:cut]:
            hh.append((r["chosen"][:cut], r["chosen"][cut:], r["rejected"][cut:]))
    sets["hh-rlhf"] = hh
    demo = json.loads((data_dir / "llama_factory" / "dpo_en_demo.json").read_text())
    sets["dpo_en_demo"] = [("\n".join(t["value"] for t in d["conversations"]), d["chosen"]["value"],
                            d["rejected"]["value"]) for d in demo]
    return sets


def tokenise(sets: dict, max_len: int):
    """{name: [TokenizedPair]} with one 8k BPE trained on all texts; each sequence <= max_len."""
    from alignkit.data.tokenize import TokenizedPair
    from alignkit.models.bpe import train_bpe_tokenizer

    texts = [t for rows in sets.values() for row in rows for t in row]
    tok = train_bpe_tokenizer(texts, 8192)
    out = {}
    for name, rows in sets.items():
        pairs = []
        for p, c, r in rows:
            ids = [tok(x, add_special_tokens=False)["input_ids"] for x in (p, c, r)]
            prompt = ids[0][-(max_len // 2):]
            room = max_len - len(prompt)
            if prompt and ids[1] and ids[2]:
                pairs.append(TokenizedPair(prompt, ids[1][:room], ids[2][:room]))
        out[name] = pairs
    return out, tok.pad_token_id, len(tok)


def build(vocab: int, noise: float = 0.0):
    import torch
    from bench_real_shapes import perturb
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096,
                      tie_word_embeddings=False)
    return perturb(LlamaForCausalLM(cfg).float(), noise).train()  # bench_real_shapes' seeded noise


def batches(pairs, stage: str, batch: int, steps: int, seed: int) -> dict[str, list[list[int]]]:
    """The index batches of each mode (the same random batches for padded and packed)."""
    from alignkit.data.batching import bucketed_batches

    lengths = [len(p.prompt_ids) + len(p.chosen_ids) + (len(p.rejected_ids) if stage == "dpo" else 0) for p in pairs]
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    rand = [order[i : i + batch] for i in range(0, batch * steps, batch)]
    bucketed = [b for b in bucketed_batches(lengths, batch, seed, 0) if len(b) == batch][:steps]
    return {"padded-random": rand, "padded-bucketed": bucketed, "packed-random": rand}


def stage_fns(stage: str, pad: int, vocab: int):
    """(model, collate(items, packed) -> batch, step(model, batch) -> loss, tokens(items) -> int)."""
    from alignkit.data.batching import collate_sft
    from alignkit.data.tokenize import TokenizedSFT
    from alignkit.train import dpo, reference
    from alignkit.train.sft import collate_packed, sft_step

    if stage == "sft":
        def collate(items, packed):
            sft = [TokenizedSFT(p.prompt_ids, p.chosen_ids) for p in items]
            return collate_packed(sft) if packed else collate_sft(sft, pad)

        def step(model, b):
            out = sft_step(model, b)
            return out.loss / out.weight

        return build(vocab), collate, step, lambda items: sum(len(p.prompt_ids) + len(p.chosen_ids) for p in items)
    ref = reference.CopyReference(build(vocab).eval())
    dstep = dpo.make_preference_step(dpo.Config(beta=0.1), ref)
    collates = {packed: dpo.make_preference_collate(pad, ref, packing=packed) for packed in (False, True)}

    def collate(items, packed):
        return collates[packed](list(enumerate(items)))

    def step(model, b):
        out = dstep(model, b)
        return out.loss / out.weight

    def tokens(items):
        return sum(2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in items)

    return build(vocab, noise=0.01), collate, step, tokens


def padding(items, stage: str) -> tuple[int, int]:
    """(real tokens, padded slots) of one padded batch: rows are padded to the longest."""
    seqs = [len(p.prompt_ids) + len(p.chosen_ids) for p in items]
    if stage == "dpo":
        seqs += [len(p.prompt_ids) + len(p.rejected_ids) for p in items]
    return sum(seqs), max(seqs) * len(seqs)


def run_set(name: str, pairs, stage: str, args, pad: int, vocab: int) -> dict:

    model, collate, step, tokens = stage_fns(stage, pad, vocab)
    plan = batches(pairs, stage, args.batch, args.steps + 1, args.seed)
    first = [pairs[i] for i in plan["packed-random"][0]]
    loss_diff = abs(float(step(model, collate(first, True))) - float(step(model, collate(first, False))))
    speed: dict[str, list[float]] = {m: [] for m in MODES}
    for r in range(args.rounds):
        for mode in (MODES if r % 2 == 0 else MODES[::-1]):
            packed = mode.startswith("packed")
            done, seconds = 0, 0.0
            for k, idx in enumerate(plan[mode]):
                items = [pairs[i] for i in idx]
                b = collate(items, packed)
                t0 = time.perf_counter()
                step(model, b).backward()
                model.zero_grad(set_to_none=True)
                if k:  # the first step warms up
                    seconds += time.perf_counter() - t0
                    done += tokens(items)
            speed[mode].append(done / seconds)
            print(f"  {name:12s} {stage:4s} round {r} {mode:16s} {done / seconds:8.1f} tokens/s", file=sys.stderr)
    fill = {}
    for mode in ("padded-random", "padded-bucketed"):
        real, slots = map(sum, zip(*(padding([pairs[i] for i in idx], stage) for idx in plan[mode][1:])))
        fill[mode] = round(1 - real / slots, 3)
    ratio = {f"packed_vs_{m}": round(statistics.median(p / q for p, q in zip(speed["packed-random"], speed[m])), 3)
             for m in ("padded-random", "padded-bucketed")}
    return {"set": name, "stage": stage, "examples": len(pairs), "loss_abs_diff_packed_padded": loss_diff,
            "tokens_per_s": {m: round(statistics.median(v), 1) for m, v in speed.items()},
            "padding_fraction": fill, **ratio, "per_round": {m: [round(x, 1) for x in v] for m, v in speed.items()},
            "mean_tokens_per_sequence": round(statistics.mean(
                len(p.prompt_ids) + len(p.chosen_ids) for p in pairs), 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=6, help="timed steps per mode and round (plus one warm-up)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--stages", default="sft,dpo")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if not (args.data_dir / "hh-rlhf").is_dir():
        sys.exit(f"{args.data_dir}: no hh-rlhf/ folder (pass --data-dir, the folder of the public data sets)")
    import torch

    torch.set_num_threads(1)
    sets, pad, vocab = tokenise(load_sets(args.data_dir), args.max_len)
    results = [run_set(name, pairs, stage, args, pad, vocab)
               for stage in args.stages.split(",") for name, pairs in sets.items()]
    print(f"{'set':12s} {'stage':5s} {'mean len':>8s} {'pad rand':>8s} {'pad buck':>8s} "
          + " ".join(f"{m:>16s}" for m in MODES) + f" {'x rand':>7s} {'x buck':>7s} {'|dloss|':>8s}")
    for r in results:
        print(f"{r['set']:12s} {r['stage']:5s} {r['mean_tokens_per_sequence']:>8.1f} "
              f"{r['padding_fraction']['padded-random']:>8.3f} {r['padding_fraction']['padded-bucketed']:>8.3f} "
              + " ".join(f"{r['tokens_per_s'][m]:>16.1f}" for m in MODES)
              + f" {r['packed_vs_padded-random']:>7.2f} {r['packed_vs_padded-bucketed']:>7.2f}"
              f" {r['loss_abs_diff_packed_padded']:>8.1e}")
    print(json.dumps({"bench": "packing", "batch": args.batch, "max_len": args.max_len, "steps": args.steps,
                      "rounds": args.rounds, "threads": 1, "results": results}))


if __name__ == "__main__":
    main()
