"""Per-rank memory of model + optimizer states under DDP, FSDP2 and DeepSpeed ZeRO-3, 2 ranks.

    python benchmarks/bench_sharding_memory.py                 # ~20M-parameter Llama, 3 steps
    python benchmarks/bench_sharding_memory.py --hidden 256 --layers 4 --precisions fp32

Run from the repository root. Each strategy trains the same freshly initialised Llama for
`--steps` steps of alignkit's loop (`train.strategy=...`) on random tokens, launched with
`torchrun --nproc_per_node 2` on CPU (gloo). Every rank records, at the start of each step after
the first (weights and AdamW states exist; gradients are freed between steps):

- `state_mb`: bytes of this rank's own parameter, gradient and optimizer-state tensors (a
  DTensor counts its local shard; DeepSpeed's fp32 partitions and their Adam moments are read
  from its optimizer), each storage once: what the strategy is meant to divide;
- `rss_mb`: the process RSS minus the RSS before the model was built (allocator slack, the
  gloo buffers and the one-off full model every rank builds before sharding included).

Side by side, in `train.precision` fp32 and bf16 (bf16: DDP and FSDP2 autocast over fp32 weights;
DeepSpeed keeps bf16 parameter partitions and fp32 master partitions). In fp32, ZeRO-3 runs twice:
as alignkit runs it (the fp32 master partition is the parameter partition,
`strategy.share_fp32_master`) and as DeepSpeed 0.19.8 does by itself (`deepspeed-copy`: a second
fp32 copy of each partition).

The ratios are FSDP2 / DDP and ZeRO-3 / DDP of the larger of the two ranks, in the same precision.
Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _storage_bytes(tensors, seen: set) -> int:
    total = 0
    for t in tensors:
        if t is None or not isinstance(t, torch.Tensor):
            continue
        if type(t).__name__ == "DTensor":
            t = t.to_local()
        if t.numel() == 0:
            continue
        key = t.untyped_storage().data_ptr()
        if key in seen:
            continue
        seen.add(key)
        total += t.untyped_storage().nbytes()
    return total


def _state_mb(model, optimizer) -> float:
    seen: set = set()
    params = list(model.parameters())
    tensors = [getattr(p, "ds_tensor", p) for p in params] + [p.grad for p in params]
    opt = getattr(optimizer, "optimizer", optimizer)
    for st in opt.state.values():
        tensors += list(st.values())
    inner = getattr(model, "optimizer", None)  # a DeepSpeed engine's ZeRO optimizer
    for name in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups"):
        for t in getattr(inner, name, []) or []:
            tensors += [t, t.grad]
    if inner is not None:
        for st in getattr(getattr(inner, "optimizer", None), "state", {}).values():
            tensors += list(st.values())
    return _storage_bytes(tensors, seen) / 2**20


def worker(args) -> None:
    from alignkit.config import TrainConfig
    from alignkit.models.load import tiny_llama
    from alignkit.train import loop, strategy

    shared: list[int] = []
    real_share = strategy.share_fp32_master

    def share(zero):  # records the master bytes alignkit frees; deepspeed-copy keeps DeepSpeed's copy
        shared.append(0 if args.strategy == "deepspeed-copy" else real_share(zero))
        return shared[-1]

    strategy.share_fp32_master = share

    rank = int(os.environ.get("RANK", "0"))
    base = _rss_mb()
    torch.manual_seed(0)
    model = tiny_llama("nano", vocab_size=args.vocab)
    cfg_model = model.config
    cfg_model.hidden_size, cfg_model.num_hidden_layers = args.hidden, args.layers
    cfg_model.intermediate_size, cfg_model.num_attention_heads = args.hidden * 4, 8
    cfg_model.num_key_value_heads, cfg_model.head_dim = 8, args.hidden // 8
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(cfg_model)
    n_params = sum(p.numel() for p in model.parameters())
    data = [torch.randint(0, args.vocab, (64,)) for _ in range(32)]
    records: list[dict] = []

    def collate(rows):
        ids = torch.stack(rows)
        return {"input_ids": ids, "labels": ids}

    def step(m, batch, _n=[0]):  # noqa: B006 (a call counter)
        _n[0] += 1
        if _n[0] > 1:
            records.append({"state_mb": _state_mb(m, opt_box[0]), "rss_mb": _rss_mb() - base})
        out = m(input_ids=batch["input_ids"], labels=batch["labels"])
        n = batch["labels"][:, 1:].numel()
        return loop.StepOutput(loss=out.loss * n, weight=n)

    opt_box: list = []
    real_build = loop.build_optimizer

    def build(params, cfg):
        opt = real_build(params, cfg)
        opt_box.append(opt)
        return opt

    loop.build_optimizer = build
    cfg = TrainConfig(lr=1e-4, batch_size=4, max_steps=args.steps, precision=args.precision, progress=False,
                      tensorboard=False, log_every=1, strategy=args.strategy.split("-")[0], zero_stage=3,
                      overwrite=True)
    loop.train(model, step, data, collate, lambda e: [list(range(i, i + 4)) for i in range(0, 32, 4)], cfg,
               args.out, weight_fn=lambda b: float(b["labels"][:, 1:].numel()))
    peak = {k: max(r[k] for r in records) for k in ("state_mb", "rss_mb")}
    Path(args.out, f"mem-rank{rank}.json").write_text(json.dumps({**peak, "params": n_params,
                                                                 "shared_master_mb": sum(shared) / 2**20}))


def launch(strategy: str, precision: str, args, out: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__,
           "--worker", "--strategy", strategy, "--precision", precision, "--out", str(out), "--hidden", str(args.hidden),
           "--layers", str(args.layers), "--vocab", str(args.vocab), "--steps", str(args.steps)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{strategy} failed:\n{done.stderr[-3000:]}")
    ranks = [json.loads((out / f"mem-rank{r}.json").read_text()) for r in (0, 1)]
    return {k: max(r[k] for r in ranks) for k in ("state_mb", "rss_mb", "params", "shared_master_mb")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--strategy", default="ddp")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--precisions", default="fp32,bf16", help="the precisions to compare, side by side")
    ap.add_argument("--out")
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    summary: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for precision in args.precisions.split(","):
            strategies = ["ddp", "fsdp2", "deepspeed"] + (["deepspeed-copy"] if precision == "fp32" else [])
            res = {}
            for strategy in strategies:
                r = res[strategy] = launch(strategy, precision, args, Path(tmp) / f"{strategy}-{precision}")
                print(f"{precision} {strategy:15s} params {r['params'] / 1e6:.1f}M  state {r['state_mb']:.0f} MB"
                      f"  rss {r['rss_mb']:.0f} MB  master shared {r['shared_master_mb']:.0f} MB"
                      " (max over 2 ranks)", flush=True)
            ddp = res["ddp"]
            pre = "" if precision == "fp32" else f"{precision}_"  # the fp32 keys keep their earlier names
            summary["params_m"] = round(ddp["params"] / 1e6, 2)
            summary[f"{pre}ddp_state_mb"] = round(ddp["state_mb"], 1)
            for name, key in (("fsdp2", "fsdp2"), ("deepspeed", "zero3"), ("deepspeed-copy", "zero3_copy")):
                if name in res:
                    summary[f"{pre}{key}_state_ratio"] = round(res[name]["state_mb"] / ddp["state_mb"], 3)
                    summary[f"{pre}{key}_rss_ratio"] = round(res[name]["rss_mb"] / ddp["rss_mb"], 3)
            summary[f"{pre}zero3_shared_master_mb"] = round(res["deepspeed"]["shared_master_mb"], 1)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
