"""Rollout speed: our HF generation loop with the KV cache against recomputing every step.

    python benchmarks/bench_rollout.py                     # tiny preset, 32 prompts x 128 tokens
    python benchmarks/bench_rollout.py --preset small --prompts 64 --new-tokens 256

Both runs use the same freshly initialised model, the same prompts and the same number of new
tokens (EOS is ignored so every row generates exactly --new-tokens). Prints a table, then as the
last line one JSON object with the figures. Run from the repository root after
`pip install -e .` (or with PYTHONPATH=.).

On a GPU these tiny presets are bound by kernel-launch latency, not arithmetic, so the cache
gains little there (measured on one H100: tiny 1.0x, small at 256 new tokens 1.3x); on CPU the
recomputation dominates and the cache wins by an order of magnitude.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from alignkit.models.generate import HFGenerator, SamplingParams
from alignkit.models.load import PRESETS, tiny_llama


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny", choices=list(PRESETS))
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=32, help="longest prompt; lengths vary down to half")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per mode; the best is kept")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()

    model = tiny_llama(args.preset, args.vocab, seed=0).to(args.device)
    g = torch.Generator().manual_seed(0)
    prompts = []
    for i in range(args.prompts):
        n = args.prompt_len - (i * args.prompt_len // 2) // max(args.prompts, 1)
        prompts.append(torch.randint(3, args.vocab, (n,), generator=g).tolist())
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=1.0, seed=0, stop_at_eos=False)
    total = args.prompts * args.new_tokens

    results = {}
    for name, use_cache in (("kv cache", True), ("no cache", False)):
        gen = HFGenerator(model, batch_size=args.batch_size, use_cache=use_cache)
        gen.generate(prompts[: min(4, len(prompts))], SamplingParams(max_new_tokens=4, stop_at_eos=False))
        best = float("inf")
        for _ in range(args.repeats):
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = gen.generate(prompts, params)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
        assert sum(map(len, out)) == total
        results[name] = (best, total / best)

    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"preset={args.preset} params={n_params:,} device={args.device} threads={torch.get_num_threads()} "
        f"prompts={args.prompts} prompt_len<={args.prompt_len} new_tokens={args.new_tokens} "
        f"batch_size={args.batch_size}"
    )
    print(f"{'mode':<10} {'seconds':>9} {'tokens/s':>10}")
    for name, (sec, tps) in results.items():
        print(f"{name:<10} {sec:>9.2f} {tps:>10.1f}")
    speedup = results["kv cache"][1] / results["no cache"][1]
    print(
        json.dumps(
            {
                "speedup_kv_cache": round(speedup, 2),
                "tokens_per_s_cache": round(results["kv cache"][1], 1),
                "tokens_per_s_nocache": round(results["no cache"][1], 1),
                "preset": args.preset,
                "device": args.device,
            }
        )
    )


if __name__ == "__main__":
    main()
