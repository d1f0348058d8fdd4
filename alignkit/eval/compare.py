"""`alignkit compare`: the usual RLHF-vs-DPO table of claims, measured on one task from one SFT model.

    alignkit compare --config configs/compare.yaml demo=runs/demo out=runs/compare

Given an SFT model, a reward model and a world (the layout `alignkit demo` writes: RUN/sft/final,
RUN/reward/final, RUN/world; `demo=RUN` fills all three), it trains DPO and PPO (RLHF against
the reward model) from the same SFT model, evaluates both with the same gold-judge machinery as
the demo (alignkit.pipeline.Demo), and can sweep DPO's beta. Writes OUT/summary.json,
OUT/report.md and OUT/report.html (alignkit.eval.report).

Each stage entry of the summary gets, besides the demo's gold score, win rate and KL
(`annotate_stage`, which the demo calls too):

    models / models_in_memory  models whose weights are held while the stage trains
    state_mb                   their weights, plus gradients and two AdamW moments for trained ones
    peak_mem_mb / mem_added_mb peak resident memory; with isolate=true each method runs in a fresh
                               process, and mem_added_mb is the peak minus that process's memory
                               when the stage started (after its imports)
    wall_s / sampling_s        stage wall time; the part spent sampling rollouts (PPO)
    tokens_sampled             response tokens generated during training (DPO: 0, offline data)
    proxy_gold_gap             reward hacking: the win rate against SFT by the proxy the method
                               optimised (PPO: the reward model; DPO: its implicit reward) minus the
                               win rate by the gold judge, on the same held-out answers
    n_hyperparameters          the method's own knobs (see `hyperparameters` for the definition)

docs/evaluation.md ("RLHF vs DPO, measured") explains every figure and its limits.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alignkit.atomic import read_jsonl
from alignkit.config import ConfigError, load_config
from alignkit.eval.report import win_cell

# ------------------------------------------------------------------------------- config


def _demo_ppo_overrides() -> list[str]:
    from alignkit.pipeline import PPO_RM

    return list(PPO_RM)


@dataclass(frozen=True)
class Config:
    """Settings of `alignkit compare`."""

    demo: str | None = None
    """A run directory of `alignkit demo`: sft, reward and world default to RUN/sft/final, RUN/reward/final, RUN/world."""
    sft: str | None = None
    """The SFT model directory: both methods start from it and it is their reference."""
    reward: str | None = None
    """The reward model directory PPO optimises (the proxy)."""
    reward_ensemble: list[str] | None = None
    """More reward models PPO averages with `reward` (None: with `demo` and no `reward`, the demo's
    ensemble DEMO/reward_K/final; []: `reward` alone)."""
    world: str | None = None
    """The world directory (preferences.jsonl for DPO, train_prompts.jsonl for PPO, eval_prompts.jsonl)."""
    out: str = "runs/compare"
    """Output directory: summary.json, report.md, report.html, one folder per run."""
    methods: list[str] = field(default_factory=lambda: ["dpo", "ppo"])
    """Which head-to-head runs to make ('dpo', 'ppo'); [] runs only the beta sweep."""
    dpo_config: str | None = None
    """YAML of the DPO run (None: configs/dpo.yaml, the demo's preset)."""
    dpo_overrides: list[str] = field(default_factory=list)
    """Dotted overrides of the DPO run, e.g. [train.max_steps=100]."""
    ppo_config: str | None = None
    """YAML of the PPO run (None: configs/ppo.yaml)."""
    ppo_overrides: list[str] = field(default_factory=_demo_ppo_overrides)
    """Dotted overrides of the PPO run (default: the demo's, alignkit.pipeline.PPO_RM)."""
    betas: list[float] = field(default_factory=list)
    """DPO beta sweep: one short run per value ([]: no sweep)."""
    sweep_steps: int = 100
    """Optimizer steps of each sweep run."""
    sweep_loss: str = "sigmoid"
    """Loss of the sweep runs (sigmoid is the original DPO, where beta is the KL strength)."""
    sweep_overrides: list[str] = field(default_factory=list)
    """Dotted overrides of every sweep run (after loss, beta and steps)."""
    eval_limit: int = 0
    """Held-out prompts evaluated, spread over categories (0: all)."""
    eval_max_new_tokens: int = 0
    """Longest evaluated answer (0: configs/eval.yaml's)."""
    isolate: bool = True
    """Train each method in a fresh process, so peak memory is that method's alone."""
    quick: bool = False
    """The demo's --quick sizes (alignkit.pipeline.QUICK) for DPO, PPO and the evaluation."""
    seed: int = 0
    """Seed of training and of the KL estimate's samples."""

    def __post_init__(self):
        for m in self.methods:
            if m not in ("dpo", "ppo"):
                raise ConfigError(f"config key 'methods': unknown method {m!r} (valid: dpo, ppo)")
        if any(not b > 0 for b in self.betas):
            raise ConfigError(f"config key 'betas': every beta must be > 0, got {self.betas}")
        if self.sweep_steps < 1:
            raise ConfigError("config key 'sweep_steps' must be >= 1")

    @property
    def sft_dir(self) -> str | None:
        return self.sft or (str(Path(self.demo) / "sft" / "final") if self.demo else None)

    @property
    def reward_dir(self) -> str | None:
        return self.reward or (str(Path(self.demo) / "reward" / "final") if self.demo else None)

    @property
    def ensemble_dirs(self) -> list[str]:
        if self.reward_ensemble is not None:
            return list(self.reward_ensemble)
        if self.reward or not self.demo:
            return []
        return [str(p) for p in sorted(Path(self.demo).glob("reward_*/final"))]

    @property
    def world_dir(self) -> str | None:
        return self.world or (str(Path(self.demo) / "world") if self.demo else None)


# ------------------------------------------------------------------------------- hyperparameters

NOT_HYPERPARAMETERS = frozenset({
    # where data, models and outputs are
    "out", "world", "model.path", "model.tokenizer", "model.preset", "data.path", "data.eval_path",
    "data.on_error", "data.limit", "reference_path", "cache_dir", "reward.model", "reward.function", "value_init",
    "reward.ensemble",
    # how a result is computed, not which result: the same numbers at another cost
    "reference", "reference_batch_size", "train.grad_accum", "train.precision", "train.logprob_chunk", "train.packing",
    "share_prompt",
    "train.strategy", "train.zero_stage", "train.offload", "data.max_no_signal",
    "rollout.generation_batch_size", "rollout.forward_batch_size", "rollout.engine",
    "launcher",  # where the ranks run (and every ray.* key: see `hyperparameters`)
    # a correctness switch nobody tunes (on: the step-0 loss is exactly the no-change value)
    "disable_dropout",
    # bookkeeping and evaluation
    "train.seed", "train.save_every", "train.keep_checkpoints", "train.log_every", "train.resume",
    "train.overwrite", "train.progress", "train.tensorboard", "train.report_to",
    "eval_world", "eval_limit", "eval_max_new_tokens", "eval_every",
})
"""Config leaves that are not hyperparameters of the method (see `hyperparameters`)."""

SHARED_SECTIONS = ("model.", "data.", "train.")
"""Sections every stage has (model, data cutting, optimizer): knobs both methods share."""


def _leaves(obj: Any, prefix: str = ""):
    for f in dataclasses.fields(obj):
        v, name = getattr(obj, f.name), prefix + f.name
        if dataclasses.is_dataclass(v):
            yield from _leaves(v, name + ".")
        elif isinstance(v, dict):  # loss_params: each key given is one knob
            for k, x in v.items():
                yield f"{name}.{k}", x
        else:
            yield name, v


def _inactive(name: str, cfg: Any) -> bool:
    """True for a knob the chosen settings make irrelevant."""
    rl = hasattr(cfg, "iterations")  # RL stages: length is `iterations`, prompts only are cut
    if name in ("model.lora_alpha", "model.lora_dropout", "model.lora_targets"):
        return cfg.model.lora_r <= 0
    if name == "train.epochs":
        return rl or cfg.train.max_steps > 0
    if name == "train.max_steps":
        return rl or cfg.train.max_steps <= 0
    if name == "data.max_len":
        return rl
    if name == "kl_horizon":
        return getattr(cfg, "kl_target", None) is None
    if name == "reward.ref_logprob_baseline":  # a detail of the reference-likelihood feature
        return not cfg.reward.ref_logprob_coef
    if name == "reward.ref_surprise_prob":  # a detail of the surprise penalty
        return not cfg.reward.ref_surprise_coef
    if name == "reward.normalize":
        return cfg.reward.source != "model"
    if name in ("reward.ensemble_mode", "reward.ensemble_coef"):  # a knob once there are two members
        return not cfg.reward.ensemble or (name == "reward.ensemble_coef" and cfg.reward.ensemble_mode != "uwo")
    return False


def hyperparameters(cfg: Any) -> dict[str, Any]:
    """The knobs of a stage config that change what the method learns: every leaf (each key of a
    dict-valued field such as loss_params counts once), minus NOT_HYPERPARAMETERS (paths, how a
    result is computed, bookkeeping, evaluation) and minus knobs the other settings switch off
    (LoRA details without LoRA, epochs when max_steps is set, kl_horizon without kl_target, ...)."""
    # the reward-hacking monitor watches a run; it changes no update (monitor.stop only ends it early)
    return {n: v for n, v in _leaves(cfg)
            if n not in NOT_HYPERPARAMETERS and not n.startswith(("monitor.", "ray.")) and not _inactive(n, cfg)}


def count_hyperparameters(cfg: Any) -> dict:
    """{"method": n, "shared": n, "changed": n | None, "method_names": [...], "changed_names": [...]}.

    method: knobs outside the model/data/train sections (the algorithm's own: DPO's loss and
    beta, PPO's clip ranges, GAE, KL, value and rollout settings); shared: the model/data/
    optimizer knobs every stage has; changed: knobs whose value differs from the config class's
    defaults (what a preset or the user had to set)."""
    hp = hyperparameters(cfg)
    method = [n for n in hp if not n.startswith(SHARED_SECTIONS)]
    try:
        defaults = dict(_leaves(type(cfg)()))
    except Exception:  # a config class whose defaults do not validate on their own
        defaults = None
    changed = None if defaults is None else [n for n, v in hp.items() if n not in defaults or defaults[n] != v]
    return {
        "method": len(method),
        "shared": len(hp) - len(method),
        "changed": None if changed is None else len(changed),
        "method_names": method,
        "changed_names": changed,
    }


# ------------------------------------------------------------------------------- facts of a stage


def weights_mb(model_dir: str | Path) -> float | None:
    """Bytes of the tensors in a directory's *.safetensors files, in MB, read from their headers
    (nothing is loaded). None when there are none."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for f in files:
        with open(f, "rb") as fh:
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        total += sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__")
    return total / 2**20


TRAINED_STATE = 4
"""A trained model holds weights, gradients and AdamW's two moments: 4 copies of its weights."""


def models_in_memory(cfg: Any) -> list[tuple[str, str | None, bool]]:
    """(name, weights directory or None, trained) of every model a DPO or PPO run holds while it
    trains. A LoRA policy's frozen base doubles as the reference (its adapters are not counted)."""
    kind = type(cfg).__module__.rsplit(".", 1)[-1]
    lora = cfg.model.lora_r > 0
    models = [("policy", cfg.model.path, not lora)]
    if kind == "dpo":
        if cfg.uses_reference and cfg.reference == "copy":
            models.append(("reference", cfg.reference_path or cfg.model.path, False))
        return models
    if kind == "ppo":
        if not lora:
            models.append(("reference", cfg.model.path, False))
        if cfg.value_model == "separate":
            init = cfg.value_init or (cfg.reward.model if cfg.reward.source == "model" else cfg.model.path)
            models.append(("value model", init, True))
        if cfg.reward.source == "model":
            models.append(("reward model", cfg.reward.model, False))
            models += [(f"reward model {i + 2}", path, False) for i, path in enumerate(cfg.reward.ensemble)]
        return models
    raise ValueError(f"models_in_memory knows DPO and PPO configs, not {type(cfg).__module__}")


def _models_note(cfg: Any) -> str:
    kind = type(cfg).__module__.rsplit(".", 1)[-1]
    if kind == "dpo" and cfg.uses_reference:
        return {
            "precomputed": "reference log-probs precomputed in one pass before training",
            "lora": "reference = the policy with its LoRA adapter off",
            "copy": "",
        }[cfg.reference]
    if kind == "dpo":
        return "reference-free loss"
    if kind == "ppo" and cfg.value_model == "shared":
        return "value head on the policy"
    return ""


def state_mb(models: Sequence[tuple[str, str | None, bool]]) -> float | None:
    """Model state held in memory: weights x TRAINED_STATE for trained models, x 1 for frozen
    ones (activations, KV cache and data not included). None if a model's size is unknown."""
    total = 0.0
    for _, path, trained in models:
        mb = weights_mb(path) if path else None
        if mb is None:
            return None
        total += mb * (TRAINED_STATE if trained else 1)
    return total


def tokens_sampled(rows: Sequence[dict], rollout_batch: int) -> int:
    """Response tokens generated during RL training: sum over iterations of the mean response
    length (metrics.jsonl's response_length, EOS included) times the responses per iteration."""
    return int(round(sum(r["response_length"] * rollout_batch for r in rows if "response_length" in r)))


PROXY_TIE = 1e-6
"""Proxy scores this close are a tie: identical answers get identical scores up to rounding."""


def proxy_gold_gap(
    proxy_policy: Sequence[float], proxy_sft: Sequence[float], gold_policy: Sequence[float], gold_sft: Sequence[float]
) -> dict:
    """Reward hacking as one number: on the same held-out answers of the policy and of SFT, the
    win rate of the policy by the proxy it optimised minus its win rate by the gold judge (ties
    half). A proxy that ranks answers as gold does gives 0; > 0 means the proxy claims wins the
    gold judge does not confirm. Rank-based, so the proxy's scale (normalised reward, implicit
    reward, any per-prompt offset such as DPO's log Z(x)) does not matter."""
    from alignkit.eval.winrate import pairwise_outcomes

    p = pairwise_outcomes(proxy_policy, proxy_sft, PROXY_TIE)
    g = pairwise_outcomes(gold_policy, gold_sft)
    pw, gw = sum(p) / len(p), sum(g) / len(g)
    return {"proxy_win_rate": pw, "gold_win_rate": gw, "gap": pw - gw, "n": len(p)}


def implicit_rewards(
    policy: Any, reference: Any, tokenizer: Any, prompts: Sequence[str], responses: Sequence[str],
    beta: float, average: bool = False, batch_size: int = 64,
) -> list[float]:
    """DPO's implicit reward beta * (log pi(y|x) - log pi_ref(y|x)) (Rafailov et al. 2023, Eq. 5,
    without the beta log Z(x) term, which cancels between two answers to one prompt), with the
    log-probs summed or per-token averaged as the loss was fed them; reference None (SimPO,
    ORPO) gives beta * log pi(y|x)."""
    import torch

    from alignkit.data.batching import collate_sft
    from alignkit.data.tokenize import TokenizedSFT, encode_pair
    from alignkit.train.reference import normalise, response_logps

    items = []
    for p, r in zip(prompts, responses):
        e = encode_pair(tokenizer, p, r)
        items.append(TokenizedSFT(e.prompt_ids, e.response_ids))
    out: list[float] = []
    with torch.no_grad():
        for i in range(0, len(items), batch_size):
            b = collate_sft(items[i : i + batch_size], tokenizer.pad_token_id)
            args = (b.input_ids, b.attention_mask, b.labels)
            lp = normalise(*response_logps(policy.eval(), *args), average)  # (B,)
            if reference is not None:
                lp = lp - normalise(*response_logps(reference.eval(), *args), average)
            out.extend(float(x) for x in beta * lp)
    return out


def _eval_rows(run_dir: Path, name: str) -> list[dict]:
    return read_jsonl(run_dir / name / "eval_responses.jsonl", missing_ok=True)


def _gap(kind: str, cfg: Any, result: dict, rows: list[dict], sft_rows: list[dict]) -> dict:
    from alignkit.models.load import load_model, load_tokenizer

    prompts = [r["prompt"] for r in rows]
    mine, theirs = [r["response"] for r in rows], [r["response"] for r in sft_rows]
    if kind == "ppo":
        from alignkit.feedback.judges import RewardModelJudge
        from alignkit.models.heads import load_reward_model

        judge = RewardModelJudge(load_reward_model(cfg.reward.model), load_tokenizer(cfg.reward.model), batch_size=64)
        proxy = judge.rewards(prompts * 2, mine + theirs)
        label = "reward model"
    else:
        policy, tok = load_model(result["model"]), load_tokenizer(result["model"])
        ref = load_model(cfg.reference_path or cfg.model.path) if cfg.uses_reference else None
        proxy = implicit_rewards(policy, ref, tok, prompts * 2, mine + theirs, cfg.beta, cfg.average_logps)
        label = "implicit reward"
    n = len(rows)
    gap = proxy_gold_gap(proxy[:n], proxy[n:], [r["score"] for r in rows], [r["score"] for r in sft_rows])
    return {"proxy": label, **gap}


def annotate_stage(summary: dict, name: str, cfg: Any, result: dict, run_dir: str | Path | None = None) -> dict:
    """Add the head-to-head figures to summary["stages"][name] for a DPO or PPO run: models held,
    model-state memory, tokens sampled, hyperparameter counts, the training style and, when the
    stage and SFT were evaluated (OUT/NAME/eval_responses.jsonl, as `Demo.evaluate` writes), the
    proxy-minus-gold gap. Call it after `Demo.evaluate(name, ...)`. `run_dir` defaults to the
    folder of summary["report"]. Returns the entry."""
    kind = type(cfg).__module__.rsplit(".", 1)[-1]
    if kind not in ("dpo", "ppo"):
        raise ValueError(f"annotate_stage knows DPO and PPO configs, not {type(cfg).__module__}")
    entry = summary["stages"].setdefault(name, {"dir": name})
    if run_dir is None and summary.get("report"):
        run_dir = Path(summary["report"]).parent
    models = models_in_memory(cfg)
    hp = count_hyperparameters(cfg)
    entry.update({
        "method": kind,
        "models": [m[0] for m in models],
        "models_in_memory": len(models),
        "models_note": _models_note(cfg),
        "state_mb": state_mb(models),
        "n_hyperparameters": hp["method"],
        "hyperparameters": hp,
        "seed": cfg.train.seed,
    })
    if kind == "dpo":
        entry["tokens_sampled"] = 0
        entry["training"] = (f"offline: {result.get('steps', cfg.train.max_steps)} steps x {cfg.train.batch_size} "
                             f"pairs, loss {cfg.loss}, beta {cfg.beta:g}")
    else:
        rows = read_jsonl(result.get("metrics") or (Path(run_dir or ".") / entry.get("dir", name) / "metrics.jsonl"),
                          missing_ok=True)
        entry["tokens_sampled"] = tokens_sampled(rows, cfg.rollout_batch)
        entry["sampling_s"] = sum(r.get("rollout_s", 0.0) for r in rows)
        entry["reward_source"] = {"model": "reward model", "gold": "gold judge"}.get(cfg.reward.source, cfg.reward.function)
        entry["training"] = (f"on-policy: {cfg.iterations} iterations x {cfg.rollout_batch} sampled responses, "
                             f"{cfg.ppo_epochs} PPO epochs, KL coef {cfg.kl_coef:g}")
        if rows and "gold" in rows[0]:
            entry["train_curve"] = {k: [rows[0][k], rows[-1][k]] for k in ("reward", "gold", "kl")}
    entry["proxy_gold_gap"], entry["proxy_gold_gap_note"] = None, ""
    if kind == "ppo" and cfg.reward.source != "model":
        entry["proxy_gold_gap_note"] = f"PPO optimised reward.source={cfg.reward.source}, not a learned proxy"
    elif run_dir is None:
        entry["proxy_gold_gap_note"] = "no run directory with evaluated answers"
    else:
        rows, sft_rows = _eval_rows(Path(run_dir), name), _eval_rows(Path(run_dir), "sft")
        if not rows or len(rows) != len(sft_rows) or any(a["prompt"] != b["prompt"] for a, b in zip(rows, sft_rows)):
            entry["proxy_gold_gap_note"] = "needs the stage's and SFT's answers to the same held-out prompts"
        else:
            entry["proxy_gold_gap"] = _gap(kind, cfg, result, rows, sft_rows)
    return entry


# ------------------------------------------------------------------------------- the table

CLAIMS = {
    # aspect: (the claimed RLHF cell, the claimed DPO cell)
    "Models needed": ("3 (policy, reward, ref)", "2 (policy, ref)"),
    "Training": ("RL (PPO)", "Supervised (standard backprop)"),
    "Stability": ("Tricky (RL instability)", "Stable (classification-like)"),
    "Memory": ("High (3 models)", "Medium (2 models)"),
    "Speed": ("Slow (sampling required)", "Fast (offline data)"),
    "Tokens sampled": ("", ""),
    "Reward hacking": ("Possible", "Less likely"),
    "Hyperparameters": ("Many (PPO params)", "Few (β only)"),
    "Performance": ("Slightly better (when tuned)", "Competitive"),
    "Win rate vs SFT": ("", ""),
    "KL to SFT": ("", ""),
}
"""The usual head-to-head table of claims, row by row, plus the rows the measurement adds."""


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _models_cell(s: dict) -> str:
    if "models" not in s:
        return "n/a"
    text = f"{s['models_in_memory']}: {', '.join(s['models'])}"
    return f"{text} ({s['models_note']})" if s.get("models_note") else text


def _memory_cell(s: dict) -> str:
    parts = []
    if _num(s.get("peak_mem_mb")):
        peak = f"peak {s['peak_mem_mb']:.0f} MB"
        if _num(s.get("mem_added_mb")):
            peak += f" (stage: +{s['mem_added_mb']:.0f} MB)"
        parts.append(peak)
    if _num(s.get("state_mb")):
        parts.append(f"model states {s['state_mb']:.1f} MB")
    return "; ".join(parts) or "n/a"


def _speed_cell(s: dict) -> str:
    if not _num(s.get("wall_s")):
        return "n/a"
    text = f"{s['wall_s']:.1f} s"
    if _num(s.get("sampling_s")):
        text += f", of which sampling {s['sampling_s']:.1f} s"
    return text


def _gap_cell(s: dict) -> str:
    g = s.get("proxy_gold_gap")
    if isinstance(g, dict):
        return f"{g['gap']:+.2f} ({g['proxy']} {g['proxy_win_rate']:.2f} vs gold {g['gold_win_rate']:.2f})"
    return f"n/a: {s['proxy_gold_gap_note']}" if s.get("proxy_gold_gap_note") else "n/a"


def _hp_cell(s: dict) -> str:
    h = s.get("hyperparameters")
    if not isinstance(h, dict):
        return "n/a"
    text = f"{h['method']} method + {h['shared']} shared"
    return text + (f" ({h['changed']} changed from defaults)" if h.get("changed") is not None else "")


def _perf_cell(s: dict, sft: dict) -> str:
    if not _num(s.get("gold_score")):
        return "n/a"
    text = f"gold {s['gold_score']:.3f}"
    return text + (f" (SFT {sft['gold_score']:.3f})" if _num(sft.get("gold_score")) else "")


def _cells(s: dict, sft: dict) -> dict[str, str]:
    tokens = s.get("tokens_sampled")
    return {
        "Models needed": _models_cell(s),
        "Training": s.get("training", "n/a"),
        "Stability": "not measured (one seed)",
        "Memory": _memory_cell(s),
        "Speed": _speed_cell(s),
        "Tokens sampled": f"{tokens:,}" if isinstance(tokens, int) else "n/a",
        "Reward hacking": _gap_cell(s),
        "Hyperparameters": _hp_cell(s),
        "Performance": _perf_cell(s, sft),
        "Win rate vs SFT": win_cell(s, "n/a", with_n=True),
        "KL to SFT": f"{s['kl']:.3f}" if _num(s.get("kl")) else "n/a",
    }


def comparison_table(summary: dict) -> list[dict]:
    """One row per aspect: {"aspect", "rlhf_claim", "ppo", "dpo_claim", "dpo"}, from the "ppo"
    and "dpo" stage entries of a summary (missing figures read "n/a")."""
    stages = summary.get("stages", {})
    sft = stages.get("sft", {})
    ppo, dpo = _cells(stages.get("ppo", {}), sft), _cells(stages.get("dpo", {}), sft)
    return [
        {"aspect": a, "rlhf_claim": rc, "ppo": ppo[a], "dpo_claim": dc, "dpo": dpo[a]}
        for a, (rc, dc) in CLAIMS.items()
    ]


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|")


def render_comparison(summary: dict) -> str:
    """The head-to-head table in markdown, with a line on how each figure was measured."""
    lines = [
        "| aspect | claim: RLHF | measured: PPO | claim: DPO | measured: DPO |",
        "|---|---|---|---|---|",
    ]
    for r in comparison_table(summary):
        cells = [r["aspect"], r["rlhf_claim"], r["ppo"], r["dpo_claim"], r["dpo"]]
        lines.append("| " + " | ".join(_md_cell(c) for c in cells) + " |")
    return "\n".join(lines)


def render_beta_sweep(summary: dict) -> str:
    """The beta sweep as a markdown table ('' when there is none). The margin is the last logged
    batch's rewards/margins, beta * (log-ratio of chosen - log-ratio of rejected); divided by
    beta it is how far the policy moved the pair apart, comparable across betas."""
    sweep = summary.get("beta_sweep") or []
    if not sweep:
        return ""
    lines = ["| beta | gold score | KL to SFT | win rate vs SFT | final margin | margin / beta | steps | wall s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in sweep:
        m = r.get("margin")
        margin, ratio = (f"{m:.3f}", f"{m / r['beta']:.2f}") if _num(m) else ("", "")
        lines.append(f"| {r['beta']:g} | {r['gold_score']:.3f} | {r['kl']:.3f} | {win_cell(r, 'n/a', with_n=True)} | {margin} | {ratio} | "
                     f"{r.get('steps', '')} | {r.get('wall_s', 0.0):.1f} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------- running


def _proc_status_mb(field_name: str) -> float | None:
    """VmRSS / VmHWM of this process from /proc/self/status (Linux), in MB; None elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS (Linux >= 4.0: clear_refs 5)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return _proc_status_mb("VmHWM") is not None


def _stage_in_child(module_name: str, cfg: Any) -> dict:
    """Run `module.run(cfg)` in this (fresh) process; its wall time and peak memory: the kernel's
    peak RSS, reset after the imports so their transient peak does not count (CPU), or the
    allocator's peak (CUDA). base_mem_mb: the RSS when the stage started (None if unknown)."""
    import importlib

    import torch

    module = importlib.import_module(module_name)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = None
    else:
        base = _proc_status_mb("VmRSS") if _reset_peak_rss() else None
    start = time.perf_counter()
    result = module.run(cfg)
    wall = time.perf_counter() - start
    if cuda:
        peak = torch.cuda.max_memory_allocated() / 2**20
    elif base is not None:
        peak = _proc_status_mb("VmHWM") or 0.0
    else:
        import resource

        unit = 2**20 if sys.platform == "darwin" else 2**10  # ru_maxrss: bytes on macOS, KiB on Linux
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / unit
    return {"result": result, "wall_s": wall, "peak_mem_mb": peak, "base_mem_mb": base}


def run_isolated(module_name: str, cfg: Any) -> dict:
    """`_stage_in_child` in a fresh spawned process (nothing of this process's memory counts)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_stage_in_child, module_name, cfg).result()


def train_stage(d: Any, name: str, module: Any, cfg: Any, isolate: bool) -> dict:
    """Run one training stage for the Demo `d`, recording wall time and peak memory in
    d.summary["stages"][name] (as Demo.run_stage does; in a fresh process when `isolate`)."""
    if not isolate:
        result = d.run_stage(name, lambda: module.run(cfg))
        d.summary["stages"][name]["memory_measure"] = "sampled RSS of the whole process (earlier stages included)"
        return result
    rec = run_isolated(module.__name__, cfg)
    result = rec["result"]
    entry = {"wall_s": rec["wall_s"], "peak_mem_mb": rec["peak_mem_mb"], "dir": name,
             "memory_measure": "peak RSS of a fresh process running only this stage"}
    if rec["base_mem_mb"] is not None:
        entry["mem_added_mb"] = rec["peak_mem_mb"] - rec["base_mem_mb"]
    if isinstance(result, dict) and result.get("final_loss") is not None:
        entry["train_loss"] = result["final_loss"]
    d.summary["stages"][name] = entry
    return result


def score_model(d: Any, model_dir: str | Path, out_dir: Path) -> dict:
    """Gold score, win rate against SFT and KL to SFT of a model, as Demo.evaluate measures them,
    without adding a stage to the summary (the sweep's runs)."""
    from alignkit.eval import gold
    from alignkit.eval.policy_kl import sequence_kl
    from alignkit.eval.winrate import win_rate_entry
    from alignkit.models.load import load_model, load_tokenizer

    model, tok = load_model(model_dir), load_tokenizer(model_dir)
    scores, rows = gold.evaluate(model, tok, d.world, d.prompts, d.eval_cfg)
    gold.write_jsonl_atomic(out_dir / "eval_responses.jsonl", rows)
    ref = load_model(d.summary["stages"]["sft"]["model"])
    kl = sequence_kl(model, ref, tok, d.prompts, d.eval_cfg.max_new_tokens, d.seed)
    return {"gold_score": scores["gold_score"], "per_category": scores["per_category"],
            "win_rate_vs_sft": win_rate_entry([r["score"] for r in rows], d.scores["sft"]), "kl": kl}


def rlhf_notes(n_reward_models: int) -> str:
    """The report's note on a PPO stage that optimises learned reward models (their mean when several)."""
    proxy = f"the mean of {n_reward_models} learned reward models" if n_reward_models > 1 else "the learned reward model"
    return f"RLHF: rewards from {proxy} (proxy) minus a KL penalty to the SFT model; the gold judge only evaluates"


def _open_demo(cfg: Config):
    """A `Demo` on the existing world of the SFT model, titled for the comparison."""
    from alignkit.pipeline import Demo

    extra = [f"limit={cfg.eval_limit}"] if cfg.eval_limit else []
    extra += [f"max_new_tokens={cfg.eval_max_new_tokens}"] if cfg.eval_max_new_tokens else []
    d = Demo(Path(cfg.out), cfg.quick, cfg.seed, world_dir=cfg.world_dir, eval_overrides=extra)
    d.summary["title"] = "alignkit compare: RLHF (PPO) vs DPO"
    d.summary["compare"] = {"sft": cfg.sft_dir, "reward": cfg.reward_dir, "reward_ensemble": cfg.ensemble_dirs,
                            "isolate": cfg.isolate}
    return d


def _check(cfg: Config) -> None:
    for key, path, what in (("sft", cfg.sft_dir, "the SFT model directory"),
                            ("reward", cfg.reward_dir, "the reward model directory"),
                            ("world", cfg.world_dir, "the world directory")):
        if key == "reward" and "ppo" not in cfg.methods:
            continue
        if not path:
            raise ConfigError(f"config key '{key}' is required ({what}), or set 'demo' to a demo run directory")
        if not Path(path).exists():
            raise ConfigError(f"config key '{key}': {path} does not exist ({what})")


def _stage_config(module: Any, preset: str | None, name: str, base: list[str], d: Any, extra: list[str]) -> Any:
    from alignkit.pipeline import CONFIGS

    path = preset or CONFIGS / f"{name}.yaml"
    return load_config(module.Config, path, base + [f"train.seed={d.seed}", "train.overwrite=true"] + d.q(name) + extra)


def run(cfg: Config) -> dict:
    """Train DPO and PPO from one SFT model, evaluate both, sweep DPO's beta; write the report."""
    from alignkit.train import dpo, ppo

    _check(cfg)
    d = _open_demo(cfg)
    out, world = d.out, d.world_dir
    d.evaluate("sft", cfg.sft_dir)

    dpo_base = [f"model.path={cfg.sft_dir}", f"data.path={world / 'preferences.jsonl'}"]
    if "dpo" in cfg.methods:
        dcfg = _stage_config(dpo, cfg.dpo_config, "dpo", dpo_base + [f"out={out / 'dpo'}"], d, cfg.dpo_overrides)
        res = train_stage(d, "dpo", dpo, dcfg, cfg.isolate)
        d.evaluate("dpo", res["model"])
        annotate_stage(d.summary, "dpo", dcfg, res, out)
        d.save()
    if "ppo" in cfg.methods:
        pcfg = _stage_config(ppo, cfg.ppo_config, "ppo", [
            f"model.path={cfg.sft_dir}", f"world={world}", f"out={out / 'ppo'}",
            "reward.source=model", f"reward.model={cfg.reward_dir}"], d, cfg.ppo_overrides)
        if cfg.ensemble_dirs and not pcfg.reward.ensemble:  # an ensemble in ppo_overrides wins
            pcfg = dataclasses.replace(pcfg, reward=dataclasses.replace(pcfg.reward, ensemble=tuple(cfg.ensemble_dirs)))
        res = train_stage(d, "ppo", ppo, pcfg, cfg.isolate)
        d.summary["stages"]["ppo"]["notes"] = rlhf_notes(1 + len(pcfg.reward.ensemble))
        d.evaluate("ppo", res["model"])
        annotate_stage(d.summary, "ppo", pcfg, res, out)
        d.save()

    sweep: list[dict] = []
    for beta in cfg.betas:
        run_dir = out / "sweep" / f"beta_{beta:g}"
        scfg = _stage_config(dpo, cfg.dpo_config, "dpo", dpo_base + [
            f"out={run_dir}", f"cache_dir={out / 'sweep' / 'ref_cache'}", "eval_world=null"], d, [
            f"loss={cfg.sweep_loss}", f"beta={beta}", f"train.max_steps={cfg.sweep_steps}", *cfg.sweep_overrides])
        start = time.perf_counter()
        res = dpo.run(scfg)
        row = {"beta": beta, "loss": scfg.loss, "steps": res.get("steps"), "wall_s": time.perf_counter() - start,
               "margin": (res.get("metrics") or {}).get("rewards/margins"), "train_loss": res.get("final_loss"),
               **score_model(d, res["model"], run_dir)}
        sweep.append(row)
        d.summary["beta_sweep"] = sweep
        d.save()
    d.save()
    return d.summary
