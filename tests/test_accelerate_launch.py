"""`accelerate launch --multi_gpu --num_processes 2` (accelerate's own launcher; on CPU its ranks
join a gloo group) trains SFT and DPO to the same weights and losses as one process with the same
global batch (DDP, fp32, within 1e-5), and the run folder records who launched it and how many
ranks ran.

`accelerate launch --cpu --num_processes 2` starts only ONE process, so the recipe uses
--multi_gpu even on a CPU machine (docs/distributed.md)."""

import json
import os
import shutil
import subprocess

import pytest

from tests.test_distributed import COMMON, ROOT, STAGES, _env, assert_close, ok, run
from tests.test_distributed import setup as world  # noqa: F401  (the tiny world and base model)

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("accelerate") is None, reason="accelerate's launcher is not on PATH")]


def accelerate(args: list[str]) -> subprocess.CompletedProcess:
    cmd = [shutil.which("accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           "-m", "alignkit.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300, cwd=ROOT)


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_accelerate_launch_two_ranks_equal_one_process(world, stage):  # noqa: F811
    one, two = world / f"one-{stage}", world / f"acc-{stage}"
    args = [*STAGES[stage](world), *COMMON, "train.max_steps=3"]
    ok(run([*args, "train.grad_accum=2", "--out", str(one)]))
    ok(accelerate([*args, "--out", str(two)]))
    assert json.loads((two / "run.json").read_text())["launch"] == {"world_size": 2, "nnodes": 1,
                                                                      "launcher": "accelerate"}
    assert json.loads((one / "run.json").read_text())["launch"]["world_size"] == 1
    assert_close(two, one, 1e-5)


def test_run_record_names_the_launcher(monkeypatch):
    from types import SimpleNamespace

    from alignkit.runinfo import launch

    for k in [k for k in os.environ if k.startswith("ACCELERATE_")] + ["TORCHELASTIC_RUN_ID"]:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("GROUP_WORLD_SIZE", "2")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    assert launch() == {"world_size": 4, "nnodes": 2, "launcher": "torchrun"}
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    assert launch()["launcher"] == "accelerate"
    ray_cfg = SimpleNamespace(launcher="ray", ray=SimpleNamespace(workers=3))
    assert launch(ray_cfg) == {"world_size": 3, "nnodes": None, "launcher": "ray"}
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert launch(SimpleNamespace(launcher="torchrun")) == {"world_size": 1, "nnodes": 1, "launcher": "torchrun"}
