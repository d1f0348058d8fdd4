"""GRPO step time: alignkit's `grpo` stage against TRL's GRPOTrainer, same everything, one run.

    python benchmarks/bench_grpo.py                           # tiny preset, 4 prompts x G=8, 32 tokens
    python benchmarks/bench_grpo.py --preset small --new-tokens 64 --steps 8

Both trainers get the same freshly initialised Llama (saved once to a temporary directory with
its BPE tokenizer), the same prompts (equal length), the same reward function, group size G,
completion length, learning rate, KL coefficient (k3 in the loss, so both keep a reference
model), one optimizer step per generation batch (TRL: steps_per_generation=1,
num_iterations=1; alignkit: updates_per_rollout=1, minibatch = the whole batch) and
token-level loss normalisation (TRL loss_type "dapo" = alignkit loss_agg "token-mean").
A step is: sample prompts x G responses, score them, reference log-probs, one update.

Both run in this process with the same torch thread count (--threads, 1 by default: with
several threads on CPUs that other processes also use, a step sometimes takes 10x longer
while a thread waits for a descheduled sibling, which swamps the comparison).
The two trainers alternate for --rounds rounds (alignkit, TRL, TRL, alignkit, ...) so that load
from other processes hits both; the first step of every run is a warm-up and not counted.
Reported: median seconds per step of each side over all rounds, mean completion length (so a
difference in generated tokens is visible), and the ratio TRL / alignkit: the median over
rounds of each round's ratio of median step times; the same for the process's CPU seconds per
step (`time.process_time`; TRL: between its step callbacks; alignkit: between the ends of two
iterations), which time spent waiting for a core on a shared machine does not inflate.
Needs `trl` and `datasets` (benchmark-only dependencies). Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

REWARD_CHAR = "e"


def reward_fn(prompts, completions, **kwargs):
    """Fraction of the characters of a completion that are REWARD_CHAR (same for both trainers)."""
    return [c.count(REWARD_CHAR) / max(1, len(c)) for c in completions]


def make_assets(root: Path, preset: str, vocab: int, n_prompts: int, prompt_words: int) -> tuple[Path, Path, list[str]]:
    from alignkit.models.bpe import train_bpe_tokenizer
    from alignkit.models.load import save_model, tiny_llama

    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda omicron sigma tau".split()
    corpus = [" ".join(words[(i + j) % len(words)] for j in range(12)) for i in range(200)]
    tok = train_bpe_tokenizer(corpus, vocab_size=vocab)
    model_dir = root / "model"
    save_model(tiny_llama(preset, tokenizer=tok, seed=0), tok, model_dir)
    prompts = []
    for i in range(n_prompts):
        body = " ".join(words[(3 * i + j) % len(words)] for j in range(prompt_words))
        prompts.append(f"Human: {body}\nAssistant:")
    lengths = {len(tok(p)["input_ids"]) for p in prompts}
    prompt_file = root / "prompts.jsonl"
    prompt_file.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    print(f"prompt lengths (tokens): {sorted(lengths)}")
    return model_dir, prompt_file, prompts


def run_alignkit(model_dir: Path, prompt_file: Path, out: Path, args) -> tuple[list[float], list[float], float]:
    import sys

    from alignkit.config import load_config
    from alignkit.train import grpo

    sys.modules.setdefault("bench_grpo_rewards", sys.modules[__name__])
    batch = args.prompts_per_step * args.group_size
    cfg = load_config(grpo.Config, None, [
        f"model.path={model_dir}", f"data.path={prompt_file}", f"out={out}",
        "reward.source=function", "reward.function=bench_grpo_rewards:reward_fn", "reward.missing_eos_penalty=0",
        f"iterations={args.steps}", f"prompts_per_step={args.prompts_per_step}", f"group_size={args.group_size}",
        f"rollout.max_new_tokens={args.new_tokens}", f"rollout.generation_batch_size={batch}",
        f"rollout.forward_batch_size={batch}", f"train.batch_size={batch}", f"train.lr={args.lr}",
        "train.schedule=constant", "train.max_grad_norm=1.0", f"kl_coef={args.beta}", "kl_in=loss",
        "loss_agg=token-mean", "advantage=grpo", "train.precision=fp32",
    ])
    cpu_marks = [time.process_time()]
    metrics_row = grpo._metrics_row

    def marked(*a, **k):  # an iteration's metrics row is built at its end: CPU time between rows
        cpu_marks.append(time.process_time())
        return metrics_row(*a, **k)

    grpo._metrics_row = marked
    try:
        grpo.run(cfg)
    finally:
        grpo._metrics_row = metrics_row
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    cpu = [b - a for a, b in zip(cpu_marks, cpu_marks[1:])]
    return [r["iteration_s"] for r in rows], cpu, statistics.mean(r["response_length"] for r in rows)


def run_trl(model_dir: Path, prompts: list[str], out: Path, args) -> tuple[list[float], list[float], float]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    times: list[float] = []
    cpu: list[float] = []
    lengths: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            self.t, self.c = time.perf_counter(), time.process_time()

        def on_step_end(self, a, state, control, **kw):
            times.append(time.perf_counter() - self.t)
            cpu.append(time.process_time() - self.c)

        def on_log(self, a, state, control, logs=None, **kw):
            if logs and "completions/mean_length" in logs:
                lengths.append(logs["completions/mean_length"])

    batch = args.prompts_per_step * args.group_size
    config = GRPOConfig(
        output_dir=str(out), per_device_train_batch_size=batch, gradient_accumulation_steps=1,
        steps_per_generation=1, num_iterations=1, num_generations=args.group_size,
        max_completion_length=args.new_tokens, temperature=1.0, top_p=1.0, learning_rate=args.lr,
        lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0, beta=args.beta,
        loss_type="dapo", scale_rewards="group", max_steps=args.steps, use_cpu=not torch.cuda.is_available(),
        bf16=False, report_to="none", logging_steps=1, save_strategy="no", disable_tqdm=True, seed=0,
        dataloader_num_workers=0,
    )
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    data = Dataset.from_dict({"prompt": prompts * (args.steps * args.prompts_per_step // len(prompts) + 2)})
    trainer = GRPOTrainer(model=model, reward_funcs=reward_fn, args=config, train_dataset=data,
                          processing_class=tok, callbacks=[Clock()])
    trainer.train()
    return times, cpu, statistics.mean(lengths) if lengths else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--prompts-per-step", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--prompt-words", type=int, default=12)
    ap.add_argument("--steps", type=int, default=6, help="steps per run; the first is a warm-up")
    ap.add_argument("--rounds", type=int, default=3, help="alternating runs of each trainer")
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--beta", type=float, default=0.04)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads for both trainers (0: torch's default); one thread keeps timings "
                         "stable on a CPU shared with other work")
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.steps < 2:
        ap.error("--steps must be at least 2 (the first step is a warm-up)")

    import logging

    import transformers

    transformers.logging.set_verbosity_error()
    logging.getLogger("trl").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir, prompt_file, prompts = make_assets(root, args.preset, args.vocab, args.prompts_per_step * 2, args.prompt_words)
        steps = {"alignkit": [], "trl": []}
        cpu_steps = {"alignkit": [], "trl": []}
        lengths = {"alignkit": [], "trl": []}
        round_ratios, cpu_ratios = [], []
        for r in range(args.rounds):
            per_round, per_round_cpu = {}, {}
            for side in ("alignkit", "trl") if r % 2 == 0 else ("trl", "alignkit"):
                if side == "alignkit":
                    t, c, n = run_alignkit(model_dir, prompt_file, root / f"ak{r}", args)
                else:
                    t, c, n = run_trl(model_dir, prompts, root / f"trl{r}", args)
                steps[side] += t[1:]
                cpu_steps[side] += c[1:]
                lengths[side].append(n)
                per_round[side] = statistics.median(t[1:])
                per_round_cpu[side] = statistics.median(c[1:])
                print(f"round {r} {side:8s} {per_round[side]:.3f} s/step, {per_round_cpu[side]:.3f} CPU-s/step "
                      f"(medians of {len(t) - 1})", flush=True)
            round_ratios.append(per_round["trl"] / per_round["alignkit"])
            cpu_ratios.append(per_round_cpu["trl"] / per_round_cpu["alignkit"])

    med = {k: statistics.median(v) for k, v in steps.items()}
    cpu_med = {k: statistics.median(v) for k, v in cpu_steps.items()}
    print(f"preset={args.preset} device={'cuda' if torch.cuda.is_available() else 'cpu'} threads={torch.get_num_threads()} "
          f"prompts/step={args.prompts_per_step} G={args.group_size} new_tokens={args.new_tokens} "
          f"steps={args.steps} (first not counted) rounds={args.rounds}")
    print(f"{'trainer':<9} {'s/step (median)':>16} {'min':>7} {'max':>7} {'CPU-s/step':>11} {'mean completion len':>20}")
    for k in ("alignkit", "trl"):
        print(f"{k:<9} {med[k]:>16.3f} {min(steps[k]):>7.3f} {max(steps[k]):>7.3f} {cpu_med[k]:>11.3f} "
              f"{statistics.mean(lengths[k]):>20.1f}")
    ratio, cpu_ratio = statistics.median(round_ratios), statistics.median(cpu_ratios)
    print(f"per-round ratios TRL / alignkit s/step: {', '.join(f'{x:.2f}' for x in round_ratios)}; median {ratio:.2f}")
    print(f"per-round ratios TRL / alignkit CPU-s/step: {', '.join(f'{x:.2f}' for x in cpu_ratios)}; "
          f"median {cpu_ratio:.2f}")
    print(json.dumps({
        "step_time_ratio_trl_over_alignkit": round(ratio, 2),
        "per_round_ratios": [round(x, 3) for x in round_ratios],
        "cpu_time_ratio_trl_over_alignkit": round(cpu_ratio, 2),
        "per_round_cpu_ratios": [round(x, 3) for x in cpu_ratios],
        "alignkit_s_per_step": round(med["alignkit"], 3),
        "trl_s_per_step": round(med["trl"], 3),
        "alignkit_cpu_s_per_step": round(cpu_med["alignkit"], 3),
        "trl_cpu_s_per_step": round(cpu_med["trl"], 3),
        "alignkit_mean_completion_len": round(statistics.mean(lengths["alignkit"]), 1),
        "trl_mean_completion_len": round(statistics.mean(lengths["trl"]), 1),
    }))


if __name__ == "__main__":
    main()
