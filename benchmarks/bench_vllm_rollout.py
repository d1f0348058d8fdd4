"""Rollout speed: vLLM (rollout.engine=vllm) against our HF sampler, the same model and prompts.

    /work/venvs/vllm/bin/python benchmarks/bench_vllm_rollout.py              # tiny, 64 prompts x 64 tokens
    /work/venvs/vllm/bin/python benchmarks/bench_vllm_rollout.py --preset small --new-tokens 128
    python benchmarks/bench_vllm_rollout.py --dtype bfloat16 --preset small   # a GPU env with CUDA vllm

Needs a python where `vllm` imports (scripts/setup_vllm_venv.sh builds one on CPU). Both engines
sample the same freshly initialised model at temperature 1 from the same prompts with EOS
ignored, so every row makes exactly --new-tokens tokens; GRPO-like groups (--group copies of each
prompt) are the default shape. The vLLM time includes the in-memory weight push that precedes
every rollout (as in training); engine start-up is timed apart. Prints a table, then as the last
line one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from alignkit.models.generate import HFGenerator, SamplingParams
from alignkit.models.load import PRESETS, tiny_llama


def timed(gen, prompts, params, repeats: int, cuda: bool) -> tuple[float, int]:
    best, n = float("inf"), 0
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = gen.generate(prompts, params)
        if cuda:
            torch.cuda.synchronize()
        best, n = min(best, time.perf_counter() - t0), sum(map(len, out))
    return best, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny", choices=[p for p in PRESETS if p != "nano"],
                    help="nano's head size 16 has no vLLM CPU kernel")
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--prompts", type=int, default=16, help="distinct prompts")
    ap.add_argument("--group", type=int, default=4, help="samples per prompt (GRPO's G)")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per engine; the best is kept")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--threads", type=int, default=0, help="torch threads for the HF sampler (0: leave)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from alignkit.models.vllm_engine import VLLMGenerator, import_vllm

    t0 = time.perf_counter()
    import_vllm()
    import_s = time.perf_counter() - t0

    model = tiny_llama(args.preset, args.vocab, seed=0).to(args.device, getattr(torch, args.dtype)).eval()
    g = torch.Generator().manual_seed(0)
    distinct = [torch.randint(3, args.vocab, (args.prompt_len - i % (args.prompt_len // 2),), generator=g).tolist()
                for i in range(args.prompts)]
    prompts = [p for p in distinct for _ in range(args.group)]
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=1.0, seed=0, stop_at_eos=False)
    cuda = args.device.startswith("cuda")
    warm = SamplingParams(max_new_tokens=4, stop_at_eos=False)

    hf = HFGenerator(model, batch_size=len(prompts))
    hf.generate(prompts[:4], warm)
    t0 = time.perf_counter()
    engine = VLLMGenerator(model)
    start_s = time.perf_counter() - t0
    engine.generate(prompts[:4], warm)
    results = {"hf": timed(hf, prompts, params, args.repeats, cuda), "vllm": timed(engine, prompts, params, args.repeats, cuda)}
    for name, (_, n) in results.items():
        assert n == len(prompts) * args.new_tokens, (name, n)

    n_params = sum(p.numel() for p in model.parameters())
    print(f"preset={args.preset} params={n_params:,} dtype={args.dtype} device={args.device} "
          f"threads={torch.get_num_threads()} rows={len(prompts)} ({args.prompts} prompts x {args.group}) "
          f"prompt_len<={args.prompt_len} new_tokens={args.new_tokens} vllm_import_s={import_s:.1f} vllm_start_s={start_s:.1f}")
    print(f"{'engine':<8} {'seconds':>9} {'tokens/s':>10}")
    tps = {}
    for name, (sec, n) in results.items():
        tps[name] = n / sec
        print(f"{name:<8} {sec:>9.3f} {tps[name]:>10.1f}")
    print(json.dumps({
        "speedup_vllm_vs_hf": round(tps["vllm"] / tps["hf"], 2),
        "tokens_per_s_vllm": round(tps["vllm"], 1),
        "tokens_per_s_hf": round(tps["hf"], 1),
        "vllm_start_s": round(start_s, 2), "vllm_import_s": round(import_s, 2),
        "preset": args.preset, "params": n_params, "dtype": args.dtype, "device": args.device,
        "rows": len(prompts), "new_tokens": args.new_tokens,
    }))


if __name__ == "__main__":
    main()
