"""`alignkit demo --jobs N`: the demo's stages (pipeline.STAGES) trained N at a time.

Each stage runs in a fresh worker process (alignkit.jobs) on a copy of the demo's state: the
summary and the gold scores of the stages it needs. The worker's Demo writes its models and
eval_responses.jsonl as usual but not summary.json; this process merges the stage's summary
entry and scores when it finishes and rewrites summary.json and the reports, in report order.

Threads: a stage that nothing else can run beside (the base model and SFT of a one-seed demo)
gets all of torch's threads; the others get threads // N each. Each stage seeds itself from
`train.seed`, so a stage computes the same numbers in a worker as in one process with the same
thread count (tests/test_demo_jobs.py checks this on the quick demo). Which stage starts first
when several could: the one with the longest chain of stages still to run behind it, by the
rough minutes in pipeline.STAGES (longest job first keeps the last cores busy).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from alignkit.jobs import Job, run_jobs


def default_jobs() -> int:
    """Stages at once by default: the cores this process may use, at most 4 (the demo's graph
    has at most four stages ready at once after SFT)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, 4))


def _stage_job(out: str, quick: bool, seed: int, world_dir: str, summary: dict, scores: dict, name: str,
               round2: bool) -> dict:
    """Worker side: run stage `name` on a copy of the demo's state; its entry, scores, rounds."""
    from alignkit.pipeline import STAGES, Demo

    d = Demo(Path(out), quick, seed, world_dir=world_dir)
    d.persist = False
    d.summary, d.scores = summary, scores
    STAGES[name][1](d, round2)
    return {"entry": d.summary["stages"][name], "scores": d.scores.get(name), "rounds": d.summary.get("rounds")}


def _priorities(names: Sequence[str]) -> dict[str, float]:
    """Per stage: its rough minutes plus the longest chain of stages that need it (transitively)."""
    from alignkit.pipeline import STAGES

    memo: dict[str, float] = {}

    def chain(name: str) -> float:
        if name not in memo:
            after = [chain(n) for n in names if name in STAGES[n][0]]
            memo[name] = STAGES[name][2] + max(after, default=0.0)
        return memo[name]

    return {n: chain(n) for n in names}


def _alone(names: Sequence[str]) -> set[str]:
    """The stages every other stage needs or follows: nothing can run beside them."""
    from alignkit.pipeline import STAGES

    def ancestors(name: str) -> set[str]:
        found: set[str] = set()
        for n in STAGES[name][0]:
            found |= {n} | ancestors(n)
        return found

    up = {n: ancestors(n) for n in names}
    return {n for n in names if all(m == n or n in up[m] or m in up[n] for m in names)}


def run_parallel(demos: Sequence, jobs: int, round2: bool,
                 on_demo_done: Callable[[object], None] | None = None) -> None:
    """Run every stage of every demo (pipeline.Demo, world already written) on `jobs` workers;
    on_demo_done(d) runs when all of d's stages are done."""
    from alignkit.pipeline import STAGES, stage_names

    names = stage_names(round2)
    prio = _priorities(names)
    total = torch.get_num_threads()
    alone = _alone(names) if len(demos) == 1 else set()
    by_seed = {d.seed: d for d in demos}
    left = {d.seed: set(names) for d in demos}
    started: dict[tuple[int, str], float] = {}

    def args(d, name: str) -> Callable[[], tuple]:
        return lambda: (str(d.out), d.quick, d.seed, str(d.world_dir), d.summary, d.scores, name, round2)

    order = sorted(((d, n) for d in demos for n in names), key=lambda dn: -prio[dn[1]])  # stable: seeds in order
    job_list = [Job((d.seed, n), tuple((d.seed, m) for m in STAGES[n][0] if m in names),
                    total if n in alone else max(1, total // jobs), _stage_job, args(d, n)) for d, n in order]

    def on_start(key) -> None:
        started[key] = time.perf_counter()
        print(f"[demo] seed {key[0]}: stage {key[1]} started", flush=True)

    def on_done(key, result: dict) -> None:
        seed, name = key
        d = by_seed[seed]
        stages = {**d.summary["stages"], name: result["entry"]}
        d.summary["stages"] = {n: stages[n] for n in STAGES if n in stages}  # report order
        if result["scores"] is not None:
            d.scores[name] = result["scores"]
        if result["rounds"] is not None:
            d.summary["rounds"] = result["rounds"]
        d.save()
        print(f"[demo] seed {seed}: stage {name} done in {time.perf_counter() - started[key]:.0f} s", flush=True)
        left[seed].discard(name)
        if not left[seed] and on_demo_done is not None:
            on_demo_done(d)

    run_jobs(job_list, jobs, on_done, on_start)
