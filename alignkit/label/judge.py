"""People as the judge, through the labelling app's database (for the iterate loop and winrate).

    judge = LabelDBJudge("labels.sqlite", task="iterate round 2", k=3, timeout_s=3600)
    verdicts = judge.compare(prompts, a, b)   # adds the pairs, waits until each has k labels

compare() adds the pairs to `task` (adding them again is harmless, so a resumed run finds the
ones it wrote before), then polls until every pair has k labels other than skip. When the
timeout passes first it raises `DBLabelsPending` (a `LabelsPending`), which the iterate loop
records as "labels pending"; `resume=true` later reads the labels given meanwhile.

Spec for judge=...: `labeldb:DB[#k=3,timeout=600,poll=2]`, DB a path or a database URL.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

from alignkit.data.records import Prompt, prompt_text
from alignkit.feedback.judges import LabelsPending, PairVerdict, outcome_of, pair_id


class DBLabelsPending(LabelsPending):
    """Pairs are in the labelling database but not all labelled yet."""

    def __init__(self, db_spec: str, task: str, n: int, missing: int):
        self.path, self.n, self.task, self.missing = Path(db_spec), n, task, missing
        Exception.__init__(self, f"{missing} of {n} pairs of task {task!r} in {db_spec} still need labels "
                                 "(alignkit label serve); run again with resume=true once they are labelled")


def parse_spec(spec: str) -> tuple[str, dict]:
    """'labels.sqlite#k=3,timeout=60' -> ('labels.sqlite', {'k': 3, 'timeout_s': 60.0})."""
    db_spec, _, opts = spec.partition("#")
    names = {"k": ("k", int), "timeout": ("timeout_s", float), "poll": ("poll_s", float)}
    out = {}
    for item in filter(None, opts.split(",")):
        key, _, value = item.partition("=")
        if key not in names:
            raise ValueError(f"judge=labeldb: unknown option {key!r} (valid: {', '.join(names)})")
        name, cast = names[key]
        try:
            out[name] = cast(value)
        except ValueError:
            raise ValueError(f"judge=labeldb: option {key} needs a number, got {value!r}") from None
    if not db_spec:
        raise ValueError("judge=labeldb needs a database: labeldb:labels.sqlite")
    return db_spec, out


class LabelDBJudge:
    """Verdicts from people labelling in `alignkit label serve` (see the module docstring).

    p_a is the mean vote over the pair's labels (a = 1, tie = 0.5, b = 0), so k > 1 gives a soft label."""

    def __init__(self, db_spec: str, task: str, k: int = 1, timeout_s: float = 24 * 3600.0,
                 poll_s: float = 2.0, gold_rate: float = 0.0):
        self.db_spec, self.task, self.k = db_spec, task, k
        self.timeout_s, self.poll_s, self.gold_rate = timeout_s, poll_s, gold_rate

    def __repr__(self) -> str:
        return f"LabelDBJudge({self.db_spec!r}, task={self.task!r}, k={self.k})"

    def compare(self, prompts: Sequence[Prompt], a: Sequence[str], b: Sequence[str]) -> list[PairVerdict]:
        from alignkit.label import db

        if not len(prompts) == len(a) == len(b):
            raise ValueError(f"{len(prompts)} prompts, {len(a)} answers a, {len(b)} answers b")
        eng = db.connect(self.db_spec)
        ids = [pair_id(i, p, x, y) for i, (p, x, y) in enumerate(zip(prompts, a, b))]
        rows = [{"ext_id": pid, "prompt": prompt_text(p), "answer_a": x, "answer_b": y, "gold": None,
                 "meta": json.dumps({"index": i})} for i, (pid, p, x, y) in enumerate(zip(ids, prompts, a, b))]
        db.add_pairs(eng, rows, self.task, self.k, self.gold_rate)
        deadline = time.monotonic() + self.timeout_s
        while True:
            votes: dict[str, list[float]] = {}
            for r in db.labels(eng, self.task):
                if r["choice"] != "skip":
                    votes.setdefault(r["ext_id"], []).append(db.OUTCOME[r["choice"]])
            missing = sum(len(votes.get(pid, [])) < self.k for pid in ids)
            if missing == 0:
                break
            if time.monotonic() >= deadline:
                eng.dispose()
                raise DBLabelsPending(self.db_spec, self.task, len(ids), missing)
            time.sleep(self.poll_s)
        eng.dispose()
        out = []
        for pid in ids:
            v = votes[pid]
            p_a = sum(v) / len(v)
            out.append(PairVerdict(p_a, outcome_of(p_a), {"votes": v, "n_labels": len(v)}))
        return out
