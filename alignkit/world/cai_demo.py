"""The demo's Constitutional AI stage: SL-CAI, then RL-CAI, on the built-in world (docs/cai.md).

    start    base -> SFT on sft_helpful.jsonl + cai_sft.jsonl: a helpful-only assistant (it
             complies with harmful requests) that has seen critiques, revisions and preference
             questions in the constitution's formats, on training questions only
    SL-CAI   the start model answers the harmful red-team training prompts, critiques and revises
             its answers (`cai revise`); SFT from start on the revisions + helpful data
    RL-CAI   the SL-CAI model (`rl_from=sl`, the paper's order) samples two answers per red-team
             training prompt; a feedback model (start + SFT on preference-question
             demonstrations) labels them with the constitution's questions (`cai label`); DPO
             (beta 0.5) from SL-CAI on the AI labels (Bai et al. 2022, Sec. 4)

No human harmlessness label is used: harm enters only through the constitution-format
demonstrations. The figures (summary["stages"]["cai"]) are the gold judge's, on held-out
questions: `gold_score` over the demo's evaluation prompts, `harmless` on the held-out harmful
requests and `helpful` on their held-out benign look-alikes (greedy answers), for each model,
and the AI labels' agreement with the gold judge's preference.

The demo starts from the base model, not from the demo's SFT model: sft.jsonl refuses harmful
requests (human harmlessness labels), so SL-CAI would have nothing left to show.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alignkit.atomic import read_jsonl

# --quick (seconds): fewer prompts and shorter answers; the demo's quick SFT and DPO overrides
# (alignkit.pipeline.QUICK) cap the training steps
QUICK = ["revise_limit=16", "label_limit=16", "sl_helpful=64", "fb_steps=0", "n_principles=1",
         "max_new_tokens=16", "eval_max_new_tokens=16", "eval_samples=1"]  # fmt: skip


@dataclass(frozen=True)
class Config:
    """Sizes of the demo's Constitutional AI stage; the defaults take about 2 minutes on 2 quiet CPU
    cores, about 40 % of it RL-CAI (docs/cai.md, "In the demo")."""

    start_steps: int = 160
    """SFT steps of the starting model on sft_helpful.jsonl + cai_sft.jsonl (batch 32)."""
    start_lr: float = 1e-3
    """Learning rate of that SFT."""
    revise_repeats: int = 2
    """Samples revised per harmful red-team training prompt (SL-CAI)."""
    revise_limit: int = 0
    """Revise only the first N harmful training prompts (0: all)."""
    n_rounds: int = 1
    """Critique-revision rounds per sample."""
    sl_helpful: int = 600
    """Helpful demonstrations (non-harmful rows of sft_helpful.jsonl) mixed into the SL-CAI SFT."""
    sl_steps: int = 60
    """SFT steps of SL-CAI, from the start model (batch 32)."""
    rl: bool = True
    """Run RL-CAI after SL-CAI."""
    rl_from: str = "sl"
    """The policy RL-CAI samples from and trains: "sl" (the paper's order) or "start" (the
    helpful-only model: it complies with nearly every harmful request, so nearly all its
    harmful pairs are two compliances the labels cannot separate; docs/cai.md)."""
    rl_skip_after_s: float = 150.0
    """Skip RL-CAI when the stage has already taken longer than this (0: never skip)."""
    fb_steps: int = 150
    """SFT steps of the feedback model: the start model trained further on preference-question
    demonstrations only (0: the start model labels)."""
    fb_demos: int = 3000
    """Preference-question demonstrations generated for it (training questions only)."""
    label_repeats: int = 4
    """Response pairs sampled per red-team training prompt (harmful and benign) for RL-CAI."""
    label_limit: int = 0
    """Label only the first N red-team training prompts (0: all)."""
    n_principles: int = 4
    """Constitution questions asked per pair (each in both orders)."""
    dpo_steps: int = 0
    """DPO steps on the AI labels (0: `dpo_epochs` epochs)."""
    dpo_epochs: int = 8
    """DPO epochs when `dpo_steps` is 0."""
    dpo_lr: float = 1e-4
    """DPO learning rate (sigmoid loss, soft labels)."""
    dpo_beta: float = 0.5
    """DPO beta: at 0.1 the AI-label DPO cost benign helpfulness (docs/cai.md)."""
    max_new_tokens: int = 48
    """Longest response, critique or revision generated."""
    eval_max_new_tokens: int = 32
    """Longest answer in the red-team evaluation."""
    eval_samples: int = 4
    """Sampled answers (temperature 1) per held-out red-team prompt, besides the greedy one
    (0: greedy only)."""


def _red_team(demo: Any, model_dir: str, cfg: Config) -> dict:
    """Greedy answers to the held-out red-team prompts, judged: harmless (harmful requests) and
    helpful (benign look-alikes), plus the gold score over the demo's evaluation prompts."""
    from alignkit.eval import gold
    from alignkit.feedback.backends import LocalBackend
    from alignkit.models.generate import SamplingParams
    from alignkit.world.cai import red_team_scores

    backend = LocalBackend.from_dir(model_dir, batch_size=64)
    rows = read_jsonl(demo.world_dir / "redteam_eval.jsonl")
    prompts = [r["prompt"] for r in rows]
    answers = backend.generate(prompts, SamplingParams(max_new_tokens=cfg.eval_max_new_tokens, greedy=True))
    per_cat = red_team_scores(demo.world, prompts, answers)
    out = {"model": model_dir, "harmless": per_cat.get("harmful", {}).get("harmless"),
           "helpful": per_cat.get("benign", {}).get("helpful"), "red_team": per_cat}  # fmt: skip
    if cfg.eval_samples:  # sampled answers (temperature 1): what RL changes before greedy does
        many = [p for p in prompts for _ in range(cfg.eval_samples)]
        params = SamplingParams(max_new_tokens=cfg.eval_max_new_tokens, temperature=1.0, seed=demo.seed)
        sampled = red_team_scores(demo.world, many, backend.generate(many, params))
        out["harmless_sampled"] = sampled.get("harmful", {}).get("harmless")
        out["helpful_sampled"] = sampled.get("benign", {}).get("helpful")
    scores, _ = gold.evaluate(backend.model, backend.tokenizer, demo.world, demo.prompts, demo.eval_cfg)
    return {**out, "gold_score": scores["gold_score"]}


def _sft(demo: Any, model: str, data: Path, out: Path, steps: int, extra: list[str]) -> dict:
    from alignkit.train import sft

    return sft.run(demo.config(sft, "sft", [
        f"model.path={model}", f"data.path={data}", f"out={out}", f"train.max_steps={steps}",
        "data.max_prompt_len=192", "data.max_len=256", *extra]))  # fmt: skip


def _train(demo: Any, cfg: Config, out: Path) -> dict:
    from alignkit.eval.gold import write_jsonl_atomic
    from alignkit.feedback.cai import LabelConfig, ReviseConfig, label, revise
    from alignkit.train import dpo
    from alignkit.world.cai import cai_sft_records, label_agreement

    start_time = time.perf_counter()
    world_dir = Path(demo.world_dir)
    base = demo.summary["stages"]["base"]["model"]
    helpful = read_jsonl(world_dir / "sft_helpful.jsonl")
    red_team = read_jsonl(world_dir / "redteam_train.jsonl")
    result: dict[str, Any] = {}

    # the starting point: helpful-only answers + the constitution's formats
    start_data = out / "start_data.jsonl"
    write_jsonl_atomic(start_data, helpful + read_jsonl(world_dir / "cai_sft.jsonl"))
    lr = [f"train.lr={cfg.start_lr}"]
    start = _sft(demo, base, start_data, out / "start", cfg.start_steps, lr)["model"]
    result["start"] = _red_team(demo, start, cfg)

    # SL-CAI: critique and revise the start model's answers to harmful requests, then SFT on them
    harmful = [r for r in red_team if r["category"] == "harmful"]
    harmful = harmful[: cfg.revise_limit] if cfg.revise_limit else harmful
    revise_prompts = out / "revise_prompts.jsonl"
    write_jsonl_atomic(revise_prompts, [r for r in harmful for _ in range(cfg.revise_repeats)])
    rev = revise(ReviseConfig(
        model=start, prompts=str(revise_prompts), out=str(out / "revise"), n_rounds=cfg.n_rounds,
        seed=demo.seed, max_new_tokens=cfg.max_new_tokens, batch_size=64))  # fmt: skip
    # helpfulness is kept with helpful data, as the paper mixes in helpfulness samples
    keep = [r for r in helpful if r["category"] != "harmful"][: cfg.sl_helpful]
    sl_data = out / "sl_data.jsonl"
    write_jsonl_atomic(sl_data, read_jsonl(out / "revise" / "sft.jsonl") + keep)
    sl = _sft(demo, start, sl_data, out / "sl", cfg.sl_steps, [])["model"]
    result["sl"] = _red_team(demo, sl, cfg) | {
        "revised": rev["prompts"], "changed": rev["changed"], "chains": rev["chains"]}  # fmt: skip
    result["model"] = sl

    elapsed = time.perf_counter() - start_time
    if not cfg.rl:
        result["rl"] = {"skipped": "rl=false"}
        return result
    if cfg.rl_skip_after_s and elapsed > cfg.rl_skip_after_s:
        result["rl"] = {"skipped": f"SL-CAI took {elapsed:.0f} s > rl_skip_after_s={cfg.rl_skip_after_s:g}"}
        return result

    # RL-CAI: a feedback model labels pairs sampled from SL-CAI; DPO from SL-CAI on the AI labels.
    # Its answer is one token after a long question, so the start SFT teaches it too weakly: without
    # this step the labels follow the position, not the replies (docs/cai.md)
    feedback = start
    if cfg.fb_steps:
        fb_data = out / "feedback_data.jsonl"
        demos = cai_sft_records(demo.world, demo.seed + 1, cfg.fb_demos, kinds=("preference",))
        write_jsonl_atomic(fb_data, demos)
        feedback = _sft(demo, start, fb_data, out / "feedback", cfg.fb_steps, lr)["model"]
    label_rows = red_team[: cfg.label_limit] if cfg.label_limit else red_team
    label_prompts = out / "label_prompts.jsonl"
    write_jsonl_atomic(label_prompts, [r for r in label_rows for _ in range(cfg.label_repeats)])
    if cfg.rl_from not in ("start", "sl"):
        raise ValueError(f"cai_stage: rl_from must be 'start' or 'sl', got {cfg.rl_from!r}")
    policy = start if cfg.rl_from == "start" else sl
    lab = label(LabelConfig(
        policy=policy, feedback=feedback, prompts=str(label_prompts), out=str(out / "label"),
        n_principles=cfg.n_principles, seed=demo.seed, max_new_tokens=cfg.max_new_tokens, batch_size=64))  # fmt: skip
    pairs = read_jsonl(Path(lab["preferences"])) if lab["pairs"] else []
    rl: dict[str, Any] = {"pairs": lab["pairs"], "label_agreement": label_agreement(demo.world, pairs),
                          "position_bias": lab["position_bias"]}  # fmt: skip
    # an empty sample is no response to train on (the data loader refuses it)
    pairs = [r for r in pairs if r["chosen"].strip() and r["rejected"].strip()]
    if pairs:
        rl_data = out / "rl_data.jsonl"
        write_jsonl_atomic(rl_data, pairs)
        steps = [f"train.max_steps={cfg.dpo_steps}"] if cfg.dpo_steps else [
            "train.max_steps=0", f"train.epochs={cfg.dpo_epochs}"]  # fmt: skip
        res = dpo.run(demo.config(dpo, "dpo", [
            f"model.path={policy}", f"data.path={rl_data}", f"out={out / 'rl'}", "loss=sigmoid", f"beta={cfg.dpo_beta}",
            f"train.lr={cfg.dpo_lr}", "train.warmup_steps=5", *steps]))  # fmt: skip
        rl["dpo_pairs"], rl["feedback"], rl["from"] = len(pairs), feedback, cfg.rl_from
        rl |= _red_team(demo, res["model"], cfg)
        if cfg.rl_from == "sl":  # the paper's chain: RL-CAI is the final model
            result["model"] = res["model"]
    result["rl"] = rl
    return result


def _notes(entry: dict) -> str:
    def fmt(x: Any) -> str:
        return "n/a" if x is None else f"{x:.2f}"

    models = [(k, entry[k]) for k in ("start", "sl", "rl") if "harmless" in entry.get(k, {})]
    names = {"start": "helpful-only start", "sl": "SL-CAI", "rl": f"RL-CAI (from {entry.get('rl', {}).get('from', 'sl')})"}
    def pair(m: dict) -> str:
        text = f"{fmt(m['harmless'])} / {fmt(m['helpful'])}"
        if m.get("harmless_sampled") is not None:
            text += f" (sampled {fmt(m['harmless_sampled'])} / {fmt(m.get('helpful_sampled'))})"
        return text

    text = ("Constitutional AI, no human harmlessness labels; harmless on held-out harmful requests / helpful on "
            "held-out benign look-alikes, greedy: " + ", ".join(f"{names[k]} {pair(m)}" for k, m in models))  # fmt: skip
    agreement = entry.get("rl", {}).get("label_agreement", {})
    if agreement.get("agreement") is not None:
        text += f"; AI labels agree with gold on {agreement['agreement']:.2f} of {agreement['decided']} decided pairs"
    if "skipped" in entry.get("rl", {}):
        text += f"; RL-CAI skipped ({entry['rl']['skipped']})"
    return text


def cai_stage(demo: Any, overrides: list[str] | None = None) -> None:
    """Run the CAI stage inside `alignkit demo` (alignkit.pipeline.Demo) and add
    summary["stages"]["cai"]: the final CAI model's gold evaluation (`demo.evaluate`), wall time
    and peak memory, and per model ("start", "sl", "rl") the gold score, `harmless` on held-out
    harmful requests and `helpful` on held-out benign look-alikes; "rl" also has the AI labels'
    agreement with the gold judge. Needs the demo's base stage."""
    from alignkit.config import load_config

    cfg = load_config(Config, None, (QUICK if demo.quick else []) + list(overrides or []))
    if "model" not in demo.summary["stages"].get("base", {}):
        raise ValueError("the CAI stage starts from the demo's base model: run the 'base' stage first")
    out = Path(demo.out) / "cai"
    result = demo.run_stage("cai", lambda: _train(demo, cfg, out))
    demo.evaluate("cai", result["model"], kl_to_sft=False)
    entry = demo.summary["stages"]["cai"]
    entry.update({k: result[k] for k in ("start", "sl", "rl")})
    entry["harmless"] = {
        k: result[k].get("harmless") for k in ("start", "sl", "rl") if "harmless" in result[k]
    }
    entry["helpful"] = {k: result[k].get("helpful") for k in ("start", "sl", "rl") if "helpful" in result[k]}
    for key in ("harmless_sampled", "helpful_sampled"):
        entry[key] = {k: result[k].get(key) for k in ("start", "sl", "rl") if key in result[k]}
    entry["notes"] = _notes(entry)
    demo.save()
