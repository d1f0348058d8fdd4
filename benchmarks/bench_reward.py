"""Reward model side by side: alignkit's reward step and training loop against TRL's RewardTrainer.

    python benchmarks/bench_reward.py                                  # fresh nano model, 30 steps x 32 pairs
    python benchmarks/bench_reward.py --model /tmp/rm_demo/sft/final --world /tmp/rm_world
    python benchmarks/bench_reward.py --preset tiny --steps 60 --rounds 3 --mode head

Needs `pip install trl` (it brings `datasets`). Run from the repository root after
`pip install -e .` (or with PYTHONPATH=.).

Setup: one world's preference pairs (`--world`, or a fresh `write_world(seed=0)`), one model
directory (`--model`, e.g. the SFT model of `alignkit demo`; or a fresh `--preset` Llama with a
BPE tokenizer trained on the world, saved once). Pairs are tokenised once by alignkit
(`tokenize_preference`, limits 64 / 128 as in configs/reward.yaml). TRL gets a pre-tokenised
dataset (`chosen_ids` = prompt + chosen ids, `rejected_ids` = prompt + rejected ids), so it
skips its own tokenisation and both sides see the same ids. TRL's model is the same checkpoint
loaded as `AutoModelForSequenceClassification(num_labels=1)`, its `score` weight copied from
alignkit's head (whose bias is zeroed: TRL's `score` has none).

1. Parity. The first `--batch-size` pairs go through alignkit's stage collate
   (`reward.make_collate`: at these lengths one row per pair with its prompt once under a tree
   attention mask, `SharedPromptPairs`) + `reward_step` and through TRL's
   `DataCollatorForPreference` + `RewardTrainer.compute_loss`, without and with the centring
   term (`--center-coef`, TRL's center_rewards_coefficient). Compared: alignkit's two-row padded
   batch against TRL's (identical), the rewards, the mean loss and the accuracy.

2. Throughput and memory. `--rounds` rounds, alternating which side goes first, each in a fresh
   subprocess (so one side's allocator state cannot help the other), each training `--steps`
   optimizer steps of `--batch-size` pairs from the same initial weights: alignkit's `train`
   (bucketed batches, progress bar and TensorBoard off; it still writes its final checkpoint and
   weights inside the timed call; accelerate and tqdm are imported before the clock starts, as
   TRL's import does) against `RewardTrainer.train()` (random batches padded to their
   longest member). pairs/s = steps x batch / wall time of the train call; the headline ratio
   is the median over rounds of each round's ratio alignkit / TRL (robust on a shared machine),
   the best-round ratio is printed too. Peak memory (median round): on CPU the peak resident set size during the train call minus the
   RSS just before it (sampled every 2 ms from /proc/self/statm); on CUDA
   `max_memory_allocated` during the call. Same lr, cosine decay, warm-up, AdamW betas, weight
   decay 0, clipping 1.0, fp32, seed 0. `--mode head` freezes the backbone on both sides.

   TRL settings changed from RewardConfig's defaults, and why: report_to="none",
   save_strategy="no", logging_steps > steps, disable_tqdm (no logging/saving overhead);
   bf16=False (fp32 on both sides); gradient_checkpointing=False (TRL's default recomputes
   activations, a memory trade alignkit does not make; off, both sides do the same arithmetic);
   max_length=None (alignkit already truncated). Everything else (sampler, dataloader,
   optimizer) is TRL's default.

Prints the tables, then as the last line one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import torch

from alignkit.config import TrainConfig
from alignkit.data.batching import bucketed_batches, collate_preference, padding_fraction
from alignkit.data.load import load_records
from alignkit.data.records import prompt_text
from alignkit.data.tokenize import TruncationLimits, tokenize_preference
from alignkit.models.bpe import train_bpe_tokenizer
from alignkit.models.heads import RewardModel
from alignkit.models.load import PRESETS, load_tokenizer, save_model, tiny_llama
from alignkit.train.loop import train
from alignkit.train.reward import make_collate, reward_step, sharing_prompts

LIMITS = TruncationLimits(max_prompt_len=64, max_len=128)


# ---------------------------------------------------------------------- shared setup
def prepare(args) -> tuple[Path, Path]:
    """(model dir, preferences file), creating a world and a fresh model when not given."""
    work = Path(args.workdir)
    if args.world:
        prefs = Path(args.world) / "preferences.jsonl"
    else:
        from alignkit.world import write_world

        write_world(work / "world", n_pairs=max(2000, args.steps * args.batch_size), n_sft=8, n_pretrain=8)
        prefs = work / "world" / "preferences.jsonl"
    if args.model:
        return Path(args.model), prefs
    pairs = load_records(prefs, kind="preference", limit=2000).records
    tok = train_bpe_tokenizer([prompt_text(p.prompt) + p.chosen + p.rejected for p in pairs], vocab_size=512)
    model_dir = work / "model"
    save_model(tiny_llama(args.preset, tokenizer=tok, seed=0), tok, model_dir)
    return model_dir, prefs


def load_items(model_dir: Path, prefs: Path, n: int):
    tok = load_tokenizer(model_dir)
    pairs = load_records(prefs, kind="preference", limit=n).records
    items, _ = tokenize_preference(tok, pairs, LIMITS)
    return tok, items


def alignkit_model(model_dir: Path, mode: str) -> RewardModel:
    rm = RewardModel.from_pretrained(model_dir, mode=mode, seed=0)
    with torch.no_grad():
        rm.head.bias.zero_()  # TRL's score layer has no bias
    return rm


def trl_model(model_dir: Path, rm: RewardModel, mode: str):
    from transformers import AutoModelForSequenceClassification

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForSequenceClassification.from_pretrained(
            str(model_dir), num_labels=1, local_files_only=True
        )
    with torch.no_grad():
        model.score.weight.copy_(rm.head.weight)
    if mode == "head":
        model.requires_grad_(False)
        model.score.requires_grad_(True)
    return model


def trl_args(args, out: str, center: float | None):
    from trl import RewardConfig

    return RewardConfig(
        output_dir=out,
        per_device_train_batch_size=args.batch_size,
        max_steps=args.steps,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        warmup_steps=args.warmup,
        weight_decay=0.0,
        max_grad_norm=1.0,
        seed=0,
        bf16=False,
        gradient_checkpointing=False,
        max_length=None,
        center_rewards_coefficient=center,
        report_to="none",
        save_strategy="no",
        logging_steps=args.steps + 1,
        disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
    )


def trl_dataset(items):
    from datasets import Dataset

    return Dataset.from_dict(
        {
            "chosen_ids": [x.prompt_ids + x.chosen_ids for x in items],
            "rejected_ids": [x.prompt_ids + x.rejected_ids for x in items],
        }
    )


# ---------------------------------------------------------------------- 1. parity
def parity(args, model_dir: Path, prefs: Path) -> dict:
    from trl import RewardTrainer

    tok, items = load_items(model_dir, prefs, args.batch_size)
    rm = alignkit_model(model_dir, args.mode).train()
    hf = trl_model(model_dir, rm, args.mode)
    ds = trl_dataset(items)
    with tempfile.TemporaryDirectory() as out, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = RewardTrainer(
            model=hf, args=trl_args(args, out, None), train_dataset=ds, processing_class=tok
        )
    batch = collate_preference(items, tok.pad_token_id)
    inputs = trainer.data_collator([ds[i] for i in range(len(items))])
    assert torch.equal(inputs["input_ids"], batch.input_ids), "padded batches differ"
    assert torch.equal(inputs["attention_mask"], batch.attention_mask), "attention masks differ"
    hf.train()
    result = {}
    ours_batch = make_collate(tok.pad_token_id, sharing_prompts(rm))(items)  # what alignkit trains on
    result["layout"] = type(ours_batch).__name__
    for center in (0.0, args.center_coef):
        trainer.args.center_rewards_coefficient = center or None
        out = reward_step(rm, ours_batch, center_coef=center)
        ours = float(out.loss.detach()) / out.weight
        theirs = float(trainer.compute_loss(hf, dict(inputs)).detach())
        acc_theirs = trainer._metrics["train"]["accuracy"][-1]
        key = "center" if center else "plain"
        result[f"loss_{key}"] = (ours, theirs)
        result[f"accuracy_{key}"] = (out.metrics["accuracy"], acc_theirs)
    with torch.no_grad():
        if result["layout"] == "SharedPromptPairs":
            r_ours = rm(ours_batch.input_ids, ours_batch.attention_mask, position_ids=ours_batch.position_ids,
                        last_index=ours_batch.last_index)
        else:
            r_ours = rm(batch.input_ids, batch.attention_mask)
        r_theirs = hf(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits.squeeze(
            -1
        )
    result["reward_abs_diff"] = float((r_ours - r_theirs).abs().max())
    return result


# ---------------------------------------------------------------------- 2. throughput (worker)
class PeakRSS:
    """Peak resident set size in a `with` block, minus the RSS at its start (MiB); CPU only."""

    def __init__(self, every_s: float = 0.002):
        self.every_s, self.peak, self.base = every_s, 0, 0
        self._stop = threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE")

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(self.every_s)

    def __enter__(self):
        self.base = self.peak = self._rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def mib(self) -> float:
        return (self.peak - self.base) / 2**20


def worker(args) -> dict:
    """Train one side for --steps steps; print one JSON line."""
    model_dir, prefs = Path(args.model), Path(args.world) / "preferences.jsonl"
    tok, items = load_items(model_dir, prefs, args.steps * args.batch_size)
    rm = alignkit_model(model_dir, args.mode)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    lengths = [len(x) for x in items]
    n_pairs = args.steps * args.batch_size
    if args.worker == "alignkit":
        cfg = TrainConfig(
            lr=args.lr,
            batch_size=args.batch_size,
            max_steps=args.steps,
            warmup_steps=args.warmup,
            schedule="cosine",
            precision="fp32",
            progress=False,
            tensorboard=False,
            log_every=args.steps,
        )

        def plan(epoch):
            return bucketed_batches(lengths, args.batch_size, seed=0, epoch=epoch)

        batches = plan(0)[: args.steps]
        import accelerate  # noqa: F401  # imported before the clock starts, as `from trl import ...` does
        import tqdm.auto  # noqa: F401

        with tempfile.TemporaryDirectory() as out:
            torch.manual_seed(0)
            t0, mem = _start(device)
            with PeakRSS() as rss:
                train(
                    rm,
                    reward_step,
                    items,
                    make_collate(tok.pad_token_id, sharing_prompts(rm)),  # the stage's collate
                    plan,
                    cfg,
                    out,
                    trainable_params=rm.trainable_parameters(),
                )
            wall = time.perf_counter() - t0
    else:
        from trl import RewardTrainer

        hf = trl_model(model_dir, rm, args.mode)
        del rm
        # TRL's random sampler; the batches it trains on are those of a seeded RandomSampler
        g = torch.Generator().manual_seed(0)
        order = torch.randperm(len(items), generator=g).tolist()
        batches = [order[i : i + args.batch_size] for i in range(0, n_pairs, args.batch_size)]
        with tempfile.TemporaryDirectory() as out, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer = RewardTrainer(
                model=hf,
                args=trl_args(args, out, None),
                train_dataset=trl_dataset(items),
                processing_class=tok,
            )
            torch.manual_seed(0)
            t0, mem = _start(device)
            with PeakRSS() as rss:
                trainer.train()
            wall = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**20 - mem if device == "cuda" else rss.mib
    return {
        "side": args.worker,
        "wall_s": wall,
        "pairs_per_s": n_pairs / wall,
        "peak_mem_mib": peak,
        "padding_fraction": padding_fraction(lengths, batches),
        "threads": torch.get_num_threads(),
        "device": device,
    }


def _start(device: str) -> tuple[float, float]:
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return time.perf_counter(), torch.cuda.memory_allocated() / 2**20
    return time.perf_counter(), 0.0


def run_worker(args, side: str, model_dir: Path, world: Path) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        side,
        "--model",
        str(model_dir),
        "--world",
        str(world),
        "--steps",
        str(args.steps),
        "--batch-size",
        str(args.batch_size),
        "--lr",
        str(args.lr),
        "--warmup",
        str(args.warmup),
        "--mode",
        args.mode,
        "--threads",
        str(args.threads),
    ]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{side} worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--model", help="model directory (causal LM + tokenizer); default: a fresh --preset model"
    )
    ap.add_argument("--world", help="world directory with preferences.jsonl; default: a fresh world")
    ap.add_argument("--preset", default="nano", choices=list(PRESETS))
    ap.add_argument("--mode", default="full", choices=["full", "head"])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--center-coef", type=float, default=0.01)
    ap.add_argument(
        "--rounds", type=int, default=3, help="timed runs per side, alternating; medians are reported"
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads on both sides (0: torch's default); 1 is steadiest on a shared machine",
    )
    ap.add_argument("--worker", choices=["alignkit", "trl"], help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    import transformers

    transformers.logging.set_verbosity_error()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(worker(args)))
        return

    with tempfile.TemporaryDirectory() as work:
        args.workdir = work
        model_dir, prefs = prepare(args)
        par = parity(args, model_dir, prefs)
        runs: dict[str, list[dict]] = {"alignkit": [], "trl": []}
        for r in range(args.rounds):
            for side in ("alignkit", "trl") if r % 2 == 0 else ("trl", "alignkit"):
                runs[side].append(run_worker(args, side, model_dir, prefs.parent))

    med = {
        side: {k: statistics.median(x[k] for x in rs) for k in ("wall_s", "pairs_per_s", "peak_mem_mib")}
        for side, rs in runs.items()
    }
    best = {side: max(x["pairs_per_s"] for x in rs) for side, rs in runs.items()}
    # the throughput ratio: median over rounds of each round's alignkit / TRL pairs/s
    round_ratios = [a["pairs_per_s"] / t["pairs_per_s"] for a, t in zip(runs["alignkit"], runs["trl"])]
    pairs = {k: v for k, v in par.items() if isinstance(v, tuple)}
    loss_diff = max(abs(v[0] - v[1]) for k, v in pairs.items() if k.startswith("loss"))
    acc_diff = max(abs(v[0] - v[1]) for k, v in pairs.items() if k.startswith("accuracy"))
    a, t = med["alignkit"], med["trl"]
    first = runs["alignkit"][0]
    print(
        f"model={model_dir} mode={args.mode} steps={args.steps} batch={args.batch_size} pairs "
        f"device={first['device']} threads={first['threads']} rounds={args.rounds}"
    )
    print("\nparity on the first batch (alignkit vs TRL)")
    print(f"{'':<18} {'alignkit':>12} {'trl':>12} {'abs diff':>10}")
    for k, v in pairs.items():
        print(f"{k:<18} {v[0]:>12.7f} {v[1]:>12.7f} {abs(v[0] - v[1]):>10.2e}")
    print(f"{'rewards (max)':<18} {'':>12} {'':>12} {par['reward_abs_diff']:>10.2e}  (alignkit layout: {par['layout']})")
    print(f"\nthroughput and peak memory (median of {args.rounds} rounds)")
    print(f"{'side':<9} {'wall s':>8} {'pairs/s':>9} {'best p/s':>9} {'peak MiB':>9} {'padding':>8}")
    for side, m in med.items():
        pad = runs[side][0]["padding_fraction"]
        print(
            f"{side:<9} {m['wall_s']:>8.2f} {m['pairs_per_s']:>9.1f} {best[side]:>9.1f} "
            f"{m['peak_mem_mib']:>9.1f} {pad:>8.3f}"
        )
    mem_ratio = a["peak_mem_mib"] / t["peak_mem_mib"] if t["peak_mem_mib"] > 0 else None
    print(
        json.dumps(
            {
                "pairs_per_s_ratio": round(statistics.median(round_ratios), 3),
                "per_round_pairs_per_s_ratios": [round(x, 3) for x in round_ratios],
                "best_pairs_per_s_ratio": round(best["alignkit"] / best["trl"], 3),
                "loss_abs_diff": loss_diff,
                "accuracy_abs_diff": acc_diff,
                "reward_abs_diff": par["reward_abs_diff"],
                "peak_mem_ratio": None if mem_ratio is None else round(mem_ratio, 3),
                "pairs_per_s_alignkit": round(a["pairs_per_s"], 1),
                "pairs_per_s_trl": round(t["pairs_per_s"], 1),
                "peak_mem_mib_alignkit": round(a["peak_mem_mib"], 1),
                "peak_mem_mib_trl": round(t["peak_mem_mib"], 1),
                "padding_alignkit": round(runs["alignkit"][0]["padding_fraction"], 4),
                "padding_trl": round(runs["trl"][0]["padding_fraction"], 4),
                "mode": args.mode,
                "device": first["device"],
            }
        )
    )


if __name__ == "__main__":
    main()
