"""SFT side by side: alignkit's SFT step and training loop against TRL's SFTTrainer.

    python benchmarks/bench_sft.py                          # tiny preset, batch 32, 40 steps, 3 rounds
    python benchmarks/bench_sft.py --steps 300 --rounds 3 --preset small --threads 0

Needs `pip install trl` (it brings `datasets`). Run from the repository root after
`pip install -e .` (or with PYTHONPATH=.).

One process, one world (`write_world(seed=0)`), one BPE tokenizer trained on its pre-training
corpus, one freshly initialised model saved once to disk: every run below loads those same
initial weights. Both sides see the same token ids: TRL gets a pre-tokenised dataset
(`input_ids` + `completion_mask`, built from `tokenize_sft`), so its tokenisation is skipped.

1. Loss parity. The first `--batch-size` examples, in file order, go through alignkit's
   `collate_sft` + `sft_step` and through TRL's collator + `SFTTrainer.compute_loss`. Both are
   the mean next-token NLL over the batch's response tokens (EOS included): alignkit divides its
   summed loss by its token count, TRL gets `num_items_in_batch` = the same count, as its
   `Trainer` passes it during training. The padded batches are checked to be identical first.

2. Throughput. `--rounds` rounds, alternating which side goes first, each training
   `--steps` optimizer steps of `--batch-size` examples from the same initial weights:
   alignkit's `train` (bucketed batches, progress bar and TensorBoard off, save_every=0; it still
   writes its final checkpoint and model, inside the timed call) against `SFTTrainer.train()`
   (random batches padded to their longest member). Tokens/s counts NON-PADDING input tokens
   (prompt + response + EOS) of the batches each side trained on, over the wall time of the
   `train` call (also per CPU-second of this process, which other processes on a shared machine
   disturb less). Same lr, linear decay, no warm-up, AdamW betas, weight decay 0, clipping 1.0,
   fp32, seed 0. Both sides run with `--threads` torch threads, 1 by default: on a small machine
   shared with other jobs, one thread per core stalls at every parallel region whenever another
   process holds a core (measured here: 2 threads on 2 busy cores, 5 s per step instead of 0.2 s,
   on either side at random), while one thread gives steady ratios.

   TRL settings changed from SFTConfig's defaults, and why: report_to="none",
   save_strategy="no", logging_steps > steps, disable_tqdm and no PrinterCallback (no
   logging/saving overhead, as for alignkit); bf16=False (fp32 on both sides); completion_only_loss=True (a pre-tokenised
   dataset otherwise trains on the prompt too); gradient_checkpointing=False unless
   --trl-gradient-checkpointing (TRL's default recomputes activations, a memory trade alignkit
   does not make; off, both sides do the same arithmetic). Everything else (its fused-AdamW
   optimizer, fused LM head, random sampler, dataloader) is TRL's default.

Prints the loss check and the table of runs, then as the last line one JSON object:
speedup_vs_trl (median per-round ratio of tokens/s), loss_abs_diff, tokens_per_s_alignkit and
tokens_per_s_trl (medians), steps, speedup_vs_trl_cpu_time (the same ratio per CPU-second).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from alignkit.config import TrainConfig
from alignkit.data.batching import bucketed_batches, collate_sft, padding_fraction
from alignkit.data.load import load_records
from alignkit.data.tokenize import TruncationLimits, tokenize_sft
from alignkit.models.bpe import train_bpe_tokenizer
from alignkit.models.load import PRESETS, load_model, save_model, tiny_llama
from alignkit.train.loop import train
from alignkit.train.sft import sft_step
from alignkit.world import write_world


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny", choices=list(PRESETS))
    ap.add_argument(
        "--vocab", type=int, default=1024, help="BPE vocabulary size (the demo's pretrain preset)"
    )
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=40, help="optimizer steps per timed run")
    ap.add_argument("--rounds", type=int, default=3, help="timed runs per side, alternating who goes first")
    ap.add_argument("--warmup-steps", type=int, default=3, help="untimed steps per side before the rounds")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--max-prompt-len", type=int, default=64)
    ap.add_argument("--max-len", type=int, default=128)
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads for both sides (0: torch's default, one per core)",
    )
    ap.add_argument("--trl-gradient-checkpointing", action="store_true", help="keep TRL's default of True")
    ap.add_argument(
        "--workdir", default=None, help="keep the world, tokenizer and runs here (default: a temp dir)"
    )
    return ap.parse_args()


def prepare(args: argparse.Namespace, work: Path):
    """World, tokenizer, tokenised SFT items and the saved initial model."""
    paths = write_world(work / "world", seed=0, n_pairs=100)["paths"]
    with open(paths["pretrain"], encoding="utf-8") as f:
        corpus = [json.loads(line)["text"] for line in f]
    tok = train_bpe_tokenizer(corpus, vocab_size=args.vocab)
    records = load_records(paths["sft"], kind="sft").records
    limits = TruncationLimits(max_prompt_len=args.max_prompt_len, max_len=args.max_len)
    items, _ = tokenize_sft(tok, records, limits)
    init_dir = work / "init"
    save_model(tiny_llama(args.preset, tokenizer=tok, seed=0), tok, init_dir)
    return tok, items, init_dir


def trl_dataset(items):
    from datasets import Dataset

    return Dataset.from_dict(
        {
            "input_ids": [it.prompt_ids + it.response_ids for it in items],
            "completion_mask": [[0] * len(it.prompt_ids) + [1] * len(it.response_ids) for it in items],
        }
    )


class CountingCollator:
    """Wraps TRL's collator to record (padded positions, real tokens) of every batch it builds."""

    def __init__(self, inner):
        self.inner, self.shapes = inner, []

    def __call__(self, examples):
        out = self.inner(examples)
        mask = out["attention_mask"]
        self.shapes.append((mask.numel(), int(mask.sum())))
        return out


def make_trl(args, tok, dataset, init_dir: Path, out_dir: Path, steps: int):
    from transformers.trainer_callback import PrinterCallback
    from trl import SFTConfig, SFTTrainer

    config = SFTConfig(
        output_dir=str(out_dir),
        per_device_train_batch_size=args.batch_size,
        max_steps=steps,
        learning_rate=args.lr,
        lr_scheduler_type="linear",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        seed=0,
        bf16=False,
        fp16=False,
        completion_only_loss=True,
        gradient_checkpointing=args.trl_gradient_checkpointing,
        report_to="none",
        save_strategy="no",
        logging_steps=steps + 1,
        disable_tqdm=True,
    )
    model = load_model(init_dir)
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tok)
    trainer.remove_callback(PrinterCallback)  # it prints the final metrics dict
    trainer.data_collator = CountingCollator(trainer.data_collator)
    return trainer


def ak_config(args, steps: int) -> TrainConfig:
    return TrainConfig(
        lr=args.lr,
        weight_decay=0.0,
        schedule="linear",
        warmup_steps=0,
        batch_size=args.batch_size,
        max_steps=steps,
        max_grad_norm=1.0,
        precision="fp32",
        seed=0,
        save_every=0,
        log_every=0,
        overwrite=True,  # a rerun in the same --workdir replaces its old run
        progress=False,
        tensorboard=False,
    )


def loss_parity(args, tok, items, dataset, init_dir: Path, work: Path) -> dict:
    """Loss of the first batch (file order) under both implementations, same initial weights."""
    first = items[: args.batch_size]
    batch = collate_sft(first, tok.pad_token_id)
    model = load_model(init_dir)
    model.train()
    with torch.no_grad():
        out = sft_step(model, batch)
    n_resp = int(out.weight)
    loss_ak = float(out.loss) / n_resp

    trainer = make_trl(args, tok, dataset, init_dir, work / "trl_parity", steps=1)
    ds = trainer.train_dataset
    inputs = trainer.data_collator.inner([ds[i] for i in range(len(first))])
    same = (
        torch.equal(inputs["input_ids"], batch.input_ids)
        and torch.equal(inputs["attention_mask"], batch.attention_mask)
        and torch.equal(inputs["labels"], batch.labels)
    )
    if not same:
        raise AssertionError("TRL's collated first batch differs from alignkit's collate_sft")
    n_trl = int((inputs["labels"][:, 1:] != -100).sum())
    trainer.model.train()
    inputs = trainer._prepare_inputs(inputs)
    with torch.no_grad():
        loss_trl = float(trainer.compute_loss(trainer.model, inputs, num_items_in_batch=n_trl))
    return {
        "loss_alignkit": loss_ak,
        "loss_trl": loss_trl,
        "abs_diff": abs(loss_ak - loss_trl),
        "response_tokens": n_resp,
        "response_tokens_trl": n_trl,
        "batch_shape": tuple(batch.input_ids.shape),
    }


def run_alignkit(args, tok, items, init_dir: Path, out_dir: Path, steps: int) -> dict:
    lengths = [len(it) for it in items]

    def plan(epoch: int) -> list[list[int]]:
        return bucketed_batches(lengths, args.batch_size, seed=0, epoch=epoch)

    used, epoch = [], 0
    while len(used) < steps:
        used += plan(epoch)[: steps - len(used)]
        epoch += 1
    model = load_model(init_dir)
    pad_id = tok.pad_token_id
    t0, c0 = time.perf_counter(), time.process_time()
    res = train(
        model, sft_step, items, lambda b: collate_sft(b, pad_id), plan, ak_config(args, steps), out_dir
    )
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    assert res.step == steps
    tokens = sum(lengths[i] for b in used for i in b)
    return {
        "wall_s": wall,
        "cpu_s": cpu,
        "tokens": tokens,
        "tokens_per_s": tokens / wall,
        "padding_fraction": padding_fraction(lengths, used),
        "final_loss": res.metrics.get("loss"),
    }


def run_trl(args, tok, dataset, init_dir: Path, out_dir: Path, steps: int) -> dict:
    trainer = make_trl(args, tok, dataset, init_dir, out_dir, steps)
    t0, c0 = time.perf_counter(), time.process_time()
    res = trainer.train()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    assert trainer.state.global_step == steps
    shapes = trainer.data_collator.shapes[:steps]  # the dataloader may collate one batch ahead
    padded, tokens = sum(s[0] for s in shapes), sum(s[1] for s in shapes)
    if tokens != trainer._total_train_tokens:
        raise AssertionError(f"token count {tokens} != TRL's own count {trainer._total_train_tokens}")
    return {
        "wall_s": wall,
        "cpu_s": cpu,
        "tokens": tokens,
        "tokens_per_s": tokens / wall,
        "padding_fraction": (padded - tokens) / padded,
        "final_loss": res.training_loss,
    }


def main() -> None:
    args = parse_args()
    warnings.filterwarnings("ignore")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        import datasets
        import trl
    except ImportError:
        sys.exit("bench_sft.py compares against TRL: pip install trl")
    datasets.disable_progress_bars()
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    tmp = None
    if args.workdir:
        work = Path(args.workdir)
        work.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="bench_sft-")
        work = Path(tmp.name)
    t_all = time.perf_counter()
    tok, items, init_dir = prepare(args, work)
    dataset = trl_dataset(items)

    parity = loss_parity(args, tok, items, dataset, init_dir, work)

    if args.warmup_steps > 0:  # first-call costs (lazy imports, allocator) stay out of the timed rounds
        run_alignkit(args, tok, items, init_dir, work / "ak_warm", args.warmup_steps)
        run_trl(args, tok, dataset, init_dir, work / "trl_warm", args.warmup_steps)

    runs: dict[str, list[dict]] = {"alignkit": [], "trl": []}
    for r in range(args.rounds):
        order = ("alignkit", "trl") if r % 2 == 0 else ("trl", "alignkit")
        for side in order:
            if side == "alignkit":
                runs[side].append(run_alignkit(args, tok, items, init_dir, work / f"ak{r}", args.steps))
            else:
                runs[side].append(run_trl(args, tok, dataset, init_dir, work / f"trl{r}", args.steps))
    ratios = [a["tokens_per_s"] / t["tokens_per_s"] for a, t in zip(runs["alignkit"], runs["trl"])]
    # tokens per CPU-second of this process: less sensitive to other processes on a shared machine
    cpu_ratios = [
        (a["tokens"] / a["cpu_s"]) / (t["tokens"] / t["cpu_s"]) for a, t in zip(runs["alignkit"], runs["trl"])
    ]

    n_params = sum(p.numel() for p in load_model(init_dir).parameters())
    print(
        f"preset={args.preset} params={n_params:,} vocab={len(tok)} examples={len(items)} "
        f"batch_size={args.batch_size} steps={args.steps} lr={args.lr} threads={torch.get_num_threads()} "
        f"torch={torch.__version__} transformers={transformers.__version__} trl={trl.__version__} "
        f"trl_gradient_checkpointing={args.trl_gradient_checkpointing}"
    )
    print()
    print(f"first-batch loss, batch {parity['batch_shape']}, {parity['response_tokens']} response tokens")
    print(f"  {'alignkit sft_step':<22} {parity['loss_alignkit']:.8f}")
    print(f"  {'TRL compute_loss':<22} {parity['loss_trl']:.8f}")
    print(f"  {'|difference|':<22} {parity['abs_diff']:.2e}")
    print()
    print("throughput (non-padding tokens per second of wall time in train())")
    print(
        f"  {'run':<12} {'seconds':>8} {'cpu s':>8} {'tokens':>8} {'tokens/s':>9} {'padding':>8} {'final loss':>10}"
    )
    for r in range(args.rounds):
        for side in ("alignkit", "trl"):
            x = runs[side][r]
            print(
                f"  {side + ' #' + str(r + 1):<12} {x['wall_s']:>8.2f} {x['cpu_s']:>8.2f} {x['tokens']:>8} "
                f"{x['tokens_per_s']:>9.0f} {x['padding_fraction']:>8.1%} {x['final_loss']:>10.4f}"
            )
    tps_ak = statistics.median(x["tokens_per_s"] for x in runs["alignkit"])
    tps_trl = statistics.median(x["tokens_per_s"] for x in runs["trl"])
    speedup = statistics.median(ratios)
    cpu_speedup = statistics.median(cpu_ratios)
    print(
        f"  alignkit / TRL tokens/s per round: {', '.join(f'{r:.2f}x' for r in ratios)}; median {speedup:.2f}x"
    )
    print(
        f"  same per CPU-second of this process: {', '.join(f'{r:.2f}x' for r in cpu_ratios)}; "
        f"median {cpu_speedup:.2f}x"
    )
    print(f"  total benchmark time {time.perf_counter() - t_all:.0f}s")
    if tmp is not None:
        tmp.cleanup()
    print(
        json.dumps(
            {
                "speedup_vs_trl": round(speedup, 3),
                "loss_abs_diff": parity["abs_diff"],
                "tokens_per_s_alignkit": round(tps_ak, 1),
                "tokens_per_s_trl": round(tps_trl, 1),
                "steps": args.steps,
                "speedup_vs_trl_cpu_time": round(cpu_speedup, 3),
            }
        )
    )


if __name__ == "__main__":
    main()
