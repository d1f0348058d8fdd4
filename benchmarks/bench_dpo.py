"""DPO side by side: alignkit's DPO stage against TRL's DPOTrainer, same model, data and settings.

    python benchmarks/bench_dpo.py                       # small preset, batch 16, 30 steps
    python benchmarks/bench_dpo.py --preset tiny --steps 60 --rounds 2

Needs `pip install trl` (it brings `datasets`). Run from the repository root.

Setup (once): the built-in world (seed 0), a BPE tokenizer trained on its texts, a freshly
initialised `--preset` Llama saved to disk; every run loads those same weights.

1. Parity. The first `--parity-pairs` pairs, tokenised by alignkit, go through alignkit's
   stage collate (each pair's prompt once, `share_prompt`) + DPO step (reference mode "copy")
   and through TRL's `DataCollatorForPreference` + `DPOTrainer._compute_loss` (its concatenated forward, fused LM
   head, separate reference model). The policy is the initial model with seeded noise added to
   every weight (the same on both sides), so the log-ratios are not all zero. Compared: loss,
   rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies, logps/chosen,
   logps/rejected (TRL's logged metrics of that batch).

2. Throughput and memory. Each configuration trains `--steps` optimizer steps of
   `--batch-size` pairs in a FRESH subprocess (so peak RSS belongs to that run alone):
   alignkit `dpo.run` (bucketed batches) and `DPOTrainer.train()` (random batches), both with
   reference "copy" (TRL's default: a second model) and "precomputed" (TRL:
   precompute_ref_log_probs=True). Same lr, linear decay, no warm-up, AdamW, weight decay 0,
   clipping 1.0, fp32, beta, seed 0, `--threads` torch threads. TRL is fed the world's text and
   tokenises it itself; the run checks its token ids equal alignkit's (`tokens_identical`).
   TRL settings changed from DPOConfig's defaults: report_to none, save_strategy no,
   disable_tqdm, bf16 False (fp32 on both sides), gradient_checkpointing False unless
   --trl-gradient-checkpointing (a memory-for-time trade alignkit does not make).

   pairs/s is steady state: (steps - skip) * batch / (time from the start of step `skip` to the
   start of the last step), timed at the start of every step on both sides (alignkit: around its
   step function; TRL: a callback's on_step_begin), so set-up, the precomputing pass and saving
   are excluded (reported separately as setup_s). Peak memory: the process's sampled RSS from
   just before the models are loaded to the end of training, minus the RSS at that moment
   (imports and raw data excluded on both sides). Rounds alternate which side runs first
   (alignkit, TRL, TRL, alignkit, ...); every figure is the median over rounds, and the
   throughput ratio is the median of the per-round ratios alignkit / TRL.

The last line is one JSON object: pairs_per_s_ratio and peak_mem_ratio are alignkit / TRL in
the same reference mode ("copy"); the "precomputed" mode and alignkit's default mode
(precomputed) against TRL's default (copy) are reported alongside.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--pairs", type=int, default=2000, help="world preference pairs")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--skip", type=int, default=5, help="steps left out of the throughput window")
    ap.add_argument("--rounds", type=int, default=3, help="alternating runs per side; medians reported")
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run (1: CPU time is meaningful)")
    ap.add_argument("--max-prompt-len", type=int, default=64)
    ap.add_argument("--max-len", type=int, default=128)
    ap.add_argument("--parity-pairs", type=int, default=8)
    ap.add_argument("--modes", default="copy,precomputed")
    ap.add_argument("--trl-gradient-checkpointing", action="store_true")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--worker", choices=["alignkit", "trl"], help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="copy", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def prepare(args, work: Path) -> dict:
    from alignkit.models.bpe import train_bpe_tokenizer
    from alignkit.models.load import save_model, tiny_llama
    from alignkit.world import write_world

    world = work / "world"
    if not (world / "preferences.jsonl").is_file():
        write_world(world, seed=0, n_pairs=args.pairs, n_sft=200, n_pretrain=500, n_eval=20, n_pairs_eval=20)
    model_dir = work / f"model-{args.preset}-{args.vocab}"
    if not (model_dir / "config.json").is_file():
        texts = [json.loads(line)["text"] for line in (world / "pretrain.jsonl").read_text().splitlines()]
        tok = train_bpe_tokenizer(texts, vocab_size=args.vocab)
        save_model(tiny_llama(args.preset, tokenizer=tok, seed=0), tok, model_dir)
    return {"data": str(world / "preferences.jsonl"), "model": str(model_dir)}


def tokenised(args, paths) -> tuple:
    from alignkit.data.load import load_records
    from alignkit.data.tokenize import TruncationLimits, tokenize_preference
    from alignkit.models.load import load_tokenizer

    tok = load_tokenizer(paths["model"])
    records = load_records(paths["data"], kind="preference").records
    items, _ = tokenize_preference(tok, records, TruncationLimits(args.max_prompt_len, args.max_len))
    return tok, records, items


def preimport() -> None:
    """Import what a run would import lazily, so the RSS baseline already holds the libraries."""
    import accelerate  # noqa: F401
    import peft  # noqa: F401
    import safetensors.torch  # noqa: F401
    import tqdm.auto  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM  # noqa: F401


def _rss_mb() -> float:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def trl_trainer(args, paths, tok, records, mode: str, out: Path, model=None, ref_model=None, steps=None):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from alignkit.models.load import load_model

    rows = [{"prompt": r.prompt, "chosen": r.chosen, "rejected": r.rejected} for r in records]
    cfg = DPOConfig(
        output_dir=str(out), per_device_train_batch_size=args.batch_size, max_steps=steps or args.steps,
        learning_rate=args.lr, lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=1.0, beta=args.beta, loss_type=["sigmoid"], max_length=args.max_len,
        precompute_ref_log_probs=mode == "precomputed", report_to="none", save_strategy="no",
        logging_steps=10, disable_tqdm=True, bf16=False, fp16=False, use_cpu=True, seed=0,
        gradient_checkpointing=args.trl_gradient_checkpointing, dataloader_num_workers=0,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return DPOTrainer(
            model=model if model is not None else load_model(paths["model"]), ref_model=ref_model,
            args=cfg, train_dataset=Dataset.from_list(rows), processing_class=tok,
        )


def parity(args, paths) -> dict:
    """Loss and metrics of one batch through both implementations."""
    from alignkit.models.load import load_model
    from alignkit.train import dpo
    from alignkit.train.reference import CopyReference

    tok, records, items = tokenised(args, paths)
    items = items[: args.parity_pairs]
    policy = load_model(paths["model"])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    policy_trl = load_model(paths["model"])
    policy_trl.load_state_dict(policy.state_dict())
    cfg = dpo.Config(beta=args.beta)
    reference = CopyReference(load_model(paths["model"]))
    ours = dpo.make_preference_step(cfg, reference)
    # the stage's own collate: one row per pair with its prompt once (share_prompt) where the model allows it
    collate = dpo.make_preference_collate(tok.pad_token_id, reference, share_prompt=dpo.sharing_prompts(cfg, policy))
    out = ours(policy, collate(list(dpo.Indexed(items))))
    a = {"loss": float(out.loss) / out.weight, **{k: v for k, v in out.metrics.items() if "/" in k}}

    with tempfile.TemporaryDirectory() as d:
        trainer = trl_trainer(args, paths, tok, records[:4], "copy", Path(d), model=policy_trl,
                              ref_model=load_model(paths["model"]))
        batch = trainer.data_collator(
            [{"prompt_ids": x.prompt_ids, "chosen_ids": x.chosen_ids, "rejected_ids": x.rejected_ids} for x in items]
        )
        trainer.model.train()
        loss = trainer._compute_loss(trainer.model, batch, False)
        b = {"loss": float(loss), **{k: v[-1] for k, v in trainer._metrics["train"].items() if k in a}}
    diffs = {k: abs(a[k] - b[k]) for k in a}
    return {"alignkit": a, "trl": b, "abs_diff": diffs, "max_abs_diff": max(diffs.values())}


def worker_alignkit(args, paths) -> dict:
    from alignkit.config import DataConfig, ModelConfig, TrainConfig
    from alignkit.memory import PeakMemory
    from alignkit.train import dpo

    stamps: list[float] = []
    make = dpo.make_preference_step

    def timed(cfg, reference):
        step = make(cfg, reference)

        def wrapped(model, batch):
            stamps.append((time.perf_counter(), time.process_time()))
            return step(model, batch)

        return wrapped

    dpo.make_preference_step = timed
    out = Path(args.workdir) / f"run-alignkit-{args.mode}"
    cfg = dpo.Config(
        model=ModelConfig(path=paths["model"]),
        data=DataConfig(path=paths["data"], max_prompt_len=args.max_prompt_len, max_len=args.max_len),
        train=TrainConfig(lr=args.lr, batch_size=args.batch_size, max_steps=args.steps, schedule="linear",
                          warmup_steps=0, max_grad_norm=1.0, seed=0, progress=False, tensorboard=False,
                          log_every=10, overwrite=True),
        beta=args.beta, reference=args.mode, cache_dir=str(out / f"cache-{time.time_ns()}"), out=str(out),
    )
    preimport()  # library imports are not the run's memory
    base = _rss_mb()
    t0 = time.perf_counter()
    with PeakMemory() as mem:
        res = dpo.run(cfg)
    return {
        "side": "alignkit", "mode": args.mode, "steps": res["steps"], "stamps": stamps, "t0": t0,
        "peak_mb": mem.peak_mb - base, "rss_base_mb": base, "padding_fraction": res["padding_fraction"],
        "final_loss": res["final_loss"],
    }


def worker_trl(args, paths) -> dict:
    from transformers import TrainerCallback

    from alignkit.memory import PeakMemory

    tok, records, items = tokenised(args, paths)
    stamps: list[float] = []

    class Stamp(TrainerCallback):
        def on_step_begin(self, *a, **k):
            stamps.append((time.perf_counter(), time.process_time()))

    preimport()
    import trl  # noqa: F401

    base = _rss_mb()
    t0 = time.perf_counter()
    with PeakMemory() as mem:
        trainer = trl_trainer(args, paths, tok, records, args.mode, Path(args.workdir) / f"run-trl-{args.mode}")
        ds = trainer.train_dataset
        same = [list(ds[i]["prompt_ids"]) == x.prompt_ids and list(ds[i]["chosen_ids"]) == x.chosen_ids
                and list(ds[i]["rejected_ids"]) == x.rejected_ids for i, x in enumerate(items)]
        trainer.add_callback(Stamp())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = trainer.train()
    lengths = [len(x) for x in items]
    return {
        "side": "trl", "mode": args.mode, "steps": out.global_step, "stamps": stamps, "t0": t0,
        "peak_mb": mem.peak_mb - base, "rss_base_mb": base, "tokens_identical": all(same) and len(ds) == len(items),
        "final_loss": out.training_loss, "mean_len": sum(lengths) / len(lengths),
    }


def summarise_run(r: dict, args) -> dict:
    s = r.pop("stamps")
    pairs = (len(s) - 1 - args.skip) * args.batch_size
    r["pairs_per_s"] = pairs / (s[-1][0] - s[args.skip][0])
    r["pairs_per_cpu_s"] = pairs / (s[-1][1] - s[args.skip][1])
    r["setup_s"] = s[0][0] - r.pop("t0")
    return r


def spawn(args, side: str, mode: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", side, "--mode", mode]
    for k in ("preset", "vocab", "pairs", "batch_size", "steps", "skip", "lr", "beta", "threads",
              "max_prompt_len", "max_len", "workdir"):
        cmd += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
    if args.trl_gradient_checkpointing:
        cmd.append("--trl-gradient-checkpointing")
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               TQDM_DISABLE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{side}/{mode} worker failed:\n{proc.stderr[-4000:]}")
    return summarise_run(json.loads(proc.stdout.strip().splitlines()[-1]), args)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    if args.workdir is None:
        args.workdir = tempfile.mkdtemp(prefix="bench_dpo_")
    work = Path(args.workdir)
    paths = prepare(args, work)
    if args.worker:
        fn = worker_alignkit if args.worker == "alignkit" else worker_trl
        print(json.dumps(fn(args, paths)))
        return

    par = parity(args, paths)
    print(f"parity on {args.parity_pairs} pairs (alignkit vs TRL):")
    for k in par["alignkit"]:
        print(f"  {k:20s} {par['alignkit'][k]: .7f} {par['trl'][k]: .7f}  |diff| {par['abs_diff'][k]:.1e}")

    modes = args.modes.split(",")
    runs: dict[tuple[str, str], list[dict]] = {}
    for rnd in range(args.rounds):
        for mode in modes:
            order = ["alignkit", "trl"] if rnd % 2 == 0 else ["trl", "alignkit"]
            for side in order:
                r = spawn(args, side, mode)
                runs.setdefault((side, mode), []).append(r)
                print(f"  round {rnd} {side:8s} {mode:11s} {r['pairs_per_s']:7.1f} pairs/s "
                      f"{r['pairs_per_cpu_s']:7.1f} pairs/cpu-s  peak +{r['peak_mb']:.0f} MB  "
                      f"setup {r['setup_s']:.1f}s  steps {r['steps']}", flush=True)
    # each figure: the median over rounds (one value per round and side)
    best = {key: {**rs[0], **{k: statistics.median(x[k] for x in rs)
                              for k in ("pairs_per_s", "pairs_per_cpu_s", "peak_mb", "setup_s")}}
            for key, rs in runs.items()}

    print(f"\nmedian of {args.rounds} rounds")
    print(f"{'side':9s} {'mode':12s} {'pairs/s':>8s} {'pairs/cpu-s':>11s} {'peak MB':>8s} {'setup s':>8s} {'steps':>6s}")
    for (side, mode), r in sorted(best.items()):
        print(f"{side:9s} {mode:12s} {r['pairs_per_s']:8.1f} {r['pairs_per_cpu_s']:11.1f} {r['peak_mb']:8.0f} "
              f"{r['setup_s']:8.1f} {r['steps']:6d}")

    def ratios(ka: tuple[str, str], kt: tuple[str, str]) -> dict:
        """Throughput: the median over rounds of the per-round ratio; memory: ratio of medians."""
        pairs = list(zip(runs[ka], runs[kt]))
        return {
            "pairs_per_s_ratio": statistics.median(a["pairs_per_s"] / t["pairs_per_s"] for a, t in pairs),
            "pairs_per_cpu_s_ratio": statistics.median(a["pairs_per_cpu_s"] / t["pairs_per_cpu_s"] for a, t in pairs),
            "peak_mem_ratio": best[ka]["peak_mb"] / best[kt]["peak_mb"],
            "per_round_pairs_per_s_ratios": [round(a["pairs_per_s"] / t["pairs_per_s"], 3) for a, t in pairs],
        }

    result: dict = {"parity_max_abs_diff": par["max_abs_diff"], "loss_abs_diff": par["abs_diff"]["loss"]}
    for mode in modes:
        a, t = best[("alignkit", mode)], best[("trl", mode)]
        if a["steps"] != t["steps"]:
            raise RuntimeError(f"step counts differ in mode {mode}: {a['steps']} vs {t['steps']}")
        result[mode] = {
            **ratios(("alignkit", mode), ("trl", mode)),
            "alignkit": {k: a[k] for k in ("pairs_per_s", "pairs_per_cpu_s", "peak_mb", "setup_s", "padding_fraction")},
            "trl": {k: t[k] for k in ("pairs_per_s", "pairs_per_cpu_s", "peak_mb", "setup_s")},
            "tokens_identical": t["tokens_identical"], "steps": a["steps"],
        }
    head = result.get("copy") or result[modes[0]]
    result.update({k: head[k] for k in ("pairs_per_s_ratio", "pairs_per_cpu_s_ratio", "peak_mem_ratio")})
    if "copy" in modes and "precomputed" in modes:
        result["defaults"] = ratios(("alignkit", "precomputed"), ("trl", "copy"))
    result.update(preset=args.preset, batch_size=args.batch_size, steps=args.steps, threads=args.threads,
                  rounds=args.rounds, device="cpu")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
