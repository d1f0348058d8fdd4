"""A data-quality report for preference pairs, and a cleaned copy of the file.

    report = lint_preferences(pairs)                 # LintReport: flags per pair index
    print(format_lint(report.to_dict()))
    summary = lint_file("prefs.jsonl", out_dir="runs/lint", tokenizer=tok)   # JSON-ready dict

Per pair (reasons, in `REASONS`; a blocking reason removes the pair from the cleaned file):
- empty           chosen or rejected is empty or whitespace only                    (blocking)
- identical       chosen == rejected after whitespace normalisation                 (blocking)
- near_identical  chosen and rejected differ only in wording (see `near_identical`) (blocking)
- duplicate       the same (prompt, chosen, rejected) as an earlier pair; the first is kept (blocking)
- contradictory   the same prompt with the two responses the other way round elsewhere (blocking)
- truncated       the length limits cut the prompt or a response (needs a tokenizer) (warning)
Over the whole file, length bias: how often the chosen response is the longer one. A preference
model learns "longer is better" from that as readily as from quality (a reward-hacking hazard),
so a fraction outside `LENGTH_BIAS_BAND` is a warning; it removes nothing.

Every check is one pass over the pairs (hash look-ups for duplicates and contradictions); the
only comparison is within a pair, never between all pairs.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from alignkit.data.load import parse_rows, read_raw
from alignkit.data.records import PreferencePair, prompt_text
from alignkit.data.tokenize import TruncationLimits, encode_prompt, encode_response, end_of_turn_ids

NEAR_THRESHOLD = 0.8
"""Token-level similarity at or above which a pair is near-identical (see `near_identical`)."""
LENGTH_BIAS_BAND = (0.3, 0.7)
"""Warn when the chosen response is the longer one in a fraction of pairs outside this band."""
LENGTH_BIAS_MIN_PAIRS = 10
"""No length-bias warning from fewer pairs of unequal length than this: the fraction is noise."""
EXAMPLES = 3
"""Examples kept per reason in the report."""


class Reason(NamedTuple):
    blocking: bool
    meaning: str


REASONS: dict[str, Reason] = {
    "empty": Reason(True, "an empty or whitespace-only response"),
    "identical": Reason(True, "chosen equals rejected (whitespace normalised)"),
    "near_identical": Reason(True, "chosen and rejected differ only in wording"),
    "duplicate": Reason(True, "repeats an earlier pair (the first is kept)"),
    "contradictory": Reason(True, "the same prompt is labelled the other way round elsewhere"),
    "truncated": Reason(False, "the length limits cut the prompt or a response"),
}


@dataclass(frozen=True)
class Flag:
    """One reason a pair was flagged, with a short human detail ("similarity 0.83").

    other: the index of the pair this one repeats or contradicts.
    """

    reason: str
    detail: str = ""
    other: int | None = None


def _ws(text: str) -> str:
    return " ".join(text.split())


_TOKEN = re.compile(r"\w+|[^\w\s]")
_NEGATION = re.compile(r"\b(?:not|no|never|cannot|nothing|none|nobody|neither|nor)\b|n't\b")
# Words that shape a sentence without carrying its answer; lower case, compared case-folded.
# Contraction pieces are here because the tokeniser splits "don't" into don ' t; negations are
# here because `near_identical` counts them separately.
FUNCTION_WORDS = frozenset(
    """
    a an the this that these those it its i me my we us our you your he him his she her they them
    their there here what which who whom whose when where why how if then than so as such
    is are was were be been being am do does did done have has had having can could will would
    shall should may might must of in on at to for from by with about into onto over under up
    down out off through and or but also just very too quite really only even still yet
    yes sure ok okay well oh hi hello please thanks thank sorry let s t re ll ve d m
    not no never nor cannot
    """.split()
)


def _tokens(text: str) -> list[str]:
    return _TOKEN.findall(text.replace("’", "'"))


def _is_content(token: str) -> bool:
    return token[0].isalnum() and token.casefold() not in FUNCTION_WORDS


def _matcher(a: str, b: str) -> difflib.SequenceMatcher:
    return difflib.SequenceMatcher(None, _tokens(a), _tokens(b), autojunk=False)


def similarity(a: str, b: str, floor: float = 0.0) -> float:
    """Similarity of two responses in [0, 1]: difflib's ratio 2*M/(len(a)+len(b)) over the
    word and punctuation tokens of the texts (M: tokens in matching blocks).

    Tokens rather than characters, so a shared stem in two different words is not a match;
    punctuation is a token of its own, so "2+2 equals 4." vs "2+2 is 4." shares 5 of 6 tokens:
    0.83. Case counts ("LEMON" is not "Lemon": for a format instruction it is the whole answer).
    floor: when the O(n) multiset upper bound (`quick_ratio`) is below it, that bound is returned
    instead of running the alignment (which is quadratic in the worst case).
    """
    return _ratio(_matcher(a, b), floor)


def _ratio(matcher: difflib.SequenceMatcher, floor: float = 0.0) -> float:
    if not matcher.a and not matcher.b:
        return 1.0
    bound = matcher.quick_ratio()
    return bound if bound < floor else matcher.ratio()


def _changes_content(matcher: difflib.SequenceMatcher) -> bool:
    """True when an edit adds, drops or swaps a content word (see `near_identical`)."""
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal":
            continue
        old = [t for t in matcher.a[i1:i2] if _is_content(t)]
        new = [t for t in matcher.b[j1:j2] if _is_content(t)]
        if not old and not new:
            continue  # punctuation or function words only
        if tag == "replace" and (not old or not new):
            continue  # a content word reworded into function words: "equals" -> "is"
        return True
    return False


def near_identical(a: str, b: str, threshold: float = NEAR_THRESHOLD) -> float | None:
    """The similarity of `a` and `b` when they say the same thing in other words, else None.

    Near-identical: the same words, differing only in punctuation ("Paris" vs "Paris.", at any
    similarity); or `similarity` >= threshold, the same number of negations, and no edit that
    changes content. Content words are all words but `FUNCTION_WORDS` (numbers and names
    included); an edit may reword a content word into function words ("2+2 equals 4." vs
    "2+2 is 4.") or change punctuation ("You're welcome." vs "You're welcome!"), but may not
    add, drop or swap one. Such minimal pairs are good training signal and are kept:
    "7 plus 5 is 12." vs "... 13.", "The capital of X is Nudoburg." vs "... Tozuvik.",
    "I can help." vs "I can't help.", "Use a knife." vs "Use a knife. Obviously.".
    """
    matcher = _matcher(a, b)
    words_a, words_b = [t for t in matcher.a if t[0].isalnum()], [t for t in matcher.b if t[0].isalnum()]
    if words_a == words_b:
        return _ratio(matcher)
    score = _ratio(matcher, floor=threshold)
    if score < threshold:
        return None
    if len(_NEGATION.findall(a.casefold())) != len(_NEGATION.findall(b.casefold())):
        return None
    if _changes_content(matcher):
        return None
    return score


@dataclass(frozen=True)
class LengthBias:
    """How often the chosen response is the longer one, in `unit` ("chars" or "tokens").

    chosen_longer_frac: chosen_longer / (chosen_longer + rejected_longer); ties are left out,
    so an unbiased set sits near 0.5 however many ties it has (NaN when all pairs tie).
    """

    unit: str
    pairs: int
    chosen_longer: int
    rejected_longer: int
    ties: int
    chosen_longer_frac: float
    mean_chosen: float
    mean_rejected: float

    @classmethod
    def measure(cls, unit: str, chosen: list[int], rejected: list[int]) -> LengthBias:
        longer = sum(c > r for c, r in zip(chosen, rejected))
        shorter = sum(c < r for c, r in zip(chosen, rejected))
        decided = longer + shorter
        return cls(
            unit,
            len(chosen),
            longer,
            shorter,
            len(chosen) - decided,
            longer / decided if decided else float("nan"),
            statistics.fmean(chosen) if chosen else float("nan"),
            statistics.fmean(rejected) if rejected else float("nan"),
        )

    def warning(self) -> str | None:
        low, high = LENGTH_BIAS_BAND
        frac = self.chosen_longer_frac
        if self.chosen_longer + self.rejected_longer < LENGTH_BIAS_MIN_PAIRS or low <= frac <= high:
            return None
        side = "longer" if frac > high else "shorter"
        return (
            f"length bias: chosen is the {side} response in {max(frac, 1 - frac):.0%} of pairs "
            f"({self.unit}; mean chosen {self.mean_chosen:.0f} vs rejected {self.mean_rejected:.0f}); "
            f"a model can learn '{side} is better' instead of quality"
        )

    def to_dict(self) -> dict[str, Any]:
        def num(x: float, digits: int) -> float | None:
            return None if math.isnan(x) else round(x, digits)  # NaN is not JSON

        return {
            "unit": self.unit,
            "pairs": self.pairs,
            "chosen_longer": self.chosen_longer,
            "rejected_longer": self.rejected_longer,
            "ties": self.ties,
            "chosen_longer_frac": num(self.chosen_longer_frac, 4),
            "mean_chosen": num(self.mean_chosen, 1),
            "mean_rejected": num(self.mean_rejected, 1),
        }


@dataclass
class LintReport:
    """The result of `lint_preferences`.

    flags: pair index -> its flags (only flagged pairs appear).
    length: length bias in characters, and in tokens when a tokenizer was given.
    truncation: counts when a tokenizer and limits were given: pairs, prompts_truncated,
        responses_truncated (a pair can add two), would_drop (a response left with no token;
        `tokenize_preference` drops such a pair), plus the limits.
    lines: source position of each pair (`unit`: line, record or row) when read from a file.
    reasons: the reasons checked ("truncated" only with a tokenizer and limits).
    """

    records: list[PreferencePair]
    flags: dict[int, list[Flag]]
    length: list[LengthBias]
    near_threshold: float
    truncation: dict[str, int | None] | None = None
    lines: list[int] | None = None
    unit: str = "line"
    reasons: tuple[str, ...] = field(default_factory=lambda: tuple(REASONS))

    @property
    def total(self) -> int:
        return len(self.records)

    def removed(self) -> list[int]:
        """Indices of the pairs with at least one blocking flag, in order."""
        return [i for i, fl in sorted(self.flags.items()) if any(REASONS[f.reason].blocking for f in fl)]

    def kept(self) -> list[int]:
        removed = set(self.removed())
        return [i for i in range(self.total) if i not in removed]

    def counts(self) -> dict[str, int]:
        """Reason -> pairs with it (a pair can have several reasons); every checked reason listed."""
        counts = dict.fromkeys(self.reasons, 0)
        for fl in self.flags.values():
            for reason in {f.reason for f in fl}:
                counts[reason] += 1
        return counts

    def warnings(self) -> list[str]:
        return [w for w in (b.warning() for b in self.length) if w]

    def where(self, i: int) -> int | None:
        return self.lines[i] if self.lines is not None else None

    def describe(self, flag: Flag) -> str:
        """The flag's detail, naming the other pair by its source position when known."""
        if flag.other is None:
            return flag.detail
        where = f"{self.unit} {self.lines[flag.other]}" if self.lines is not None else f"pair {flag.other}"
        return f"{flag.detail} {where}"

    def flagged_row(self, i: int) -> dict[str, Any]:
        """Pair `i` as it goes into the flagged file: position, reasons, details, the pair."""
        fl = self.flags.get(i, [])
        return {
            "index": i,
            self.unit: self.where(i),
            "reasons": [f.reason for f in fl],
            "details": {f.reason: self.describe(f) for f in fl if f.detail},
            "removed": any(REASONS[f.reason].blocking for f in fl),
            **_row(self.records[i]),
        }

    def to_dict(self, examples: int = EXAMPLES) -> dict[str, Any]:
        """JSON-ready summary: counts, fractions, length bias, truncation, a few examples per reason."""
        n = max(self.total, 1)
        removed = len(self.removed())
        shown: dict[str, list[dict]] = {r: [] for r in self.reasons}
        for i in sorted(self.flags):
            for f in self.flags[i]:
                if len(shown[f.reason]) < examples:
                    pair = self.records[i]
                    shown[f.reason].append(
                        {
                            "index": i,
                            self.unit: self.where(i),
                            "detail": self.describe(f),
                            "prompt": _clip(prompt_text(pair.prompt)),
                            "chosen": _clip(pair.chosen),
                            "rejected": _clip(pair.rejected),
                        }
                    )
        return {
            "records": self.total,
            "unit": self.unit,
            "near_threshold": self.near_threshold,
            "flagged": len(self.flags),
            "flagged_frac": round(len(self.flags) / n, 4),
            "removed": removed,
            "removed_frac": round(removed / n, 4),
            "kept": self.total - removed,
            "counts": self.counts(),
            "blocking": [r for r in self.reasons if REASONS[r].blocking],
            "length": {b.unit: b.to_dict() for b in self.length},
            "warnings": self.warnings(),
            "truncation": self.truncation,
            "examples": {r: ex for r, ex in shown.items() if ex},
        }


def _row(pair: PreferencePair) -> dict[str, Any]:
    """A pair as a `prompt_chosen_rejected` row; optional fields only when set."""
    prompt = pair.prompt
    if not isinstance(prompt, str):
        prompt = [{"role": m.role, "content": m.content} for m in prompt]
    row: dict[str, Any] = {"prompt": prompt, "chosen": pair.chosen, "rejected": pair.rejected}
    for name in ("margin", "soft_label", "category"):
        if getattr(pair, name) is not None:
            row[name] = getattr(pair, name)
    return row


def _clip(text: str, limit: int = 300) -> str:
    # The end of a dialogue prompt (the last turn) matters most, so keep both ends.
    if len(text) <= limit:
        return text
    half = limit // 2
    return f"{text[:half]} [...] {text[-half:]}"


def _truncation(
    tokenizer: Any, pairs: list[PreferencePair], limits: TruncationLimits, flags: dict[int, list[Flag]]
) -> tuple[dict[str, int | None], list[int], list[int]]:
    """Flag pairs the limits cut, exactly as `tokenize_preference` would cut them.

    Returns the counts and the response token lengths (no special tokens) for the length bias.
    """
    counts: dict[str, int | None] = {
        "pairs": 0,
        "prompts_truncated": 0,
        "responses_truncated": 0,
        "would_drop": 0,
    }
    chosen_len, rejected_len = [], []
    for i, p in enumerate(pairs):
        prompt_len = len(encode_prompt(tokenizer, p.prompt)[0])
        cut = []
        if limits.max_prompt_len is not None and prompt_len > limits.max_prompt_len:
            cut.append(f"prompt {prompt_len} > {limits.max_prompt_len} tokens")
            counts["prompts_truncated"] += 1
            prompt_len = limits.max_prompt_len
        eot = end_of_turn_ids(tokenizer, p.prompt)
        drop = False
        for name, text, lengths in (("chosen", p.chosen, chosen_len), ("rejected", p.rejected, rejected_len)):
            n = len(encode_response(tokenizer, text, p.prompt, eot=eot))
            lengths.append(n - len(eot))
            if limits.max_len is not None and prompt_len + n > limits.max_len:
                cut.append(f"prompt + {name} {prompt_len + n} > {limits.max_len} tokens")
                counts["responses_truncated"] += 1
                drop = drop or prompt_len >= limits.max_len
        if cut:
            counts["pairs"] += 1
            counts["would_drop"] += drop
            flags.setdefault(i, []).append(Flag("truncated", "; ".join(cut)))
    counts.update(max_prompt_len=limits.max_prompt_len, max_len=limits.max_len)
    return counts, chosen_len, rejected_len


def lint_preferences(
    records: list[PreferencePair],
    tokenizer: Any = None,
    limits: TruncationLimits | None = None,
    near_threshold: float = NEAR_THRESHOLD,
) -> LintReport:
    """Flag problem pairs in `records` (see the module docstring for the reasons).

    Duplicates and contradictions compare the prompt (plain text via `prompt_text`) and both
    responses after whitespace normalisation. A pair with an empty response, or whose two
    responses are identical, is never "contradictory".
    tokenizer: when given, length bias is also measured in response tokens; with `limits` too,
        pairs the limits cut are flagged "truncated" (prompt rendering as in training).
    """
    if not 0.0 < near_threshold <= 1.0:
        raise ValueError(f"near_threshold must be in (0, 1], got {near_threshold}")
    flags: dict[int, list[Flag]] = {}
    first: dict[tuple[str, str, str], int] = {}
    keys = []
    for i, p in enumerate(records):
        found = []
        chosen, rejected = _ws(p.chosen), _ws(p.rejected)
        if not chosen or not rejected:
            empty = [name for name, text in (("chosen", chosen), ("rejected", rejected)) if not text]
            found.append(Flag("empty", " and ".join(empty)))
        elif chosen == rejected:
            found.append(Flag("identical"))
        else:
            score = near_identical(p.chosen, p.rejected, near_threshold)
            if score is not None:
                why = "" if score >= near_threshold else " (punctuation only)"
                found.append(Flag("near_identical", f"similarity {score:.2f}{why}"))
        key = (_ws(prompt_text(p.prompt)), chosen, rejected)
        keys.append(key)
        if key in first:
            found.append(Flag("duplicate", "of", first[key]))
        else:
            first[key] = i
        if found:
            flags[i] = found
    for i, (prompt, chosen, rejected) in enumerate(keys):
        j = first.get((prompt, rejected, chosen))
        if j is not None and chosen and rejected and chosen != rejected:
            flags.setdefault(i, []).append(Flag("contradictory", "reversed in", j))

    length = [
        LengthBias.measure("chars", [len(p.chosen) for p in records], [len(p.rejected) for p in records])
    ]
    truncation = None
    if tokenizer is not None:
        # Without limits nothing is cut, but the token lengths still feed the length bias.
        counts, chosen_len, rejected_len = _truncation(
            tokenizer, records, limits or TruncationLimits(), flags
        )
        length.append(LengthBias.measure("tokens", chosen_len, rejected_len))
        if limits is not None and (limits.max_prompt_len is not None or limits.max_len is not None):
            truncation = counts
    reasons = tuple(r for r in REASONS if r != "truncated" or truncation is not None)
    for fl in flags.values():
        fl.sort(key=lambda f: list(REASONS).index(f.reason))
    return LintReport(records, flags, length, near_threshold, truncation, reasons=reasons)


NO_SIGNAL = ("empty", "identical", "near_identical")
"""Reasons a pair teaches nothing about which response is better (its two sides are the same)."""


def check_signal(records: list[PreferencePair], source: str, max_no_signal: float) -> str | None:
    """Before training: a `DataError` when more than `max_no_signal` of the pairs carry no signal
    (`NO_SIGNAL`: empty, identical or near-identical responses; a DPO or Bradley-Terry loss on
    chosen == rejected has zero gradient), else a warning text when some do, else None."""
    from alignkit.data.load import DataError

    if not records:
        return None
    report = lint_preferences(records)
    counts = {r: n for r, n in report.counts().items() if r in NO_SIGNAL and n}
    bad = sum(1 for fl in report.flags.values() if any(f.reason in NO_SIGNAL for f in fl))
    if not bad:
        return None
    frac = bad / len(records)
    what = (f"{bad} of {len(records)} pairs ({frac:.0%}) carry no preference signal "
            f"({', '.join(f'{r}: {n}' for r, n in counts.items())})")  # fmt: skip
    if frac > max_no_signal:
        raise DataError(source, f"{what}, more than data.max_no_signal={max_no_signal:g}; "
                                f"`alignkit data lint {source} --out DIR` writes a cleaned file")  # fmt: skip
    return f"{source}: {what}; they train nothing (`alignkit data lint` removes them)"


def _positions(path: str | os.PathLike, on_error: str) -> tuple[Any, list[int]]:
    """Load preference records while noting each record's position (line, record or row).

    `LoadResult` does not keep positions, so they are re-derived: every position the reader
    yields either became a record or is listed in `skipped`, in order.
    """
    unit, items = read_raw(path)
    seen: list[int] = []

    def tap():
        for pos, raw in items:
            seen.append(pos)
            yield pos, raw

    result = parse_rows(tap(), "preference", on_error, 0, str(path), unit)
    skipped = {s.line for s in result.skipped}
    lines = [pos for pos in seen if pos not in skipped]
    assert len(lines) == len(result.records)
    return result, lines


def _write_jsonl_atomic(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_lint_files(report: LintReport, out_dir: str | os.PathLike) -> dict[str, str]:
    """Write `cleaned.jsonl` (pairs with no blocking flag) and `flagged.jsonl` (every flagged pair
    with its reasons) into `out_dir`, each atomically; returns their paths.

    Cleaned rows are the `prompt_chosen_rejected` format: {"prompt", "chosen", "rejected"} plus
    margin / soft_label / category when present; a conversational prompt stays a message list.
    `load_records` reads the cleaned file back to the same records.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"cleaned": out / "cleaned.jsonl", "flagged": out / "flagged.jsonl"}
    _write_jsonl_atomic(paths["cleaned"], [_row(report.records[i]) for i in report.kept()])
    _write_jsonl_atomic(paths["flagged"], [report.flagged_row(i) for i in sorted(report.flags)])
    return {name: str(p) for name, p in paths.items()}


def lint_file(
    path: str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    tokenizer: Any = None,
    max_prompt_len: int | None = 256,
    max_len: int | None = 512,
    on_error: str = "skip",
    near_threshold: float = NEAR_THRESHOLD,
) -> dict[str, Any]:
    """Lint a preference data file (any format `load_records` reads); a JSON-ready report.

    Records the loader cannot use (malformed; in every format an empty response already fails
    to load) are counted under `skipped` / `skip_reasons`, not among the lint flags.
    The limits (defaults as in `DataConfig`) apply only with a tokenizer.
    out_dir: also write cleaned.jsonl, flagged.jsonl (see `write_lint_files`) and lint.json.
    """
    result, lines = _positions(path, on_error)
    limits = TruncationLimits(max_prompt_len, max_len) if tokenizer is not None else None
    report = lint_preferences(result.records, tokenizer, limits, near_threshold)
    report.lines, report.unit = lines, result.unit
    summary = {
        "path": str(path),
        "format": result.format,
        "skipped": len(result.skipped),
        "skip_reasons": result.skip_reasons(),
        "skipped_at": [s.line for s in result.skipped[:20]],
        **report.to_dict(),
    }
    if out_dir is not None:
        summary["files"] = write_lint_files(report, out_dir)
        report_path = Path(out_dir) / "lint.json"
        tmp = report_path.with_name(f".lint.json.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(tmp, report_path)
        summary["files"]["report"] = str(report_path)
    return summary


def format_lint(report: dict[str, Any]) -> str:
    """A readable multi-line version of a lint report (`lint_file` or `LintReport.to_dict()`)."""
    n = report["records"]
    out = []
    if "path" in report:
        out.append(f"file      {report['path']}  ({report['format']})")
        out.append(f"records   {n}")
        if report["skipped"]:
            at = ", ".join(map(str, report["skipped_at"])) + (", ..." if report["skipped"] > 20 else "")
            out.append(
                f"skipped   {report['skipped']} on load {report['skip_reasons']} at {report['unit']} {at}"
            )
    else:
        out.append(f"records   {n}")
    out.append(f"flagged   {report['flagged']} ({report['flagged_frac']:.1%})")
    out.append(f"removed   {report['removed']} ({report['removed_frac']:.1%}); kept {report['kept']}")
    for reason, count in report["counts"].items():
        kind = "removes" if reason in report["blocking"] else "warns"
        out.append(f"  {count:>6}  {reason:<15} {kind:<8}{REASONS[reason].meaning}")
    out.append(f"near-identical threshold {report['near_threshold']}")
    for unit, b in report["length"].items():
        frac = b["chosen_longer_frac"]
        frac_text = "n/a" if frac is None else f"{frac:.1%}"
        out.append(
            f"length ({unit})  chosen longer in {frac_text} of unequal pairs "
            f"({b['chosen_longer']} vs {b['rejected_longer']}, {b['ties']} ties); "
            f"mean chosen {b['mean_chosen']}, rejected {b['mean_rejected']}"
        )
    t = report.get("truncation")
    if t:
        out.append(
            f"truncation (max_prompt_len {t['max_prompt_len']}, max_len {t['max_len']}): {t['pairs']} pairs; "
            f"{t['prompts_truncated']} prompts, {t['responses_truncated']} responses cut, "
            f"{t['would_drop']} pairs would be dropped"
        )
    for w in report["warnings"]:
        out.append(f"WARNING {w}")
    unit = report.get("unit", "line")
    for reason, examples in report["examples"].items():
        out.append(f"examples: {reason}")
        for ex in examples:
            where = f"{unit} {ex[unit]}" if ex.get(unit) is not None else f"pair {ex['index']}"
            detail = f" ({ex['detail']})" if ex["detail"] else ""
            out.append(f"  {where}{detail}")
            for name in ("prompt", "chosen", "rejected"):
                out.append(f"    {name:<8} {json.dumps(ex[name], ensure_ascii=False)}")
    if "files" in report:
        for name, p in report["files"].items():
            out.append(f"wrote {name}: {p}")
    return "\n".join(out)
