"""Run a graph of jobs on a pool of worker processes, each job once all the jobs it needs are done.

    run_jobs(jobs, workers=2, on_done=lambda key, result: ...)

Used by `alignkit demo --jobs N`: the demo's stages form a graph (DPO, GRPO and the reward models
need only SFT; PPO needs the reward models; CAI starts from the base model), so on a machine with
N cores N of them can train at once, each with its share of the cores. Every job runs in a fresh
`spawn` process (no state left over from another job, and no OpenMP pool inherited through
`fork`), with `torch.set_num_threads(job.threads)` set before it starts.

Jobs are started in the order given whenever a worker is free and their needs are met; `on_done`
runs in this process as each one finishes, in the order they finish. A job that raises stops the
run: the jobs not yet started are cancelled, the running ones finish, and the error is raised
again naming the job.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import sys
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Job:
    """One unit of work.

    key: the job's name (unique); needs: the keys of the jobs that must finish first; threads:
    torch threads in the worker; fn: a module-level function (it is pickled into the worker);
    args: a function called in this process just before the job starts, returning fn's arguments
    (so a job can read what the jobs it needs produced).
    """

    key: Hashable
    needs: tuple[Hashable, ...]
    threads: int
    fn: Callable[..., Any]
    args: Callable[[], tuple]


class JobError(RuntimeError):
    """A job raised; the message names it, the original error is the cause."""


def _call(fn: Callable[..., Any], threads: int, args: tuple) -> Any:
    import torch

    torch.set_num_threads(threads)
    return fn(*args)


def check_graph(jobs: Sequence[Job]) -> None:
    """Raise ValueError for a repeated key, a need that is not a job, or a cycle."""
    keys = [j.key for j in jobs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"run_jobs: repeated job keys in {keys}")
    by_key = {j.key: j for j in jobs}
    for j in jobs:
        missing = [n for n in j.needs if n not in by_key]
        if missing:
            raise ValueError(f"run_jobs: job {j.key!r} needs {missing}, which are not jobs")
    state: dict[Hashable, int] = {}  # 1 visiting, 2 done

    def visit(key: Hashable, path: tuple) -> None:
        if state.get(key) == 2:
            return
        if state.get(key) == 1:
            raise ValueError(f"run_jobs: the jobs' needs form a cycle: {' -> '.join(map(str, path + (key,)))}")
        state[key] = 1
        for n in by_key[key].needs:
            visit(n, path + (key,))
        state[key] = 2

    for k in keys:
        visit(k, ())


def run_jobs(jobs: Sequence[Job], workers: int, on_done: Callable[[Hashable, Any], None],
             on_start: Callable[[Hashable], None] | None = None) -> None:
    """Run `jobs` on `workers` spawned processes (see the module docstring)."""
    if workers < 1:
        raise ValueError(f"run_jobs: workers must be >= 1, got {workers}")
    check_graph(jobs)
    pending = list(jobs)
    done: set[Hashable] = set()
    running: dict[cf.Future, Hashable] = {}
    ctx = multiprocessing.get_context("spawn")
    fresh = {"max_tasks_per_child": 1} if sys.version_info >= (3, 11) else {}  # 3.10: workers are reused
    with cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx, **fresh) as pool:
        while pending or running:
            for job in [j for j in pending if set(j.needs) <= done][: workers - len(running)]:
                pending.remove(job)
                if on_start is not None:
                    on_start(job.key)
                running[pool.submit(_call, job.fn, job.threads, job.args())] = job.key
            finished, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
            for fut in finished:
                key = running.pop(fut)
                try:
                    result = fut.result()
                except BaseException as exc:
                    for other in running:
                        other.cancel()
                    raise JobError(f"job {key!r} failed: {type(exc).__name__}: {exc}") from exc
                done.add(key)
                on_done(key, result)
