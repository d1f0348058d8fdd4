"""Real-shape benchmark against TRL: vocab 32k / 128k, sequences 512 / 2,048, narrow model.

    python benchmarks/bench_real_shapes.py                      # SFT, DPO, reward, GRPO; 4 shapes; 3 rounds
    python benchmarks/bench_real_shapes.py --vocabs 131072 --lens 2048 --stages dpo,grpo
    python benchmarks/bench_real_shapes.py --quick              # sanity: vocab 4k, 128 tokens, seconds

Model: a Llama of hidden 256, 4 layers (4 heads, MLP 1024), untied head, seed 0, fp32, built
identically on every side (`LlamaForSequenceClassification` for the reward model). Data:
random token ids, no padding, a quarter of every row prompt. Rows per step (all sizes fit in
~4 GB per process): SFT max(1, 2048 / len) rows; DPO and reward max(1, 2048 / len) pairs
(chosen and rejected share the prompt); GRPO max(1, 2048 / len) prompts x G = 2 responses.

Sides (each in its OWN subprocess; both loops are plain: compute the loss, backward, clip
the gradient norm at 1.0, optimizer step, so only the stages' loss computations and optimizers
differ):

  sft     alignkit `sft_step` (train.logprob_chunk default) | TRL `SFTTrainer.compute_loss`
          (completion-only loss, its fused LM head).
  dpo     alignkit's DPO step (`dpo.make_preference_step`, sigmoid, beta 0.1, a frozen copy as
          reference) | TRL `DPOTrainer.compute_loss` (its fused LM head, the same frozen copy
          as `ref_model`). The policy is the reference plus seeded noise (0.01 x N(0, 1), the
          same on both sides), so the log-ratios and the loss are not trivially log 2.
  reward  alignkit `reward_step` on `RewardModel.from_model` | TRL `RewardTrainer.compute_loss`,
          the same sequence-classification model.
  grpo    one update on a fixed rollout (generation left out: it builds no [tokens, vocab]
          tensor worth measuring, and 2,048 sampled tokens per row would take minutes here):
          the reference pass (no gradient) and one optimizer step of the GRPO loss (token mean,
          k3 KL in the loss, beta 0.04, clip 0.2, advantages +1 / -1 per group). alignkit:
          the reference log-probs as `grpo.run` takes them, then `grpo.grpo_update` |
          TRL: `_get_per_token_logps_and_entropies(ref_model)` then `GRPOTrainer.compute_loss`
          (loss "dapo", its fused LM head). TRL's default beta is 0 (no reference); it is set
          to 0.04 here so both sides do the same work (the reference is attached after
          construction, with TRL's own fused head, as TRL would load it from the policy's path).
          The policy is perturbed as for DPO, so the KL term is not zero.
  alignkit_full (with --with-full; sft and dpo): alignkit with train.logprob_chunk 0.

Optimizers: each side's own default (alignkit `build_optimizer`: AdamW foreach; TRL
`Trainer.create_optimizer`: adamw_torch_fused), lr 1e-5, weight decay 0.

Measured per worker: peak memory = the kernel's RSS high-water mark of the process
(`ru_maxrss`) minus its RSS after all imports, just before the model is built (so it holds
the model, optimizer state, activations and every temporary); step time = median of the
steps after the first (warm-up), in wall time and in CPU time of the process (one torch thread:
CPU time is the work done, which other processes on a shared machine disturb far less); loss =
the first step's loss, at the initial weights. For SFT and DPO a third worker, `exact`, computes that
loss in float64 with plain PyTorch (both models cast to float64, the head and log-softmax over
256-token chunks, float64 sums): the table then gives each side's distance to it, which says
whose float32 rounding a difference between the sides is (`--no-exact` skips it).
`--rounds` rounds alternate which side runs first (alignkit, TRL, TRL, alignkit, ...):
throughput ratio = median over rounds of the per-round ratio alignkit / TRL of tokens per
second (and of tokens per CPU-second); memory = median over rounds. The last line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGES = ("sft", "dpo", "reward", "grpo")
LR, CLIP, BETA_DPO, BETA_GRPO, G = 1e-5, 1.0, 0.1, 0.04, 2


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocabs", default="32768,131072")
    ap.add_argument("--lens", default="512,2048")
    ap.add_argument("--stages", default=",".join(STAGES))
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps per worker; the first is warm-up")
    ap.add_argument("--rounds", type=int, default=3, help="alternating runs per side")
    ap.add_argument("--tokens", type=int, default=2048, help="rows per step = max(1, tokens // len)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--with-full", action="store_true", help="also alignkit with full logits (sft, dpo)")
    ap.add_argument("--no-exact", action="store_true", help="skip the float64 reference loss (sft, dpo)")
    ap.add_argument("--quick", action="store_true", help="vocab 4096, 128 tokens, 256 tokens a step, 2 steps, 2 rounds")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--stage", default="", help=argparse.SUPPRESS)
    ap.add_argument("--vocab", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--len", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        args.vocabs, args.lens, args.steps, args.rounds, args.tokens = "4096", "128", 2, 2, 256
    if args.steps < 2:
        ap.error("--steps must be at least 2 (the first is a warm-up)")
    return args


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# ---------------------------------------------------------------------- shared model and data
def llama_config(vocab: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, num_labels=1)


def build_model(vocab: int, kind: str = "lm", noise: float = 0.0):
    """The seed-0 model; with `noise`, every weight plus noise * N(0, 1) from a seeded generator."""
    import torch
    from transformers import LlamaForCausalLM, LlamaForSequenceClassification

    torch.manual_seed(0)
    cls = LlamaForCausalLM if kind == "lm" else LlamaForSequenceClassification
    return perturb(cls(llama_config(vocab)).float(), noise).train()


def perturb(model, noise: float):
    """`model` with every weight plus noise * N(0, 1) from a generator seeded 1 (no-op at 0)."""
    import torch

    if noise:
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g), alpha=noise)
    return model


def rows(vocab: int, n: int, length: int, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n, length), generator=g)


def shape_of(stage: str, length: int, tokens: int) -> dict:
    """Rows per step and the prompt / response split of one case."""
    n = max(1, tokens // length)
    P = length // 4
    rows_per_step = {"sft": n, "dpo": 2 * n, "reward": 2 * n, "grpo": G * n}[stage]
    return {"n": n, "P": P, "T": length - P, "rows": rows_per_step, "tokens": rows_per_step * length}


def pair_data(args, sh) -> tuple:
    """(prompts (n, P), chosen (n, T), rejected (n, T)) as id lists."""
    p = rows(args.vocab, sh["n"], sh["P"], 1)
    c = rows(args.vocab, sh["n"], sh["T"], 2)
    r = rows(args.vocab, sh["n"], sh["T"], 3)
    return p.tolist(), c.tolist(), r.tolist()


def tokenizer(vocab: int):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    words = {f"t{i}": i for i in range(vocab)}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(words, unk_token="t0")),
                                   pad_token="t0", bos_token="t1", eos_token="t2")


def trl_common(out: str) -> dict:
    return dict(output_dir=out, per_device_train_batch_size=1, learning_rate=LR, weight_decay=0.0,
                max_grad_norm=CLIP, seed=0, bf16=False, fp16=False, report_to="none", save_strategy="no",
                disable_tqdm=True, use_cpu=True, dataloader_num_workers=0)


# ---------------------------------------------------------------------- alignkit sides
def ak_step(args, sh, chunk: int | None):
    """(model, loss closure) of alignkit's stage on this case; chunk None keeps the default."""
    import functools

    import torch

    from alignkit.data.batching import SFTBatch
    from alignkit.data.tokenize import TokenizedPair

    if args.stage == "sft":
        from alignkit.train.sft import sft_step

        model = build_model(args.vocab)
        ids = rows(args.vocab, sh["n"], args.len, 1)
        labels = ids.clone()
        labels[:, : sh["P"]] = -100
        batch = SFTBatch(ids, torch.ones_like(ids), labels)
        step = sft_step if chunk is None else functools.partial(sft_step, chunk=chunk)

        def loss_fn():
            out = step(model, batch)
            return out.loss / out.weight

        return model, loss_fn
    prompts, chosen, rejected = pair_data(args, sh)
    pairs = [TokenizedPair(p, c, r) for p, c, r in zip(prompts, chosen, rejected)]
    if args.stage == "reward":
        from alignkit.models.heads import RewardModel
        from alignkit.train.reward import make_collate, reward_step, sharing_prompts

        model = RewardModel.from_model(build_model(args.vocab, "cls"))
        batch = make_collate(0, sharing_prompts(model))(pairs)  # the stage's collate (two rows at these lengths)

        def loss_fn():
            out = reward_step(model, batch)
            return out.loss / out.weight

        return model, loss_fn
    from alignkit.train import dpo, reference

    ref = build_model(args.vocab).eval()
    model = build_model(args.vocab, noise=0.01)
    cfg = dpo.Config(beta=BETA_DPO)
    copy_ref = reference.CopyReference(ref)
    step = dpo.make_preference_step(cfg, copy_ref)
    if chunk is not None:  # the full-logits variant: response_logps with logprob_chunk 0
        step = _with_chunk(dpo, reference, step, chunk)
    # the stage's collate: prompt sharing where it is less arithmetic (not at these lengths: two rows)
    dbatch = dpo.make_preference_collate(0, copy_ref, share_prompt=dpo.sharing_prompts(cfg, model))(
        list(dpo.Indexed(pairs)))

    def loss_fn():
        out = step(model, dbatch)
        return out.loss / out.weight

    return model, loss_fn


def _with_chunk(dpo, reference, step, chunk: int):
    import functools

    def wrapped(model, batch):
        saved = dpo.response_logps, reference.response_logps
        dpo.response_logps = reference.response_logps = functools.partial(saved[1], logprob_chunk=chunk)
        try:
            return step(model, batch)
        finally:
            dpo.response_logps, reference.response_logps = saved

    return wrapped


def ak_grpo(args, sh):
    """(model, step closure returning the loss) of alignkit's GRPO update on a fixed rollout."""
    import torch

    from alignkit.config import TrainConfig
    from alignkit.train import grpo
    from alignkit.train.loop import build_optimizer, build_scheduler
    from alignkit.train.rollout import Reference, Rollout

    ref_model = build_model(args.vocab)
    model = build_model(args.vocab, noise=0.01)
    ref = Reference(model, ref_model)
    n, B, P, T = sh["n"], sh["rows"], sh["P"], sh["T"]
    prompts = rows(args.vocab, n, P, 1).repeat_interleave(G, 0)  # (B, P), groups contiguous
    resp = rows(args.vocab, B, T, 2)
    cfg = grpo.Config(prompts_per_step=n, group_size=G, kl_coef=BETA_GRPO, kl_in="loss", loss_agg="token-mean",
                      train=TrainConfig(lr=LR, batch_size=B, schedule="constant", weight_decay=0.0,
                                        max_grad_norm=CLIP))
    opt = build_optimizer(model.parameters(), cfg.train)
    sched = build_scheduler(opt, cfg.train, 1000)
    gen = torch.Generator().manual_seed(0)
    adv = torch.tensor([1.0, -1.0] * n)
    ones = torch.ones(B, P, dtype=torch.long)

    def step():
        with torch.no_grad():  # as grpo.run's ref_fn
            ids = torch.cat([prompts, resp], 1)
            ref_lp = ref.logprobs(ids, torch.ones_like(ids), resp, 1.0, cfg.train.logprob_chunk,
                                  share_prompt_prefix=cfg.share_prompt_prefix)
        ro = Rollout(prompts, ones, resp, torch.ones(B, T), torch.zeros(B, T), ref_lp, None, torch.zeros(B),
                     torch.zeros(B), torch.ones(B, dtype=torch.bool), [""] * B, [""] * B, G)
        stats, _ = grpo.grpo_update(model, ro, adv, cfg, opt, sched, gen)
        return stats["loss"]

    return model, step


# ---------------------------------------------------------------------- the float64 reference
def _response_logp_sums(model, ids, P: int):
    """(R,) float64 sums of log p(ids[r, t] | ids[r, :t]) over t >= P: the model in float64, the
    head and log-softmax over 256 positions at a time."""
    import torch

    with torch.no_grad():
        hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state[:, P - 1 : -1]  # (R, T, H)
        targets = ids[:, P:]  # (R, T)
        sums = torch.zeros(len(ids), dtype=torch.float64)
        for r in range(len(ids)):
            for h, y in zip(hidden[r].split(256), targets[r].split(256)):
                lp = model.lm_head(h).log_softmax(-1).gather(-1, y[:, None])
                sums[r] += lp.sum()
    return sums


def exact_loss(args, sh) -> float:
    """The first-step loss of `args.stage` (sft, dpo) at the initial weights, in float64."""
    import torch

    P = sh["P"]
    if args.stage == "sft":
        ids = rows(args.vocab, sh["n"], args.len, 1)
        sums = _response_logp_sums(build_model(args.vocab).double(), ids, P)
        return float(-sums.sum() / (sh["n"] * sh["T"]))
    prompts, chosen, rejected = (torch.tensor(x) for x in pair_data(args, sh))
    ids = torch.cat([torch.cat([prompts, chosen], 1), torch.cat([prompts, rejected], 1)])  # (2n, L)
    policy = _response_logp_sums(build_model(args.vocab, noise=0.01).double(), ids, P)
    ref = _response_logp_sums(build_model(args.vocab).double(), ids, P)
    n = sh["n"]
    margin = (policy[:n] - ref[:n]) - (policy[n:] - ref[n:])
    return float(-torch.nn.functional.logsigmoid(BETA_DPO * margin).mean())


# ---------------------------------------------------------------------- TRL sides
def trl_step(args, sh, out: str):
    """(model, loss closure, optimizer) of TRL's trainer on this case."""
    from datasets import Dataset

    tok = tokenizer(args.vocab)
    if args.stage == "sft":
        from trl import SFTConfig, SFTTrainer

        model = build_model(args.vocab)
        ids = rows(args.vocab, sh["n"], args.len, 1).tolist()
        cmask = [0] * sh["P"] + [1] * sh["T"]
        ds = Dataset.from_dict({"input_ids": ids, "completion_mask": [cmask] * sh["n"]})
        cfg = SFTConfig(**trl_common(out), completion_only_loss=True, max_length=None)
        trainer = SFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok)
        inputs = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(sh["n"])]))
        n_items = int((inputs["labels"][:, 1:] != -100).sum())
        if n_items != sh["n"] * sh["T"]:  # TRL builds the labels from completion_mask in its dataset map
            raise AssertionError(f"TRL scores {n_items} tokens, expected {sh['n'] * sh['T']}")
        return model, lambda: trainer.compute_loss(model, inputs, num_items_in_batch=n_items), trainer
    prompts, chosen, rejected = pair_data(args, sh)
    if args.stage == "reward":
        from trl import RewardConfig, RewardTrainer

        model = build_model(args.vocab, "cls")
        feats = [{"chosen_ids": p + c, "rejected_ids": p + r} for p, c, r in zip(prompts, chosen, rejected)]
        cfg = RewardConfig(**trl_common(out), max_length=None, gradient_checkpointing=False)
        trainer = RewardTrainer(model=model, args=cfg, train_dataset=Dataset.from_list(feats), processing_class=tok)
        inputs = trainer._prepare_inputs(trainer.data_collator(feats))
        return model, lambda: trainer.compute_loss(model, inputs), trainer
    from trl import DPOConfig, DPOTrainer

    ref = build_model(args.vocab).eval()
    model = build_model(args.vocab, noise=0.01)
    feats = [{"prompt_ids": p, "chosen_ids": c, "rejected_ids": r} for p, c, r in zip(prompts, chosen, rejected)]
    text = Dataset.from_list([{"prompt": "t3", "chosen": "t4", "rejected": "t5"}])
    cfg = DPOConfig(**trl_common(out), beta=BETA_DPO, loss_type=["sigmoid"], max_length=None,
                    gradient_checkpointing=False)
    trainer = DPOTrainer(model=model, ref_model=ref, args=cfg, train_dataset=text, processing_class=tok)
    inputs = trainer._prepare_inputs(trainer.data_collator(feats))
    return model, lambda: trainer.compute_loss(model, inputs), trainer


def trl_grpo(args, sh, out: str):
    """(model, step closure returning the loss) of TRL's GRPO update on the same fixed rollout."""
    import torch
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer
    from trl.trainer.utils import add_fused_lm_head

    n, B, P, T = sh["n"], sh["rows"], sh["P"], sh["T"]
    ref = build_model(args.vocab).eval().requires_grad_(False)
    model = build_model(args.vocab, noise=0.01)
    cfg = GRPOConfig(**{**trl_common(out), "per_device_train_batch_size": B}, num_generations=G,
                     steps_per_generation=1, num_iterations=1, max_completion_length=T, loss_type="dapo",
                     beta=0.0, lr_scheduler_type="constant", gradient_checkpointing=False)
    trainer = GRPOTrainer(model=model, reward_funcs=lambda completions, **kw: [0.0] * len(completions), args=cfg,
                          train_dataset=Dataset.from_dict({"prompt": ["t3"] * B}), processing_class=tokenizer(args.vocab))
    add_fused_lm_head(ref, temperature=cfg.temperature)
    trainer.ref_model, trainer.beta = ref, BETA_GRPO
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train(), which this loop replaces
    prompts = rows(args.vocab, n, P, 1).repeat_interleave(G, 0)
    resp = rows(args.vocab, B, T, 2)
    ids = torch.cat([prompts, resp], 1)
    mask = torch.ones_like(ids)
    opt = trainer.create_optimizer()

    def step():
        with torch.no_grad():
            ref_lp, _, _ = trainer._get_per_token_logps_and_entropies(ref, ids, mask, T)
        inputs = {"prompt_ids": prompts, "prompt_mask": torch.ones_like(prompts), "completion_ids": resp,
                  "completion_mask": torch.ones_like(resp), "advantages": torch.tensor([1.0, -1.0] * n),
                  "num_items_in_batch": torch.tensor(float(B * T)), "ref_per_token_logps": ref_lp,
                  "old_per_token_logps": None}
        loss = trainer.compute_loss(model, inputs)
        trainer.accelerator.backward(loss)
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    return model, step


# ---------------------------------------------------------------------- worker and driver
def worker(args) -> dict:
    import tempfile
    import warnings

    import torch
    import trl  # noqa: F401

    import alignkit.train.dpo  # noqa: F401  (imports before the baseline, on every side)
    import alignkit.train.grpo  # noqa: F401

    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    sh = shape_of(args.stage, args.len, args.tokens)
    if args.worker == "exact":
        return {"side": "exact", "loss": exact_loss(args, sh)}
    base = _rss_mb()
    side = args.worker
    with tempfile.TemporaryDirectory() as out:
        if args.stage == "grpo":
            model, step = (ak_grpo(args, sh) if side == "alignkit" else trl_grpo(args, sh, out))
        else:
            if side.startswith("alignkit"):
                from alignkit.config import TrainConfig
                from alignkit.train.loop import build_optimizer

                model, loss_fn = ak_step(args, sh, 0 if side == "alignkit_full" else None)
                opt = build_optimizer(model.parameters(), TrainConfig(lr=LR, weight_decay=0.0))
            else:
                model, loss_fn, trainer = trl_step(args, sh, out)
                opt = trainer.create_optimizer()
            step = _plain_step(model, loss_fn, opt)
        times, cpu, losses = [], [], []
        for _ in range(args.steps):
            t0, c0 = time.perf_counter(), time.process_time()
            losses.append(step())
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    step_s, cpu_s = statistics.median(times[1:]), statistics.median(cpu[1:])
    return {"side": side, "loss": losses[0], "step_s": step_s, "step_times": times, "cpu_s": cpu_s,
            "tokens_per_s": sh["tokens"] / step_s, "tokens_per_cpu_s": sh["tokens"] / cpu_s,
            "peak_mb": _peak_mb() - base, "rss_base_mb": base}


def _plain_step(model, loss_fn, opt):
    import torch

    params = [p for p in model.parameters() if p.requires_grad]

    def step():
        loss = loss_fn()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    return step


def spawn(args, stage: str, side: str, vocab: int, length: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", side, "--stage", stage, "--vocab", str(vocab), "--len", str(length),
           "--steps", str(args.steps), "--threads", str(args.threads), "--tokens", str(args.tokens)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(args.threads),
           "TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1"}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        tail = p.stderr.strip().splitlines()[-3:] if p.stderr else ["failed"]
        return {"side": side, "error": " | ".join(tail)}
    return json.loads(p.stdout.strip().splitlines()[-1])


def run_case(args, stage: str, vocab: int, length: int) -> dict:
    sides = ["alignkit", "trl"] + (["alignkit_full"] if args.with_full and stage in ("sft", "dpo") else [])
    runs: dict[str, list[dict]] = {s: [] for s in sides}
    for r in range(args.rounds):
        order = sides if r % 2 == 0 else [sides[1], sides[0], *sides[2:]]
        for side in order:
            got = spawn(args, stage, side, vocab, length)
            runs[side].append(got)
            msg = got.get("error") or f"{got['step_s']:.2f} s/step, peak {got['peak_mb']:.0f} MB, loss {got['loss']:.7f}"
            print(f"  {stage:6s} V={vocab:<6d} L={length:<5d} round {r} {side:13s} {msg}", file=sys.stderr, flush=True)
    sh = shape_of(stage, length, args.tokens)
    row = {"stage": stage, "vocab": vocab, "len": length, "rows_per_step": sh["rows"], "tokens_per_step": sh["tokens"]}
    if stage in ("sft", "dpo") and not args.no_exact:
        got = spawn(args, stage, "exact", vocab, length)
        if "error" in got:
            row["exact"] = got
        else:
            row["exact"] = {"loss": got["loss"]}
            for side, rs in runs.items():
                ok = [x for x in rs if "error" not in x]
                if ok:
                    row["exact"][f"{side}_abs_err"] = abs(ok[0]["loss"] - got["loss"])
            print(f"  {stage:6s} V={vocab:<6d} L={length:<5d} float64 loss {got['loss']:.9f}", file=sys.stderr, flush=True)
    for side, rs in runs.items():
        ok = [x for x in rs if "error" not in x]
        if not ok:
            row[side] = {"error": rs[0]["error"]}
            continue
        row[side] = {"tokens_per_s": round(statistics.median(x["tokens_per_s"] for x in ok), 2),
                     "tokens_per_cpu_s": round(statistics.median(x["tokens_per_cpu_s"] for x in ok), 2),
                     "step_s": round(statistics.median(x["step_s"] for x in ok), 3),
                     "peak_mb": round(statistics.median(x["peak_mb"] for x in ok), 1),
                     "loss": ok[0]["loss"], "rounds": len(ok)}
    for other in sides[1:]:
        pairs = [(a, o) for a, o in zip(runs["alignkit"], runs[other]) if "error" not in a and "error" not in o]
        if not pairs:
            continue
        row[f"alignkit_vs_{other}"] = {
            "throughput_ratio": round(statistics.median(a["tokens_per_s"] / o["tokens_per_s"] for a, o in pairs), 3),
            "cpu_throughput_ratio": round(statistics.median(a["tokens_per_cpu_s"] / o["tokens_per_cpu_s"]
                                                            for a, o in pairs), 3),
            "peak_mem_ratio": round(row["alignkit"]["peak_mb"] / row[other]["peak_mb"], 3),
            "loss_abs_diff": abs(pairs[0][0]["loss"] - pairs[0][1]["loss"]),
            "per_round_throughput_ratios": [round(a["tokens_per_s"] / o["tokens_per_s"], 3) for a, o in pairs],
        }
    return row


def print_table(results: list[dict]) -> None:
    print(f"{'stage':7s} {'vocab':>7s} {'len':>5s} {'ak tok/s':>9s} {'trl tok/s':>9s} {'speed x':>8s} {'cpu x':>6s} "
          f"{'ak MB':>7s} {'trl MB':>7s} {'mem x':>6s} {'|dloss|':>9s} {'ak-f64':>9s} {'trl-f64':>9s}")
    for r in results:
        a, t, v = r.get("alignkit", {}), r.get("trl", {}), r.get("alignkit_vs_trl")
        if v is None:
            print(f"{r['stage']:7s} {r['vocab']:>7d} {r['len']:>5d}  error: {a.get('error') or t.get('error')}")
            continue
        print(f"{r['stage']:7s} {r['vocab']:>7d} {r['len']:>5d} {a['tokens_per_s']:>9.1f} {t['tokens_per_s']:>9.1f} "
              f"{v['throughput_ratio']:>8.2f} {v['cpu_throughput_ratio']:>6.2f} {a['peak_mb']:>7.0f} {t['peak_mb']:>7.0f} {v['peak_mem_ratio']:>6.2f} "
              f"{v['loss_abs_diff']:>9.1e} {_err(r, 'alignkit')} {_err(r, 'trl')}")


def _err(row: dict, side: str) -> str:
    """|side's loss - the float64 loss| for the table, or '-'."""
    err = row.get("exact", {}).get(f"{side}_abs_err")
    return f"{err:>9.1e}" if err is not None else f"{'-':>9s}"


def main() -> None:
    args = parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    load = os.getloadavg()
    results = []
    for stage in args.stages.split(","):
        if stage not in STAGES:
            sys.exit(f"--stages: unknown stage {stage!r} (expected some of {', '.join(STAGES)})")
        for vocab in map(int, args.vocabs.split(",")):
            for length in map(int, args.lens.split(",")):
                results.append(run_case(args, stage, vocab, length))
    print_table(results)
    print(json.dumps({"bench": "real_shapes", "load_avg_before": [round(x, 2) for x in load],
                      "load_avg_after": [round(x, 2) for x in os.getloadavg()], "steps": args.steps,
                      "rounds": args.rounds, "threads": args.threads, "quick": args.quick, "results": results}))


if __name__ == "__main__":
    main()
