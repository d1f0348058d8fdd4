"""Win rate of model A against model B under a pairwise judge, with a confidence interval.

    alignkit winrate a=runs/dpo/model b=runs/sft/model judge=gold world=runs/world out=runs/winrate

    rate, lo, hi = win_rate([1, 0.5, 0, 1])      # per-prompt outcomes, ties count half
    judge_agreement(judge_outcomes, human_outcomes)  # {"agreement", "cohens_kappa", ...}

Both models answer every prompt; the judge compares each pair (a = model A's answer); a win
counts 1, a tie 0.5, a loss 0. Files in `out`: responses.jsonl, verdicts.jsonl, winrate.json
(or agreement.json when scoring a judge against human labels). See docs/winrate.md.
"""

from __future__ import annotations

import difflib
import json
import logging
import math
import os
import random
import statistics
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from alignkit.atomic import write_json_atomic
from alignkit.config import ConfigError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Config:
    """Win-rate settings."""

    a: str | None = None
    """Local directory of model A, the candidate (required unless human_labels is set)."""
    b: str | None = None
    """Local directory of model B, the baseline (required unless human_labels is set)."""
    prompts: str | None = None
    """Prompt file (any prompt format alignkit.data.load reads); default: the world's eval_prompts.jsonl."""
    judge: str = "gold"
    """gold | reward:DIR | llm:DIR | endpoint[:MODEL] | human[:FILE] (default FILE: out/human_pairs.jsonl) | labeldb:DB[#k=N,timeout=S] (people in `alignkit label serve`)."""
    world: str | None = None
    """World directory (alignkit world): needed by the gold judge and for the default prompts."""
    out: str | None = None
    """Where to write responses.jsonl, verdicts.jsonl and winrate.json (None: don't write)."""
    human_labels: str | None = None
    """Instead of generating, score the judge against human verdicts: JSONL {prompt, a, b, label}."""
    max_new_tokens: int = 32
    """Longest answer generated."""
    temperature: float = 0.0
    """0 means greedy decoding."""
    top_p: float = 1.0
    """Nucleus sampling mass when temperature > 0."""
    limit: int = 0
    """Use only the first N prompts (0: all)."""
    batch_size: int = 32
    """Prompts generated (and LLM-judge queries scored) together."""
    seed: int = 0
    """Seed of sampling, of the human export's side shuffle and of the bootstrap."""
    interval: Literal["wilson", "bootstrap"] = "wilson"
    """Confidence interval of the win rate (see INTERVALS)."""
    confidence: float = 0.95
    """Coverage of the interval."""
    n_boot: int = 2000
    """Bootstrap resamples (interval=bootstrap)."""
    judge_template: str | None = None
    """Text file with the llm / endpoint judge's question ({prompt}, {first}, {second}); None: built-in."""
    judge_chat: bool = False
    """llm judge: put the question through the judge tokenizer's chat template."""
    endpoint_url: str = "https://api.openai.com/v1"
    """endpoint judge: base URL of an OpenAI-compatible API (…/chat/completions is appended)."""
    endpoint_model: str = "gpt-4o-mini"
    """endpoint judge: model name sent with each request."""
    api_key_env: str = "OPENAI_API_KEY"
    """endpoint judge: NAME of the environment variable holding the API key ('' for none)."""


# ---- the numbers -------------------------------------------------------------------------------


def _check_outcomes(outcomes: Sequence[float]) -> list[float]:
    xs = [float(x) for x in outcomes]
    if not xs:
        raise ValueError("no outcomes: a win rate needs at least one judged prompt")
    for i, x in enumerate(xs):
        if not 0.0 <= x <= 1.0:
            raise ValueError(f"outcome {i} is {x}; outcomes must lie in [0, 1] (1 win, 0.5 tie, 0 loss)")
    return xs


def wilson_interval(outcomes: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval (Wilson 1927) for the mean of per-prompt outcomes in [0, 1].

    With p = mean outcome, n prompts and z the normal quantile of (1 + confidence) / 2:

        centre = (p + z^2 / 2n) / (1 + z^2 / n)
        half   = z / (1 + z^2 / n) * sqrt(p (1 - p) / n + z^2 / 4n^2)

    It treats each prompt as a Bernoulli trial with success p. A tie (0.5) varies less than a
    coin flip with the same mean (an outcome X in [0, 1] has Var X <= p (1 - p)), so with ties
    the interval is conservative: never narrower than the truth warrants. Unlike the normal
    (Wald) interval it stays inside [0, 1] and does not collapse to a point at 0 or 1 wins.
    """
    xs = _check_outcomes(outcomes)
    n = len(xs)
    p = sum(xs) / n
    z = statistics.NormalDist().inv_cdf(0.5 + confidence / 2)
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(max(p * (1 - p), 0.0) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap_interval(
    outcomes: Sequence[float], confidence: float = 0.95, n_boot: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap over prompts: resample the n outcomes with replacement `n_boot` times
    (a fixed seed, so the same outcomes give the same interval), take the mean of each resample,
    and return the (1 - confidence) / 2 and (1 + confidence) / 2 order statistics.

    It makes no assumption about the spread of the outcomes (ties included), but with few
    prompts it is too narrow, and when every outcome is equal it collapses to a point.
    """
    xs = _check_outcomes(outcomes)
    rng = random.Random(f"alignkit-bootstrap:{seed}")
    n = len(xs)
    means = sorted(sum(rng.choices(xs, k=n)) / n for _ in range(n_boot))
    alpha = (1 - confidence) / 2
    lo = means[min(n_boot - 1, max(0, math.floor(alpha * n_boot)))]
    hi = means[min(n_boot - 1, max(0, math.ceil((1 - alpha) * n_boot) - 1))]
    return lo, hi


INTERVALS: dict[str, Callable[..., tuple[float, float]]] = {
    "wilson": wilson_interval,
    "bootstrap": bootstrap_interval,
}


def win_rate(
    outcomes: Sequence[float],
    confidence: float = 0.95,
    interval: str = "wilson",
    **interval_kwargs: Any,
) -> tuple[float, float, float]:
    """(rate, lo, hi): the mean of per-prompt outcomes (1 win, 0.5 tie, 0 loss) and its interval.

    interval: a key of INTERVALS; the default Wilson interval is deterministic and conservative
    with ties. Extra keyword arguments go to the interval (bootstrap: n_boot, seed).
    """
    if interval not in INTERVALS:
        raise ValueError(f"unknown interval {interval!r} (valid: {', '.join(INTERVALS)})")
    xs = _check_outcomes(outcomes)
    lo, hi = INTERVALS[interval](xs, confidence, **interval_kwargs)
    return sum(xs) / len(xs), lo, hi


def pairwise_outcomes(mine: Sequence[float], theirs: Sequence[float], tie: float = 0.0) -> list[float]:
    """Per-prompt outcomes of two score lists: 1 where mine is higher by more than `tie`, 0 where
    lower by more than `tie`, 0.5 otherwise (a tie)."""
    if len(mine) != len(theirs) or not mine:
        raise ValueError("pairwise_outcomes needs two equally long, non-empty score lists")
    return [1.0 if a - b > tie else 0.0 if b - a > tie else 0.5 for a, b in zip(mine, theirs)]


def win_rate_entry(mine: Sequence[float], theirs: Sequence[float]) -> dict:
    """{"rate", "lo", "hi", "n"}: the win rate (ties half, 95% Wilson interval) of per-prompt
    scores against a baseline's, as summaries record it."""
    rate, lo, hi = win_rate(pairwise_outcomes(mine, theirs))
    return {"rate": rate, "lo": lo, "hi": hi, "n": len(mine)}


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact sign test (ties left out): the probability under a fair coin of a split of
    the wins + losses decided prompts at least as uneven as this one; 1.0 with none decided."""
    n = wins + losses
    if n == 0:
        return 1.0
    k = min(wins, losses)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def tally(outcomes: Sequence[float], confidence: float = 0.95, interval: str = "wilson", **kw: Any) -> dict:
    """Wins (> 0.5), ties (= 0.5), losses (< 0.5), the win rate and its interval."""
    rate, lo, hi = win_rate(outcomes, confidence, interval, **kw)
    return {
        "n": len(outcomes),
        "wins": sum(x > 0.5 for x in outcomes),
        "ties": sum(x == 0.5 for x in outcomes),
        "losses": sum(x < 0.5 for x in outcomes),
        "win_rate": rate,
        "ci_low": lo,
        "ci_high": hi,
    }


def _side(x: Any) -> str:
    v = float(getattr(x, "outcome", x))
    return "a" if v > 0.5 else "b" if v < 0.5 else "tie"


def judge_agreement(judge_verdicts: Sequence[Any], human_verdicts: Sequence[Any]) -> dict:
    """How often a judge agrees with people, raw and chance-corrected.

    Both lists hold, per pair, an outcome (1 a better, 0.5 tie, 0 b better) or a PairVerdict;
    each is read as one of three classes: a, tie, b.

        agreement     p_o = fraction of pairs with the same class
        cohens_kappa  (p_o - p_e) / (1 - p_e), p_e = sum over classes of judge share * human share
                      (Cohen 1960); None when p_e = 1 (both always answer the same one class)

    Worked example (2 classes): 20 pairs; both say a on 9, judge a / human b on 3, judge b /
    human a on 2, both b on 6. p_o = 15/20 = 0.75. Judge says a 12/20 = 0.6, human 11/20 = 0.55,
    so p_e = 0.6 * 0.55 + 0.4 * 0.45 = 0.51 and kappa = (0.75 - 0.51) / 0.49 = 0.4898.
    """
    if len(judge_verdicts) != len(human_verdicts):
        raise ValueError(f"{len(judge_verdicts)} judge verdicts but {len(human_verdicts)} human verdicts")
    n = len(judge_verdicts)
    if n == 0:
        raise ValueError("no verdicts to compare")
    j = [_side(x) for x in judge_verdicts]
    h = [_side(x) for x in human_verdicts]
    p_o = sum(x == y for x, y in zip(j, h)) / n
    cj, ch = Counter(j), Counter(h)
    p_e = sum(cj[c] * ch[c] for c in ("a", "tie", "b")) / (n * n)
    kappa = None if p_e >= 1.0 else (p_o - p_e) / (1.0 - p_e)
    confusion = {
        jc: {hc: sum(x == jc and y == hc for x, y in zip(j, h)) for hc in ("a", "tie", "b")}
        for jc in ("a", "tie", "b")
    }
    return {"n": n, "agreement": p_o, "cohens_kappa": kappa, "confusion_judge_by_human": confusion}


def format_summary(summary: dict) -> str:
    """One readable line of a win-rate summary."""
    pct = round(100 * summary.get("confidence", 0.95))
    return (
        f"A vs B: {summary['wins']} wins / {summary['ties']} ties / {summary['losses']} losses of "
        f"{summary['n']}; win rate {summary['win_rate']:.3f} ({pct}% CI {summary['ci_low']:.3f}-{summary['ci_high']:.3f})"
    )


# ---- the run -----------------------------------------------------------------------------------


def _write_json_atomic(path: Path, obj: dict) -> None:
    write_json_atomic(path, obj, indent=2, sort_keys=True)


def _read_template(cfg: Config) -> dict:
    if not cfg.judge_template:
        return {}
    p = Path(cfg.judge_template)
    if not p.is_file():
        raise ConfigError(f"config key 'judge_template': file not found: {p}")
    from alignkit.feedback.judges import check_template

    template = p.read_text(encoding="utf-8")
    try:
        check_template(template)
    except ValueError as e:
        raise ConfigError(f"config key 'judge_template': {p}: {e}") from None
    return {"template": template}


# Each builder checks its settings at once and returns a factory, so a run fails before it
# generates anything, and a judge that is itself a model is loaded only after A and B are done.


def _gold(cfg: Config, arg: str, world: Any) -> Callable[[], Any]:
    from alignkit.feedback.judges import GoldJudge

    if world is None:
        raise ConfigError("judge=gold needs world=DIR (a folder written by `alignkit world`)")
    return lambda: GoldJudge(world)


def _reward(cfg: Config, arg: str, world: Any) -> Callable[[], Any]:
    if not arg:
        raise ConfigError("judge=reward:DIR needs the reward model's directory")

    def make():
        from alignkit.feedback.judges import RewardModelJudge
        from alignkit.models.heads import load_reward_model
        from alignkit.models.load import load_tokenizer

        return RewardModelJudge(load_reward_model(arg), load_tokenizer(arg), batch_size=cfg.batch_size)

    return make


def _llm(cfg: Config, arg: str, world: Any) -> Callable[[], Any]:
    if not arg:
        raise ConfigError("judge=llm:DIR needs the judge model's directory")
    template = _read_template(cfg)

    def make():
        from alignkit.feedback.judges import LLMJudge
        from alignkit.models.load import load_model, load_tokenizer

        model, tok = load_model(arg), load_tokenizer(arg)
        return LLMJudge(model, tok, chat=cfg.judge_chat, batch_size=cfg.batch_size, **template)

    return make


def _endpoint(cfg: Config, arg: str, world: Any) -> Callable[[], Any]:
    from alignkit.feedback.judges import EndpointJudge

    try:
        judge = EndpointJudge(
            cfg.endpoint_url,
            arg or cfg.endpoint_model,
            api_key_env=cfg.api_key_env or None,
            **_read_template(cfg),
        )
    except ValueError as e:
        raise ConfigError(f"judge=endpoint: {e}") from None
    return lambda: judge


def _human(cfg: Config, arg: str, world: Any) -> Callable[[], Any]:
    from alignkit.feedback.judges import HumanJudge

    if not arg and not cfg.out:
        raise ConfigError("judge=human needs out=DIR or judge=human:FILE for the pairs to label")
    judge = HumanJudge(arg or Path(cfg.out) / "human_pairs.jsonl", seed=cfg.seed)
    return lambda: judge


def _labeldb(cfg: Config, arg: str, world: Any) -> Callable[[], Any]:
    from alignkit.label.judge import LabelDBJudge, parse_spec

    try:
        db_spec, opts = parse_spec(arg)
    except ValueError as e:
        raise ConfigError(f"config key 'judge': {e}") from None
    task = f"winrate {Path(cfg.out).resolve()}" if cfg.out else "winrate"
    return lambda: LabelDBJudge(db_spec, task, **opts)


JUDGES: dict[str, Callable[[Config, str, Any], Callable[[], Any]]] = {
    "gold": _gold,
    "reward": _reward,
    "llm": _llm,
    "endpoint": _endpoint,
    "human": _human,
    "labeldb": _labeldb,
}
"""judge=NAME[:ARG] -> builder(cfg, ARG, world or None) -> a factory of the Judge."""


def judge_factory(cfg: Config, world: Any = None) -> Callable[[], Any]:
    """Check `cfg.judge` now; the returned function builds the judge (loading any model)."""
    name, _, arg = cfg.judge.partition(":")
    if name not in JUDGES:
        close = difflib.get_close_matches(name, list(JUDGES), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else f" (valid: {', '.join(JUDGES)})"
        raise ConfigError(f"config key 'judge': unknown judge {name!r}{hint}")
    return JUDGES[name](cfg, arg, world)


def build_judge(cfg: Config, world: Any = None):
    """The judge named by `cfg.judge`, e.g. "gold", "reward:runs/rm", "llm:runs/big"."""
    return judge_factory(cfg, world)()


def _category(record: Any, world: Any) -> str | None:
    if record.category:
        return record.category
    task = world.task(record.prompt) if world is not None else None
    return task.category if task is not None else None


def _read_prompts(cfg: Config, world: Any) -> tuple[list, list[str | None]]:
    from alignkit.data.load import load_records

    path = cfg.prompts or (Path(cfg.world) / "eval_prompts.jsonl" if cfg.world else None)
    if path is None:
        raise ConfigError("config key 'prompts' is required (or world=DIR to use its eval prompts)")
    records = load_records(path, kind="prompt", limit=cfg.limit).records
    return [r.prompt for r in records], [_category(r, world) for r in records]


def _generate(model_dir: str, prompts: list, cfg: Config) -> list[str]:
    from alignkit.data.tokenize import render_prompt
    from alignkit.models.generate import SamplingParams, generate_text
    from alignkit.models.load import load_model, load_tokenizer

    model, tok = load_model(model_dir), load_tokenizer(model_dir)
    params = SamplingParams(
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature if cfg.temperature > 0 else 1.0,
        top_p=cfg.top_p,
        greedy=cfg.temperature <= 0,
        seed=cfg.seed,
    )
    return generate_text(
        model, tok, [render_prompt(tok, p) for p in prompts], params, batch_size=cfg.batch_size
    )


def summarise(verdicts: Sequence[Any], categories: Sequence[str | None], cfg: Config) -> dict:
    """Totals, the interval, soft win rate (mean p_a), per-category figures and position bias."""
    from alignkit.feedback.judges import position_bias

    kw = {"n_boot": cfg.n_boot, "seed": cfg.seed} if cfg.interval == "bootstrap" else {}
    outcomes = [v.outcome for v in verdicts]
    summary = tally(outcomes, cfg.confidence, cfg.interval, **kw)
    summary.update(
        interval=cfg.interval,
        confidence=cfg.confidence,
        soft_win_rate=sum(v.p_a for v in verdicts) / len(verdicts),
        judge=cfg.judge,
        a=cfg.a,
        b=cfg.b,
    )
    by_cat: dict[str, list[float]] = defaultdict(list)
    for o, c in zip(outcomes, categories):
        if c is not None:
            by_cat[c].append(o)
    summary["per_category"] = {
        c: tally(xs, cfg.confidence, cfg.interval, **kw) for c, xs in sorted(by_cat.items())
    }
    bias = position_bias(verdicts)
    if bias:
        summary["position_bias"] = bias
    return summary


def _verdict_rows(prompts: list, categories: list, a: list[str], b: list[str], verdicts: list) -> list[dict]:
    from alignkit.data.records import prompt_text

    return [
        {
            "index": i,
            "prompt": prompt_text(p),
            "category": c,
            "response_a": x,
            "response_b": y,
            "p_a": v.p_a,
            "outcome": v.outcome,
            "detail": v.detail,
        }
        for i, (p, c, x, y, v) in enumerate(zip(prompts, categories, a, b, verdicts))
    ]


def read_labelled_pairs(path: str | os.PathLike) -> tuple[list[str], list[str], list[str], list[float]]:
    """Human verdicts from JSONL rows {"prompt", "a", "b", "label"}; label: "A", "B", "tie" (any
    case) or 1 / 0 / 0.5, meaning a better, b better, tie. Errors name file:line."""
    from alignkit.data.load import DataError

    names = {"a": 1.0, "b": 0.0, "tie": 0.5}
    prompts, a, b, labels = [], [], [], []
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"human labels file not found: {p}")
    with open(p, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                raise DataError(p, "not valid JSON", n) from None
            if not isinstance(row, dict):
                raise DataError(p, "expected a JSON object", n)
            for key in ("prompt", "a", "b"):
                if not isinstance(row.get(key), str):
                    raise DataError(p, f"missing or non-string field {key!r}", n)
            raw = row.get("label")
            if isinstance(raw, str) and raw.strip().lower() in names:
                label = names[raw.strip().lower()]
            elif isinstance(raw, (int, float)) and not isinstance(raw, bool) and raw in (0, 0.5, 1):
                label = float(raw)
            else:
                raise DataError(p, f"label {raw!r} is not one of A, B, tie (or 1, 0, 0.5)", n)
            prompts.append(row["prompt"])
            a.append(row["a"])
            b.append(row["b"])
            labels.append(label)
    if not prompts:
        raise DataError(p, "no labelled pairs: the file is empty")
    return prompts, a, b, labels


def _agreement(cfg: Config, judge: Any) -> dict:
    from alignkit.eval.gold import write_jsonl_atomic
    from alignkit.feedback.judges import position_bias

    prompts, a, b, human = read_labelled_pairs(cfg.human_labels)
    if cfg.limit:
        prompts, a, b, human = prompts[: cfg.limit], a[: cfg.limit], b[: cfg.limit], human[: cfg.limit]
    verdicts = judge.compare(prompts, a, b)
    summary = {"mode": "agreement", "judge": cfg.judge, "human_labels": cfg.human_labels}
    summary.update(judge_agreement(verdicts, human))
    summary["judge_win_rate_a"] = sum(v.outcome for v in verdicts) / len(verdicts)
    summary["human_win_rate_a"] = sum(human) / len(human)
    bias = position_bias(verdicts)
    if bias:
        summary["position_bias"] = bias
    if cfg.out:
        out = Path(cfg.out)
        rows = _verdict_rows(prompts, [None] * len(prompts), a, b, verdicts)
        for row, h in zip(rows, human):
            row["human"] = h
        write_jsonl_atomic(out / "verdicts.jsonl", rows)
        _write_json_atomic(out / "agreement.json", summary)
    kappa = summary["cohens_kappa"]
    logger.info(
        "judge %s vs human labels: agreement %.3f, kappa %s",
        cfg.judge,
        summary["agreement"],
        "undefined" if kappa is None else f"{kappa:.3f}",
    )
    return summary


def run_winrate(cfg: Config) -> dict:
    """Generate with A and B, judge every pair, and return (and save) the summary.

    With `human_labels` set, score the judge against those verdicts instead (see
    `judge_agreement`). With judge=human, the first run exports the pairs and returns
    {"status": "awaiting_labels", ...}; run again once they are labelled.
    """
    from alignkit.eval.gold import write_jsonl_atomic
    from alignkit.feedback.judges import LabelsPending
    from alignkit.world import load_world

    if not 0.0 < cfg.confidence < 1.0:
        raise ConfigError(f"config key 'confidence': expected a number in (0, 1), got {cfg.confidence}")
    if cfg.interval not in INTERVALS:
        raise ConfigError(f"config key 'interval': expected one of {list(INTERVALS)}, got {cfg.interval!r}")
    world = load_world(cfg.world) if cfg.world else None
    if cfg.human_labels:
        return _agreement(cfg, build_judge(cfg, world))
    if not cfg.a or not cfg.b:
        raise ConfigError("config keys 'a' and 'b' (the two model directories) are required")
    make_judge = judge_factory(cfg, world)
    prompts, categories = _read_prompts(cfg, world)
    resp_a = _generate(cfg.a, prompts, cfg)
    resp_b = _generate(cfg.b, prompts, cfg)
    out = Path(cfg.out) if cfg.out else None
    if out is not None:
        from alignkit.data.records import prompt_text

        write_jsonl_atomic(
            out / "responses.jsonl",
            [
                {"index": i, "prompt": prompt_text(p), "category": c, "response_a": x, "response_b": y}
                for i, (p, c, x, y) in enumerate(zip(prompts, categories, resp_a, resp_b))
            ],
        )
    try:
        verdicts = make_judge().compare(prompts, resp_a, resp_b)
    except LabelsPending as e:
        logger.info("%s", e)
        return {"status": "awaiting_labels", "pairs_file": str(e.path), "n": e.n, "message": str(e)}
    summary = summarise(verdicts, categories, cfg)
    if out is not None:
        write_jsonl_atomic(
            out / "verdicts.jsonl", _verdict_rows(prompts, categories, resp_a, resp_b, verdicts)
        )
        _write_json_atomic(out / "winrate.json", summary)
    logger.info("%s", format_summary(summary))
    return summary


run = run_winrate
"""The `run(cfg) -> dict` entry point the CLI's stage table expects."""
