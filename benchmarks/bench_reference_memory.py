"""Peak memory and time per step of DPO's three reference modes, side by side, one model.

    python benchmarks/bench_reference_memory.py                  # 34M-parameter model, 10 steps
    python benchmarks/bench_reference_memory.py --preset tiny --steps 30

Run from the repository root. One world (seed 0), one BPE tokenizer, one freshly initialised
`--preset` Llama saved once; every run trains `--steps` DPO steps of `--batch-size` pairs with
alignkit's `dpo.run` from those weights, each in a FRESH subprocess so its peak RSS is its own:

  full fine-tuning:  reference "copy" (a second frozen model) and "precomputed" (a cached table,
                     no reference model during training);
  LoRA (r = --lora-r, all linear layers): "copy", "precomputed" and "lora" (the adapter switched
                     off: no copy). With the same trainable parameters, the three differ only in
                     how the reference is obtained.

Memory, two ways. `tensor_mb`: the bytes held in model-state tensors at the start of the last
step (policy weights, the reference copy or the cached table, the optimizer's state; gradients
are freed between steps, so the backward adds one copy of the trainable weights on top), each
storage counted once: exact, and what the reference mode changes. Peak RSS: the process's
sampled RSS from just before the model is loaded, minus the RSS at that moment (imports and
data excluded); `train_peak_mb` up to the start of the last step (set-up, precomputing and
training), `peak_mb` to the end of the run (final checkpoint and model export included). RSS
also holds what the allocator keeps after loading (file pages, freed temporaries), so it sits
a few hundred MB above the tensors and is noisier.

Time per step is steady state: the mean over the steps after the first `--skip`, timed at the
start of every step; CPU time is reported too (with --threads 1 it is robust to other load on
the machine). The precomputing pass (and any cache read) happens before the first step and is
reported as setup_s. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
# "medium" (34M parameters, 134 MB in fp32) is big enough that weights, gradients and AdamW
# state dominate the memory of a short-sequence batch, so the reference's cost shows.
MEDIUM = dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, intermediate_size=2048)
RUNS = [("full", "copy"), ("full", "precomputed"), ("lora", "copy"), ("lora", "precomputed"), ("lora", "lora")]


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="medium", help="'medium' or a preset of alignkit.models.load.PRESETS")
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--pairs", type=int, default=400, help="world preference pairs (used for training)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--skip", type=int, default=2)
    ap.add_argument("--lora-r", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def prepare(args, work: Path) -> dict:
    from alignkit.models.bpe import train_bpe_tokenizer
    from alignkit.models.load import save_model
    from alignkit.world import write_world

    world = work / "world"
    if not (world / "preferences.jsonl").is_file():
        write_world(world, seed=0, n_pairs=args.pairs, n_sft=100, n_pretrain=500, n_eval=10, n_pairs_eval=10)
    model_dir = work / f"model-{args.preset}-{args.vocab}"
    if not (model_dir / "config.json").is_file():
        texts = [json.loads(line)["text"] for line in (world / "pretrain.jsonl").read_text().splitlines()]
        tok = train_bpe_tokenizer(texts, vocab_size=args.vocab)
        save_model(build(args.preset, tok), tok, model_dir)
    return {"data": str(world / "preferences.jsonl"), "model": str(model_dir)}


def build(preset: str, tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    from alignkit.models.load import MAX_POSITIONS, tiny_llama

    if preset != "medium":
        return tiny_llama(preset, tokenizer=tok, seed=0)
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), max_position_embeddings=MAX_POSITIONS, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **MEDIUM,
    ))


def preimport() -> None:
    """Import what a run would import lazily, so the RSS baseline already holds the libraries."""
    import accelerate  # noqa: F401
    import peft  # noqa: F401
    import safetensors.torch  # noqa: F401
    import tqdm.auto  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM  # noqa: F401


def tensor_mb(policy, reference) -> float:
    """MB held in model-state tensors: policy weights (and gradients, if any are held), the
    reference (copy or cached table) and the optimizer's state, each storage counted once."""
    import gc

    tensors = [p for p in policy.parameters()] + [p.grad for p in policy.parameters() if p.grad is not None]
    tensors += list(getattr(reference, "model", torch.nn.Module()).parameters())
    tensors += list(getattr(reference, "table", {}).values())
    for obj in gc.get_objects():
        if isinstance(obj, torch.optim.Optimizer):
            tensors += [v for st in obj.state.values() for v in st.values() if isinstance(v, torch.Tensor)]
    seen = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(seen.values()) / 2**20


def _rss_mb() -> float:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(args, paths) -> dict:
    from alignkit.config import DataConfig, ModelConfig, TrainConfig
    from alignkit.memory import PeakMemory
    from alignkit.train import dpo

    policy, mode = args.worker.split("/")
    stamps: list[tuple[float, float]] = []
    peaks: list[float] = []
    mem = PeakMemory(interval=0.005)
    make = dpo.make_preference_step

    held: list[float] = []

    def timed(cfg, reference):
        step = make(cfg, reference)

        def wrapped(model, batch):
            stamps.append((time.perf_counter(), time.process_time()))
            peaks.append(mem.peak_mb)
            if len(stamps) == args.steps:  # optimizer state exists from the second step on
                held.append(tensor_mb(model, reference))
            return step(model, batch)

        return wrapped

    dpo.make_preference_step = timed
    out = Path(args.workdir) / f"run-{policy}-{mode}"
    cfg = dpo.Config(
        model=ModelConfig(path=paths["model"], lora_r=args.lora_r if policy == "lora" else 0),
        data=DataConfig(path=paths["data"], max_prompt_len=64, max_len=128),
        train=TrainConfig(lr=1e-4, batch_size=args.batch_size, max_steps=args.steps, schedule="linear",
                          progress=False, tensorboard=False, log_every=10, overwrite=True),
        reference=mode, cache_dir=str(out / f"cache-{time.time_ns()}"), out=str(out),
    )
    preimport()  # library imports are not the run's memory
    base = _rss_mb()
    t0 = time.perf_counter()
    with mem:
        res = dpo.run(cfg)
    n = len(stamps) - 1 - args.skip
    return {
        "policy": policy, "mode": mode, "steps": res["steps"],
        "tensor_mb": held[-1],
        "peak_mb": mem.peak_mb - base,
        "train_peak_mb": peaks[-1] - base,
        "step_s": (stamps[-1][0] - stamps[args.skip][0]) / n,
        "step_cpu_s": (stamps[-1][1] - stamps[args.skip][1]) / n,
        "setup_s": stamps[0][0] - t0,
        "final_loss": res["final_loss"],
    }


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    if args.workdir is None:
        args.workdir = tempfile.mkdtemp(prefix="bench_refmem_")
    paths = prepare(args, Path(args.workdir))
    if args.worker:
        print(json.dumps(worker(args, paths)))
        return

    from alignkit.models.load import load_model

    weights_mb = sum(p.numel() * p.element_size() for p in load_model(paths["model"]).parameters()) / 2**20
    rows = []
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               TQDM_DISABLE="1", TOKENIZERS_PARALLELISM="false")
    for policy, mode in RUNS:
        cmd = [sys.executable, __file__, "--worker", f"{policy}/{mode}"]
        for k in ("preset", "vocab", "pairs", "batch_size", "steps", "skip", "lora_r", "threads", "workdir"):
            cmd += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"{policy}/{mode} failed:\n{proc.stderr[-4000:]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"{policy:5s} {mode:12s} tensors {r['tensor_mb']:7.1f} MB  RSS peak +{r['train_peak_mb']:7.1f} MB  "
              f"{1000 * r['step_s']:7.1f} ms/step "
              f"({1000 * r['step_cpu_s']:7.1f} cpu-ms)  setup {r['setup_s']:5.1f}s", flush=True)
    print(json.dumps({
        "preset": args.preset, "weights_mb": weights_mb, "batch_size": args.batch_size, "steps": args.steps,
        "threads": args.threads, "device": "cpu",
        "runs": {f"{r['policy']}/{r['mode']}": {k: r[k] for k in ("tensor_mb", "train_peak_mb", "peak_mb", "step_s", "step_cpu_s", "setup_s")}
                 for r in rows},
    }))


if __name__ == "__main__":
    main()
