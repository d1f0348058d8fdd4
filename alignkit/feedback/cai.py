"""Constitutional AI (Bai et al. 2022, "Constitutional AI: Harmlessness from AI Feedback").

Two stages, each a frozen config plus a function returning a summary dict:

    revise(ReviseConfig)   SL-CAI: sample a response, then for n_rounds pick a principle, ask
                           the model to critique its response and then to revise it. Writes
                           OUT/chains.jsonl (every step, for inspection) and OUT/sft.jsonl
                           {"prompt", "response" = final revision} for `alignkit sft`.
    label(LabelConfig)     RL-CAI: sample two responses per prompt from the policy; ask the
                           feedback model each of n_principles multiple-choice questions in BOTH
                           orders; P(a better) = mean over principles of the order-averaged,
                           two-label-normalised probabilities. Writes OUT/preferences.jsonl
                           {"prompt", "chosen", "rejected", "soft_label" = P(chosen better) >= 0.5}
                           for `alignkit reward` (soft Bradley-Terry) or `alignkit dpo`, and
                           OUT/labels.jsonl with the per-principle, per-order evidence.

    python -m alignkit.feedback.cai revise --config configs/cai.yaml model=runs/sft/final prompts=P out=runs/cai
    python -m alignkit.feedback.cai label policy=runs/cai-sl/final feedback=runs/sft/final prompts=P out=runs/cai-rl

The models are local directories or OpenAI-compatible endpoints (alignkit.feedback.backends).
The prompt formats are fixed (alignkit.feedback.constitution); docs/cai.md shows them.
"""

from __future__ import annotations

import json
import random
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from alignkit.config import check_required, required
from alignkit.data.records import Prompt
from alignkit.feedback.constitution import (
    Constitution,
    critique_prompt,
    load_constitution,
    preference_prompt,
    revision_prompt,
)
from alignkit.models.generate import SamplingParams


@dataclass(frozen=True)
class ReviseConfig:
    """SL-CAI: critique and revision chains, and an SFT file of final revisions."""

    model: str = required()
    """The model that answers, critiques and revises: a local directory or an http(s) base URL."""
    model_name: str = "default"
    """Model name sent to an endpoint (ignored for a local directory)."""
    api_key_env: str | None = None
    """Environment variable holding the endpoint's API key (None: no key, e.g. a local server)."""
    prompts: str = required()
    """Prompt file (any prompt format of `alignkit data inspect`), typically red-team prompts."""
    constitution: str = "harmless"
    """A built-in constitution name or a .yaml / .json file."""
    n_rounds: int = 1
    """Critique-revision rounds per prompt; each round draws a principle."""
    seed: int = 0
    """Seed of the principle draws and of the response sampling."""
    out: str = required()
    """Output directory: chains.jsonl, sft.jsonl, summary.json."""
    limit: int = 0
    """Use only the first N prompts (0: all)."""
    max_new_tokens: int = 64
    """Longest response, critique or revision."""
    temperature: float = 1.0
    """Sampling temperature of the initial response (0: greedy)."""
    top_p: float = 1.0
    """Nucleus mass of the initial response's sampling."""
    critique_temperature: float = 0.0
    """Temperature of critiques and revisions (0: greedy)."""
    batch_size: int = 32
    """Prompts generated together (local model) or requests in flight (endpoint: max 8)."""


@dataclass(frozen=True)
class LabelConfig:
    """RL-CAI: AI preference labels with soft probabilities."""

    policy: str = required()
    """The model whose two responses per prompt are compared: a local directory or an http(s) base URL."""
    policy_name: str = "default"
    """Model name sent to a policy endpoint."""
    feedback: str = required()
    """The model that answers the constitution's multiple-choice questions: directory or http(s) URL."""
    feedback_name: str = "default"
    """Model name sent to a feedback endpoint."""
    api_key_env: str | None = None
    """Environment variable holding the endpoints' API key (None: no key)."""
    prompts: str = required()
    """Prompt file (any prompt format of `alignkit data inspect`)."""
    constitution: str = "harmless"
    """A built-in constitution name or a .yaml / .json file."""
    n_principles: int = 4
    """Principles asked per pair, drawn without replacement (0: all of them)."""
    seed: int = 0
    """Seed of the response sampling and the principle draws."""
    out: str = required()
    """Output directory: preferences.jsonl, labels.jsonl, summary.json."""
    limit: int = 0
    """Use only the first N prompts (0: all)."""
    max_new_tokens: int = 48
    """Longest policy response."""
    temperature: float = 1.0
    """Policy sampling temperature (> 0, so the two responses differ)."""
    top_p: float = 1.0
    """Policy nucleus sampling mass."""
    keep_identical: bool = False
    """Keep pairs whose two responses are the same text (they teach nothing; dropped by default)."""
    batch_size: int = 32
    """Sequences per forward (local) or requests in flight (endpoint: max 8)."""


def _check(cfg: Any) -> None:
    from alignkit.config import ConfigError

    check_required(cfg)
    at_least = {"n_rounds": 1, "n_principles": 0, "limit": 0, "max_new_tokens": 1, "batch_size": 1}
    for key, low in at_least.items():
        value = getattr(cfg, key, low)
        if value < low:
            raise ConfigError(f"config key '{key}' must be >= {low}, got {value}")
    if cfg.temperature < 0 or getattr(cfg, "critique_temperature", 0.0) < 0:
        raise ConfigError("config keys 'temperature' and 'critique_temperature' must be >= 0")
    if isinstance(cfg, LabelConfig) and cfg.temperature == 0:
        raise ConfigError(
            "config key 'temperature' must be > 0: greedy decoding gives the same response twice"
        )


def _sampling(max_new_tokens: int, temperature: float, top_p: float, seed: int) -> SamplingParams:
    if temperature <= 0:
        return SamplingParams(max_new_tokens=max_new_tokens, greedy=True, seed=seed)
    return SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)


def _per_row(params: SamplingParams, step: int, first: int, n: int) -> SamplingParams:
    """`params` with one seed per prompt, from (seed, step, the prompt's global index): a prompt's
    sample does not depend on the batch or on the rank that draws it. Greedy: unchanged."""
    from alignkit.train.distributed import row_seeds

    if params.seed is None or params.greedy or params.temperature == 0:
        return params
    return replace(params, row_seeds=row_seeds(params.seed, step, first, n))


def _backend(spec: str, name: str, api_key_env: str | None, batch_size: int):
    from alignkit.feedback.backends import make_backend

    if spec.startswith(("http://", "https://")):
        return make_backend(spec, name, api_key_env, max_workers=min(batch_size, 8))
    return make_backend(spec, batch_size=batch_size)


def _read_prompts(path: str, limit: int) -> list[tuple[Prompt, str | None]]:
    from alignkit.data.load import load_records

    records = load_records(path, kind="prompt", limit=limit).records
    if not records:
        raise ValueError(f"{path}: no prompts")
    return [(r.prompt, r.category) for r in records]


def prompt_json(prompt: Prompt) -> Any:
    """A prompt as written to JSONL: the string, or a list of {"role", "content"}."""
    if isinstance(prompt, str):
        return prompt
    return [{"role": m.role, "content": m.content} for m in prompt]


def _write(out: Path, files: dict[str, list[dict]], summary: dict) -> None:
    from alignkit.eval.gold import write_jsonl_atomic, write_text_atomic

    for name, rows in files.items():
        write_jsonl_atomic(out / name, rows)
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=2, sort_keys=True) + "\n")


# --- SL-CAI --------------------------------------------------------------------------------------


def principle_draws(constitution: Constitution, seed: int, index: int, n_rounds: int) -> list:
    """The principles of prompt `index`, one per round (with replacement, as each round samples
    afresh); a function of (seed, index) only, so batching and prompt order change nothing."""
    rng = random.Random(f"alignkit-cai:{seed}:revise:{index}")
    return [rng.choice(constitution.principles) for _ in range(n_rounds)]


def revise_chains(
    backend: Any,
    prompts: Sequence[Prompt],
    constitution: Constitution,
    n_rounds: int = 1,
    seed: int = 0,
    response_params: SamplingParams | None = None,
    critique_params: SamplingParams | None = None,
    first: int = 0,
) -> list[dict]:
    """Critique-revision chains, one dict per prompt:

    {"response": first answer, "rounds": [{"principle", "critique_request", "critique",
    "revision_request", "revision"}, ...], "revision": final revision}. Each round critiques the
    current response (the previous round's revision; an empty revision keeps the previous one)
    in a fresh conversation: prompt, response, critique request.

    `prompts` are prompts first, first + 1, ... of the run (a rank's share): the principles and
    every sample of prompt i depend on (seed, first + i) only, so the shares of N ranks give the
    chains of one process.
    """
    n = len(prompts)
    response_params = response_params or SamplingParams(max_new_tokens=48, seed=seed)
    critique_params = critique_params or SamplingParams(max_new_tokens=48, greedy=True)
    current = backend.generate(list(prompts), _per_row(response_params, 0, first, n))
    chains = [{"response": r, "rounds": []} for r in current]
    draws = [principle_draws(constitution, seed, first + i, n_rounds) for i in range(n)]
    for rnd in range(n_rounds):
        principles = [d[rnd] for d in draws]
        params = critique_params
        if params.seed is not None:  # a fresh stream per round and step when critiques are sampled
            params = replace(params, seed=params.seed + 2 * rnd + 1)
        critiques = backend.generate(
            [critique_prompt(p, r, pr) for p, r, pr in zip(prompts, current, principles)],
            _per_row(params, 0, first, n),
        )
        if params.seed is not None:
            params = replace(params, seed=params.seed + 1)
        revisions = backend.generate(
            [revision_prompt(p, r, pr, c) for p, r, pr, c in zip(prompts, current, principles, critiques)],
            _per_row(params, 0, first, n),
        )
        for i, (pr, c, rev) in enumerate(zip(principles, critiques, revisions)):
            chains[i]["rounds"].append({
                "principle": pr.name,
                "critique_request": pr.critique_request,
                "critique": c,
                "revision_request": pr.revision_request,
                "revision": rev,
            })  # fmt: skip
            if rev.strip():
                current[i] = rev
    for chain, final in zip(chains, current):
        chain["revision"] = final
    return chains


def revise(cfg: ReviseConfig) -> dict:
    """Run SL-CAI's critique-revision stage; returns the summary (also OUT/summary.json).

    Under torchrun each rank writes the chains of its share of the prompts, gathered in order;
    rank 0 writes the files (the same files as one process)."""
    from alignkit.train.distributed import all_gather_list, barrier, init_dist, share

    _check(cfg)
    start = time.perf_counter()
    dist = init_dist()
    constitution = load_constitution(cfg.constitution)
    rows = _read_prompts(cfg.prompts, cfg.limit)
    backend = _backend(cfg.model, cfg.model_name, cfg.api_key_env, cfg.batch_size)
    lo, hi = share(len(rows), dist)
    chains = all_gather_list(revise_chains(
        backend, [p for p, _ in rows[lo:hi]], constitution, cfg.n_rounds, cfg.seed,
        _sampling(cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.seed),
        _sampling(cfg.max_new_tokens, cfg.critique_temperature, 1.0, cfg.seed + 10_000), first=lo,
    ), dist)  # fmt: skip
    chain_rows, sft_rows = [], []
    for (prompt, category), chain in zip(rows, chains):
        head = {"prompt": prompt_json(prompt)} | ({"category": category} if category else {})
        chain_rows.append(head | chain)
        if chain["revision"].strip():
            sft_rows.append(head | {"response": chain["revision"]})
    out = Path(cfg.out)
    summary = {
        "prompts": len(rows),
        "sft_records": len(sft_rows),
        "empty_revisions": sum(not r["revision"].strip() for c in chains for r in c["rounds"]),
        "changed": sum(c["revision"].strip() != c["response"].strip() for c in chains) / len(chains),
        "principles": dict(Counter(r["principle"] for c in chains for r in c["rounds"])),
        "constitution": constitution.name,
        "n_rounds": cfg.n_rounds,
        "chains": str(out / "chains.jsonl"),
        "sft": str(out / "sft.jsonl"),
        "wall_s": time.perf_counter() - start,
    }
    if dist.main:
        _write(out, {"chains.jsonl": chain_rows, "sft.jsonl": sft_rows}, summary)
    barrier(dist)
    return summary


# --- RL-CAI --------------------------------------------------------------------------------------


def label_pairs(
    feedback: Any,
    prompts: Sequence[Prompt],
    a: Sequence[str],
    b: Sequence[str],
    constitution: Constitution,
    n_principles: int = 4,
    seed: int = 0,
    first: int = 0,
) -> list[dict]:
    """P(a better than b) per pair from the feedback model's multiple-choice answers.

    For pair i (pair first + i of the run: a rank's share starts at `first`), principles are
    drawn from random.Random((seed, first + i)); each is asked twice, with a
    shown first and with b shown first. With q1 = P(first | a first) and q2 = P(first | b first),
    both normalised over the two labels, the principle's p_a = (q1 + 1 - q2) / 2 (the
    order-averaged estimate of `alignkit.feedback.judges.both_orders`), and the pair's p_a is the
    mean over its principles. A model that always picks the first position gives q1 = q2 and
    p_a = 0.5 exactly. Returns {"p_a", "principles": [{"name", "p_a", "p_a_first", "p_a_second"}]}.
    """
    from alignkit.feedback.judges import both_orders

    questions, owners = [], []
    for i, (p, x, y) in enumerate(zip(prompts, a, b)):
        rng = random.Random(f"alignkit-cai:{seed}:label:{first + i}")
        for pr in constitution.sample(rng, n_principles):
            questions += [preference_prompt(p, x, y, pr, constitution.choices),
                          preference_prompt(p, y, x, pr, constitution.choices)]  # fmt: skip
            owners.append((i, pr.name))
    verdicts = both_orders(feedback.choice_probs(questions, constitution.choices))
    out: list[dict] = [{"principles": []} for _ in prompts]
    for (i, name), v in zip(owners, verdicts):
        out[i]["principles"].append(
            {
                "name": name,
                "p_a": v.p_a,
                "p_a_first": v.detail["p_a_first"],
                "p_a_second": v.detail["p_a_second"],
            }
        )
    for row in out:
        row["p_a"] = sum(x["p_a"] for x in row["principles"]) / max(len(row["principles"]), 1)
    return out


def label(cfg: LabelConfig) -> dict:
    """Run RL-CAI's labelling stage; returns the summary (also OUT/summary.json).

    Under torchrun each rank samples the pairs of its share of the prompts, then asks the
    feedback model about its share of the kept pairs; both are gathered in order and rank 0
    writes the files (the same files as one process)."""
    from alignkit.train.distributed import all_gather_list, barrier, init_dist, share

    _check(cfg)
    start = time.perf_counter()
    dist = init_dist()
    constitution = load_constitution(cfg.constitution)
    rows = _read_prompts(cfg.prompts, cfg.limit)
    policy = _backend(cfg.policy, cfg.policy_name, cfg.api_key_env, cfg.batch_size)
    feedback = (
        policy
        if cfg.feedback == cfg.policy
        else _backend(cfg.feedback, cfg.feedback_name, cfg.api_key_env, cfg.batch_size)
    )
    lo, hi = share(len(rows), dist)
    doubled = [p for p, _ in rows[lo:hi] for _ in (0, 1)]  # the two samples of a prompt: rows 2i, 2i + 1
    params = _sampling(cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.seed)
    responses = all_gather_list(policy.generate(doubled, _per_row(params, 0, 2 * lo, len(doubled))), dist)
    # a pair with an empty answer is no preference the data loader accepts ("empty chosen"): dropped
    empty = {i for i in range(len(rows)) if not responses[2 * i].strip() or not responses[2 * i + 1].strip()}
    kept = [i for i in range(len(rows)) if i not in empty
            and (cfg.keep_identical or responses[2 * i].strip() != responses[2 * i + 1].strip())]  # fmt: skip
    prompts = [rows[i][0] for i in kept]
    a, b = [responses[2 * i] for i in kept], [responses[2 * i + 1] for i in kept]
    klo, khi = share(len(kept), dist)
    labels = all_gather_list(label_pairs(feedback, prompts[klo:khi], a[klo:khi], b[klo:khi], constitution,
                                         cfg.n_principles, cfg.seed, first=klo) if khi > klo else [], dist)
    prefs, details = [], []
    for i, x, y, lab in zip(kept, a, b, labels):
        prompt, category = rows[i]
        p_a = lab["p_a"]
        chosen, rejected = (x, y) if p_a >= 0.5 else (y, x)
        head = {"prompt": prompt_json(prompt)} | ({"category": category} if category else {})
        prefs.append(head | {"chosen": chosen, "rejected": rejected, "soft_label": max(p_a, 1.0 - p_a)})
        details.append(head | {"a": x, "b": y, **lab})
    first = [p["p_a_first"] for d in details for p in d["principles"]]
    second = [p["p_a_second"] for d in details for p in d["principles"]]
    out = Path(cfg.out)
    summary = {
        "prompts": len(rows),
        "pairs": len(prefs),
        "dropped_identical": len(rows) - len(kept) - len(empty),
        "dropped_empty": len(empty),
        "mean_soft_label": sum(p["soft_label"] for p in prefs) / len(prefs) if prefs else None,
        "n_principles": cfg.n_principles or len(constitution),
        "constitution": constitution.name,
        # how often the decision changes with the order, and how often the first position wins
        "position_bias": _position_stats(first, second),
        "unread_answers": getattr(feedback, "unread", 0),
        "preferences": str(out / "preferences.jsonl"),
        "labels": str(out / "labels.jsonl"),
        "wall_s": time.perf_counter() - start,
    }
    if dist.main:
        _write(out, {"preferences.jsonl": prefs, "labels.jsonl": details}, summary)
    barrier(dist)
    return summary


def _position_stats(p_a_first: list[float], p_a_second: list[float]) -> dict:
    """flip_rate: share of questions whose decision changes with the order; first_position_rate:
    share of all answers that picked the first position (0.5 is unbiased)."""
    n = len(p_a_first)
    if not n:
        return {}
    flips = sum((p1 - 0.5) * (p2 - 0.5) < 0 for p1, p2 in zip(p_a_first, p_a_second))
    # p_a_first is P(first) when a is first; 1 - p_a_second is P(first) when b is first
    firsts = sum(p1 > 0.5 for p1 in p_a_first) + sum(1.0 - p2 > 0.5 for p2 in p_a_second)
    return {"flip_rate": flips / n, "first_position_rate": firsts / (2 * n)}


STAGES = {"revise": (ReviseConfig, revise), "label": (LabelConfig, label)}
"""`alignkit cai <name>`: name -> (config dataclass, function)."""

Config = ReviseConfig
"""The stage-module convention of alignkit.cli (`Config`, `run`): `alignkit cai revise` and
`alignkit cai label` are the two entry points; revise is the default."""


def run(cfg: ReviseConfig | LabelConfig) -> dict:
    """Run the stage `cfg` configures (ReviseConfig: revise, LabelConfig: label)."""
    return label(cfg) if isinstance(cfg, LabelConfig) else revise(cfg)


def load_stage_config(stage: str, path: str | Path | None = None, overrides: Sequence[str] = ()) -> Any:
    """The config of `stage` ("revise" or "label") from an optional YAML file plus key=value overrides.

    The file is either flat (that stage's keys) or has one section per stage (`revise:`,
    `label:`), like configs/cai.yaml. Unknown or ill-typed keys are a ConfigError naming the key.
    """
    import yaml

    from alignkit.config import ConfigError, build, parse_override

    if stage not in STAGES:
        raise ConfigError(f"unknown cai stage {stage!r} (valid: {', '.join(STAGES)})")
    cls = STAGES[stage][0]
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: expected a mapping of config keys at the top level")
        if data and set(data) <= set(STAGES):
            data = data.get(stage) or {}
            if not isinstance(data, dict):
                raise ConfigError(f"{p}: section '{stage}' must be a mapping")
        tree = dict(data)
    for text in overrides:
        key, value = parse_override(text)
        tree[key] = value
    try:
        return build(cls, tree)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path is not None else str(e)) from None


def main(argv: list[str] | None = None) -> int:
    """`python -m alignkit.feedback.cai {revise,label} [--config FILE] [--print-config] [key=value ...]`."""
    import argparse

    from alignkit.config import to_dict

    parser = argparse.ArgumentParser(prog="alignkit cai", description="Constitutional AI stages")
    parser.add_argument("stage", choices=sorted(STAGES))
    parser.add_argument("--config", help="YAML config file (flat, or with revise: / label: sections)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_intermixed_args(argv)
    try:
        cfg = load_stage_config(args.stage, args.config, args.overrides)
        if args.print_config:
            print(json.dumps(to_dict(cfg), indent=2))
            return 0
        result = STAGES[args.stage][1](cfg)
    except (ValueError, FileNotFoundError) as e:  # ConfigError, DataError, ConstitutionError, EndpointError
        print(f"alignkit: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
