"""Real-shape LM-head benchmark: vocab 32k / 128k, sequences 512 / 2,048, narrow model.

    python benchmarks/bench_real_shapes.py                                   # all shapes, SFT + DPO
    python benchmarks/bench_real_shapes.py --vocabs 131072 --lens 2048 --stages sft

A Llama of hidden 256, 4 layers (4 heads, MLP 1024), seed 0, built identically on every side;
one random-token row of `--len` tokens per step (a quarter of it prompt, labels -100 there),
fp32, AdamW lr 1e-5, `--steps` optimizer steps of which the first is warm-up. Each side runs in
its OWN subprocess, so its peak RSS (ru_maxrss minus the RSS before the model is built) is its
own. Sides:

  sft   alignkit `sft_step` with the chunked head (train.logprob_chunk 1024), alignkit with full
        logits (logprob_chunk 0), and TRL's SFTTrainer (its defaults: fused LM head, loss
        "nll", completion-only loss) on the same token ids, timed by a step callback.
  dpo   one pair (chosen and rejected rows of `--len` tokens sharing the prompt): alignkit's
        DPO step (policy pass + frozen-copy reference pass through `response_logps`, sigmoid
        loss, beta 0.1) chunked and with full logits.

Loss agreement: each side's loss on the first batch at the initial weights. The last line is
one JSON object with per-shape figures and alignkit / other ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocabs", default="32768,131072")
    ap.add_argument("--lens", default="512,2048")
    ap.add_argument("--stages", default="sft,dpo")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--vocab", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--len", type=int, default=0, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build_model(vocab: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).float()


def rows(vocab: int, n: int, length: int, seed: int = 1):
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n, length), generator=g)


def worker(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    side = args.worker
    base = _rss_mb()
    model = build_model(args.vocab)
    L, P = args.len, args.len // 4
    opt_lr = 1e-5
    times: list[float] = []
    if side.startswith("trl"):
        return trl_sft(args, model, base)
    from alignkit.data.batching import SFTBatch
    from alignkit.train.sft import sft_step

    chunk = 0 if side.endswith("full") else 1024
    opt = torch.optim.AdamW(model.parameters(), lr=opt_lr, weight_decay=0.0)
    if args.stage == "sft":
        ids = rows(args.vocab, 1, L)
        labels = ids.clone()
        labels[:, :P] = -100
        batch = SFTBatch(ids, torch.ones_like(ids), labels)

        def loss_fn():
            out = sft_step(model, batch, chunk=chunk)
            return out.loss / out.weight
    else:
        import copy

        from alignkit.losses.preference import get_preference_loss
        from alignkit.train.reference import response_logps

        ref = copy.deepcopy(model).eval().requires_grad_(False)
        pair = rows(args.vocab, 2, L)
        pair[1, :P] = pair[0, :P]
        labels = pair.clone()
        labels[:, :P] = -100
        mask = torch.ones_like(pair)
        loss_impl = get_preference_loss("sigmoid")

        def loss_fn():
            pol, _ = response_logps(model, pair, mask, labels, logprob_chunk=chunk)
            with torch.no_grad():
                r, _ = response_logps(ref, pair, mask, labels, logprob_chunk=chunk)
            out = loss_impl(pol[:1], pol[1:], r[:1], r[1:], beta=0.1)
            losses = out[0] if isinstance(out, tuple) else out
            return losses.mean()

    first = None
    for _ in range(args.steps):
        t0 = time.perf_counter()
        loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        first = float(loss) if first is None else first
    return _result(args, times, first, base)


def _result(args, times, loss, base) -> dict:
    steady = times[1:] or times
    step_s = sorted(steady)[len(steady) // 2]
    n = args.len * (2 if args.stage == "dpo" else 1)
    return {"side": args.worker, "stage": args.stage, "vocab": args.vocab, "len": args.len, "loss": loss,
            "step_s": step_s, "tokens_per_s": n / step_s, "peak_rss_mb": _peak_mb() - base}


def trl_sft(args, model, base) -> dict:
    import torch
    from datasets import Dataset
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast, TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from trl import SFTConfig, SFTTrainer

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({f"t{i}": i for i in range(args.vocab)}, unk_token="t0")),
        pad_token="t0", bos_token="t1", eos_token="t2")
    L, P = args.len, args.len // 4
    ids = rows(args.vocab, 1, L)[0].tolist()
    ds = Dataset.from_dict({"input_ids": [ids] * args.steps, "completion_mask": [[0] * P + [1] * (L - P)] * args.steps})
    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            times.append(time.perf_counter())

        def on_train_end(self, *a, **k):
            times.append(time.perf_counter())

    cfg = SFTConfig(output_dir=f"/tmp/bench_real_trl_{os.getpid()}", per_device_train_batch_size=1,
                    max_steps=args.steps, learning_rate=1e-5, lr_scheduler_type="constant", weight_decay=0.0,
                    max_grad_norm=0.0, seed=0, bf16=False, fp16=False, completion_only_loss=True,
                    max_length=None, report_to="none", save_strategy="no", logging_steps=args.steps + 1,
                    disable_tqdm=True, use_cpu=True, dataloader_num_workers=0)
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok, callbacks=[Timer()])
    trainer.remove_callback(PrinterCallback)
    inputs = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[0]]))
    n = int((inputs["labels"][:, 1:] != -100).sum())
    with torch.no_grad():
        loss = float(trainer.compute_loss(trainer.model, inputs, num_items_in_batch=n))
    trainer.train()
    steps = [b - a for a, b in zip(times, times[1:])]
    return _result(args, steps, loss, base)


def spawn(args, stage: str, side: str, vocab: int, length: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", side, "--vocab", str(vocab), "--len", str(length),
           "--steps", str(args.steps), "--threads", str(args.threads), "--stages", stage]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(args.threads)}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        return {"side": side, "error": p.stderr.strip().splitlines()[-1:] if p.stderr else "failed"}
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    args = parse_args()
    if args.worker:
        args.stage = args.stages
        print(json.dumps(worker(args)))
        return
    load = os.getloadavg()
    results = []
    sides = {"sft": ["alignkit", "alignkit_full", "trl"], "dpo": ["alignkit", "alignkit_full"]}
    for stage in args.stages.split(","):
        for vocab in map(int, args.vocabs.split(",")):
            for length in map(int, args.lens.split(",")):
                got = {s: spawn(args, stage, s, vocab, length) for s in sides[stage]}
                row = {"stage": stage, "vocab": vocab, "len": length, "runs": got}
                ak = got["alignkit"]
                for other in sides[stage][1:]:
                    o = got[other]
                    if "error" in ak or "error" in o:
                        continue
                    row[f"vs_{other}"] = {"throughput_ratio": round(ak["tokens_per_s"] / o["tokens_per_s"], 3),
                                          "peak_mem_ratio": round(ak["peak_rss_mb"] / o["peak_rss_mb"], 3),
                                          "loss_abs_diff": abs(ak["loss"] - o["loss"])}
                print(json.dumps(row), file=sys.stderr, flush=True)
                results.append(row)
    print(json.dumps({"bench": "real_shapes", "load_avg_before": load, "load_avg_after": os.getloadavg(),
                      "steps": args.steps, "threads": args.threads, "results": results}))


if __name__ == "__main__":
    main()
