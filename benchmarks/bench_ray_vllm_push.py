"""Weight push into a vLLM engine in a Ray actor vs the in-engine reload the colocated engine pays.

    python benchmarks/bench_ray_vllm_push.py                       # tiny, small, 512x8 Llamas
    python benchmarks/bench_ray_vllm_push.py --sizes tiny --pushes 3

Run from the repository root in the main environment (Ray installed), with the vLLM venv built by
scripts/setup_vllm_venv.sh (it has this Ray; `--python` or ALIGNKIT_VLLM_PYTHON points elsewhere).
A local cluster (127.0.0.1, no dashboard); per model size one VLLMActor in the venv's Python,
started by a first push, then `--pushes` pushes, each after changing the weights, through the
code a trainer rank runs (ray_vllm.RemoteVLLM.push). Side by side, per size:

  push_ms:    the rank's round trip: merged state dict to CPU tensors, ray.put, the actor's
              reload_weights, the answer (median over the pushes);
  reload_ms:  inside that, the actor's reload_weights alone (median): what the colocated engine
              pays per rollout, since it calls the same VLLMEngine.load_weights in-process;
  transport_ms: push_ms - reload_ms, the price of the separate actor (numpy arrays through the
              object store: one copy in, zero-copy out).

Sizes: `tiny` / `small` (alignkit presets) or HIDDENxLAYERS (8 heads); a 300-token vocabulary,
fp32; a 256 MiB KV cache. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _model(size: str):
    from alignkit.models.load import PRESETS, tiny_llama

    if size in PRESETS:
        return tiny_llama(size, vocab_size=300, seed=0)
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, layers = (int(x) for x in size.split("x"))
    return LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=hidden, num_hidden_layers=layers,
                                        num_attention_heads=8, num_key_value_heads=8, intermediate_size=4 * hidden,
                                        tie_word_embeddings=True))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="tiny,small,512x8")
    ap.add_argument("--pushes", type=int, default=5)
    ap.add_argument("--python", default=None, help="the vLLM venv's python (default: as ray.vllm_python=None)")
    args = ap.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    import torch

    from alignkit.train.ray_vllm import RemoteVLLM, VLLMActor, check_vllm_python, runtime_env, vllm_python

    python = vllm_python(args.python)
    check_vllm_python(python)
    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             object_store_memory=512 * 2**20)
    rows = {}
    try:
        for size in args.sizes.split(","):
            model = _model(size).float().eval()
            actor = ray.remote(num_cpus=1)(VLLMActor).options(runtime_env=runtime_env(python)).remote(os.getcwd(), 256, 0.9)
            sampler = RemoteVLLM([actor], rank=0, world=1).bind(model, None)
            sampler.push()  # starts the engine
            for _ in range(args.pushes):
                with torch.no_grad():
                    for p in model.parameters():
                        p.add_(1e-3)
                sampler.push()
            served = ray.get(actor.served.remote())
            n = sum(p.numel() for p in model.parameters())
            push = statistics.median(sampler.push_ms)
            rows[size] = {"params": n, "mb": round(4 * n / 2**20, 1), "push_ms": round(push, 1),
                          "reload_ms": served["load_ms"], "transport_ms": round(push - served["load_ms"], 1),
                          "engine_start_s": served["start_s"]}
            print(size, rows[size], file=sys.stderr)
            ray.kill(actor)
    finally:
        ray.shutdown()
    print(json.dumps({"pushes": args.pushes, "python": python, "sizes": rows}))


if __name__ == "__main__":
    main()
