"""The job graph behind `alignkit demo --jobs`: needs respected, threads set per job, errors named,
bad graphs refused; the demo's stage priorities and lone stages by hand."""

import math
import operator

import pytest
import torch

from alignkit import demo_jobs
from alignkit.jobs import Job, JobError, check_graph, run_jobs


def test_a_job_starts_after_its_needs_and_reads_their_results():
    results, order = {}, []

    def done(key, value):
        results[key] = value
        order.append(key)

    jobs = [
        Job("c", ("a", "b"), 1, operator.add, lambda: (results["a"], results["b"])),  # listed first, runs last
        Job("a", (), 1, operator.add, lambda: (2, 3)),
        Job("b", ("a",), 1, operator.mul, lambda: (results["a"], 10)),
        Job("threads", (), 2, torch.get_num_threads, lambda: ()),
    ]
    run_jobs(jobs, 2, done, on_start=lambda key: order.append(f"start {key}"))
    assert results == {"a": 5, "b": 50, "c": 55, "threads": 2}
    assert order.index("a") < order.index("start b") < order.index("b") < order.index("start c")


def test_a_failing_job_is_named_and_stops_the_jobs_that_need_it():
    seen = []
    jobs = [Job("bad", (), 1, math.sqrt, lambda: (-1.0,)),
            Job("after", ("bad",), 1, math.sqrt, lambda: (4.0,))]
    with pytest.raises(JobError, match="job 'bad' failed: ValueError: math domain error"):
        run_jobs(jobs, 2, lambda key, value: seen.append(key))
    assert seen == []


@pytest.mark.parametrize("jobs, message", [
    ([Job("a", ("a",), 1, abs, lambda: (1,))], "cycle: a -> a"),
    ([Job("a", ("b",), 1, abs, lambda: (1,)), Job("b", ("a",), 1, abs, lambda: (1,))], "cycle"),
    ([Job("a", ("z",), 1, abs, lambda: (1,))], r"job 'a' needs \['z'\], which are not jobs"),
    ([Job("a", (), 1, abs, lambda: (1,)), Job("a", (), 1, abs, lambda: (1,))], "repeated job keys"),
])
def test_bad_graphs_are_refused_before_anything_runs(jobs, message):
    with pytest.raises(ValueError, match=message):
        check_graph(jobs)


def test_stage_priorities_are_the_longest_chain_behind_each_stage():
    """Rough minutes (pipeline.STAGES): base 6.5, sft 0.7, reward 4.0, dpo 1.2, ppo 1.8, overopt 3.0,
    ppo_r2 7.0, grpo 0.8, cai 3.4."""
    names = ["base", "sft", "reward", "dpo", "ppo", "overopt", "grpo", "cai"]
    p = demo_jobs._priorities(names)
    assert p["overopt"] == pytest.approx(3.0) and p["ppo"] == pytest.approx(1.8)
    assert p["reward"] == pytest.approx(4.0 + 3.0)  # overopt is the longer of ppo / overopt
    assert p["sft"] == pytest.approx(0.7 + 7.0)  # reward's chain beats cai 3.4, dpo 1.2, grpo 0.8
    assert p["base"] == pytest.approx(6.5 + 7.7)
    with_r2 = demo_jobs._priorities(names + ["ppo_r2"])
    assert with_r2["ppo"] == pytest.approx(1.8 + 7.0) and with_r2["reward"] == pytest.approx(4.0 + 8.8)


def test_only_base_and_sft_run_alone():
    names = ["base", "sft", "reward", "dpo", "ppo", "overopt", "grpo", "cai"]
    assert demo_jobs._alone(names) == {"base", "sft"}
    assert demo_jobs._alone(names + ["ppo_r2"]) == {"base", "sft"}
