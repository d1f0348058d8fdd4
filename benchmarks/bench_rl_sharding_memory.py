"""Per-rank memory of GRPO's policy + optimizer states, replicated (DDP) vs sharded (FSDP2, ZeRO-3), 2 ranks.

    python benchmarks/bench_rl_sharding_memory.py                  # ~20M-parameter Llama, 2 iterations
    python benchmarks/bench_rl_sharding_memory.py --hidden 256 --layers 4

Run from the repository root. One freshly initialised Llama (hidden 384, 8 layers, vocabulary
8,192, untied head: ~22M parameters) is saved once as the SFT policy; `alignkit grpo` then trains
it for `--iterations` iterations under `torchrun --nproc_per_node 2` (gloo, CPU) with
`train.strategy=ddp`, with `train.strategy=fsdp2` and with `train.strategy=deepspeed` (ZeRO-3;
skipped where DeepSpeed is not installed) (`alignkit.train.rl_shard`), on the same prompts and a
reward function. After every update, each rank records:

- `state_mb`: bytes of this rank's own policy parameters, gradients and AdamW states (a DTensor
  counts its local shard; under ZeRO-3 each parameter's partition, the engine's fp32 partitions
  and their gradients), each storage once: what sharding is meant to divide;
- `rss_mb`: the peak process RSS minus the RSS before the policy was loaded. It includes what
  sharding does not divide: the full policy and reference every rank loads before sharding, the
  whole policy gathered for sampling (`Sharded.gathered`, freed after each rollout), activations,
  gloo and checkpoint buffers, allocator slack. Both sides run with glibc's `MALLOC_MMAP_THRESHOLD_=131072`, so freed large
  blocks leave the RSS (without it, FSDP2's peak RSS was 1.35x DDP's: the freed gathered policies).

The ratios are FSDP2 / DDP and ZeRO-3 / DDP of the larger of the two ranks. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_sharding_memory import _rss_mb, _state_mb  # noqa: E402


def build(root: Path, hidden: int, layers: int, vocab: int) -> None:
    """The policy (root/sft), 8 prompts and the reward function module `rl_mem_reward`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from alignkit.models.bpe import train_bpe_tokenizer
    from alignkit.models.load import save_model

    tok = train_bpe_tokenizer(["Human: What is one plus two?\nAssistant: three . four five six seven"] * 20, vocab_size=300)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, intermediate_size=4 * hidden,
                      num_attention_heads=8, num_key_value_heads=8, head_dim=hidden // 8, tie_word_embeddings=False,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    save_model(LlamaForCausalLM(cfg), tok, root / "sft")
    words = ("one", "two", "three", "four", "five", "six", "seven", "eight")
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": f"Human: What is {w} plus two?\nAssistant:"}) + "\n"
                                                for w in words))
    (root / "rl_mem_reward.py").write_text("def count_e(prompts, responses):\n    return [r.count('e') / 4 for r in responses]\n")


def worker(args) -> None:
    from alignkit.config import load_config
    from alignkit.train import grpo

    root = Path(args.root)
    sys.path.insert(0, str(root))
    rank = int(os.environ.get("RANK", "0"))
    base = _rss_mb()
    records: list[float] = []
    real_update = grpo.grpo_update

    def update(policy, ro, adv, cfg, optimizer, *rest):
        out = real_update(policy, ro, adv, cfg, optimizer, *rest)
        engines = getattr(rest[-1], "engines", None)  # rl_shard.ZeRO: the DeepSpeed engine holds the partitions
        records.append(_state_mb(engines[0] if engines else policy, optimizer))
        return out

    grpo.grpo_update = update
    cfg = load_config(grpo.Config, None, [
        f"model.path={root / 'sft'}", f"data.path={root / 'prompts.jsonl'}", f"out={root / args.strategy}",
        "reward.source=function", "reward.function=rl_mem_reward:count_e", "train.precision=fp32",
        f"train.strategy={args.strategy}", f"iterations={args.iterations}", "prompts_per_step=2", "group_size=2",
        "rollout.max_new_tokens=16", "train.batch_size=4", "train.progress=false", "train.tensorboard=false",
        "train.save_every=0",
    ])
    grpo.run(cfg)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
    Path(root, f"{args.strategy}-rank{rank}.json").write_text(json.dumps({"state_mb": max(records), "rss_mb": peak_rss}))


def launch(strategy: str, root: Path, args) -> dict:
    # glibc serves large blocks from the heap once one has been freed (its mmap threshold grows) and
    # then keeps freed memory in the process, so the RSS peak would count every buffer ever freed
    # (the gathered policy of each rollout); a fixed threshold hands large blocks back, on both sides
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "MALLOC_MMAP_THRESHOLD_": "131072",
           "DS_ACCELERATOR": "cpu", "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR",
                                                                         str(Path.home() / ".cache/alignkit-ext"))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__,
           "--worker", "--strategy", strategy, "--root", str(root), "--iterations", str(args.iterations)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{strategy} failed:\n{done.stderr[-3000:]}")
    ranks = [json.loads((root / f"{strategy}-rank{r}.json").read_text()) for r in (0, 1)]
    return {k: max(r[k] for r in ranks) for k in ("state_mb", "rss_mb")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--strategy", default="ddp")
    ap.add_argument("--root")
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--iterations", type=int, default=2)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build(root, args.hidden, args.layers, args.vocab)
        from safetensors.torch import load_file

        n_params = sum(t.numel() for t in load_file(root / "sft" / "model.safetensors").values())
        import importlib.util

        strategies = ["ddp", "fsdp2"] + (["deepspeed"] if importlib.util.find_spec("deepspeed") else [])
        res = {s: launch(s, root, args) for s in strategies}
    for s, r in res.items():
        print(f"grpo {s:6s} params {n_params / 1e6:.1f}M  policy+grads+AdamW {r['state_mb']:.0f} MB"
              f"  peak rss {r['rss_mb']:.0f} MB (max over 2 ranks)")
    summary = {"params_m": round(n_params / 1e6, 2), "ddp_state_mb": round(res["ddp"]["state_mb"], 1)}
    for s, key in (("fsdp2", "fsdp2"), ("deepspeed", "zero3")):
        if s in res:
            summary[f"{key}_state_ratio"] = round(res[s]["state_mb"] / res["ddp"]["state_mb"], 3)
            summary[f"{key}_rss_ratio"] = round(res[s]["rss_mb"] / res["ddp"]["rss_mb"], 3)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
