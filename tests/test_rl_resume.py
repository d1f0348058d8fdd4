"""Checkpoints and exact resume of the RL stages (PPO, GRPO, RLOO): a run killed after an
iteration and resumed with train.resume=true ends with the same metrics.jsonl rows (timings
aside) and the same weights as an uninterrupted run; an earlier run is never clobbered."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from alignkit.config import ConfigError, load_config
from alignkit.models.load import save_model, tiny_llama
from alignkit.train import checkpoint as ckpt
from alignkit.train import grpo, ppo, rloo, trackers
from alignkit.train import rollout as rollout_mod

pytestmark = pytest.mark.usefixtures("one_thread")

TIMING = {"rollout_s", "iteration_s"}


class Killed(Exception):
    """Stands in for SIGKILL: raised right after an iteration's metrics row is written."""


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    from alignkit.models.bpe import train_bpe_tokenizer

    root = tmp_path_factory.mktemp("rl_resume")
    tok = train_bpe_tokenizer(
        ["Human: What is one plus two?\nAssistant: three . four five six seven"] * 20, vocab_size=300
    )
    save_model(tiny_llama("nano", tokenizer=tok, seed=0), tok, root / "sft")
    (root / "prompts.jsonl").write_text(
        "".join(
            json.dumps({"prompt": f"Human: What is {w} plus two?\nAssistant:"}) + "\n"
            for w in ("one", "two", "three", "four", "five", "six")
        )
    )
    (root / "resume_rewards.py").write_text(
        "def count_e(prompts, responses):\n    return [r.count('e') / 4 for r in responses]\n"
    )
    return root


def _base(tiny_dirs) -> list[str]:
    return [
        f"model.path={tiny_dirs / 'sft'}",
        f"data.path={tiny_dirs / 'prompts.jsonl'}",
        "reward.source=function",
        "reward.function=resume_rewards:count_e",
        "train.precision=fp32",
    ]


PPO_SEPARATE = [
    "rollout_batch=4",
    "train.batch_size=2",
    "ppo_epochs=2",
    "rollout.max_new_tokens=6",
    "value_model=separate",
    "kl_target=1.0",
    "kl_horizon=10",
    "train.lr=1e-3",
]
PPO_SHARED_LORA = [
    "rollout_batch=4",
    "train.batch_size=2",
    "ppo_epochs=2",
    "rollout.max_new_tokens=6",
    "value_model=shared",
    "model.lora_r=4",
    "train.lr=1e-2",
    "stop_approx_kl=0.05",
]
GROUPS = [
    "prompts_per_step=2",
    "group_size=3",
    "rollout.max_new_tokens=5",
    "train.batch_size=3",
    "updates_per_rollout=2",
    "train.lr=1e-3",
]


def _rows(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _numbers(rows: list[dict]) -> list[str]:
    # json text, so a NaN compares equal to itself
    return [json.dumps({k: v for k, v in r.items() if k not in TIMING}, sort_keys=True) for r in rows]


def _assert_same_weights(a, b) -> None:
    ta, tb = load_file(str(a)), load_file(str(b))
    assert sorted(ta) == sorted(tb)
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


def _steps(out) -> list[str]:
    return [p.name for _, p in ckpt.step_dirs(out / "checkpoints")]


def _kill_after(monkeypatch, iteration: int) -> None:
    real = trackers.MetricsLog.write

    def write_then_die(self, row):
        real(self, row)
        if row["step"] == iteration:
            raise Killed(f"killed after iteration {iteration}")

    monkeypatch.setattr(trackers.MetricsLog, "write", write_then_die)


def _count_rollouts(monkeypatch) -> list[int]:
    calls, real = [], rollout_mod.collect_rollout

    def counted(*args, **kwargs):
        calls.append(kwargs["row_seeds"][0])
        return real(*args, **kwargs)

    monkeypatch.setattr(rollout_mod, "collect_rollout", counted)
    return calls


def _killed_and_resumed_equals_uninterrupted(stage, overrides, tmp_path, monkeypatch, capsys):
    """Checkpoints every 2 of 5 iterations (keep 2), a cosine schedule with warm-up; the run is
    killed after writing iteration 3's row, so iteration 3 is lost (the checkpoint is step-2):
    the resumed run drops that row, runs exactly iterations 3, 4, 5, and ends like the
    uninterrupted run, in every metric and every saved tensor (policy, value model, head)."""
    args = [
        *overrides,
        "iterations=5",
        "train.save_every=2",
        "train.keep_checkpoints=2",
        "train.schedule=cosine",
        "train.warmup_steps=2",
    ]
    ref, run = tmp_path / "ref", tmp_path / "run"
    stage.run(load_config(stage.Config, None, [*args, f"out={ref}"]))

    with monkeypatch.context() as m:
        _kill_after(m, 3)
        with pytest.raises(Killed):
            stage.run(load_config(stage.Config, None, [*args, f"out={run}"]))
    assert [r["step"] for r in _rows(run)] == [1, 2, 3] and _steps(run) == ["step-2"]
    assert not (run / "final").exists()

    capsys.readouterr()
    with monkeypatch.context() as m:
        rollouts = _count_rollouts(m)
        stage.run(load_config(stage.Config, None, [*args, f"out={run}", "train.resume=true"]))
    assert f"resumed from {run / 'checkpoints' / 'step-2'} (iteration 2)" in capsys.readouterr().err
    assert len(rollouts) == 3  # iterations 3, 4, 5 only

    assert [r["step"] for r in _rows(run)] == [1, 2, 3, 4, 5]
    assert _numbers(_rows(run)) == _numbers(_rows(ref))
    assert _steps(run) == _steps(ref) == ["step-4", "step-5"]
    _assert_same_weights(
        run / "checkpoints" / "step-5" / "model.safetensors",
        ref / "checkpoints" / "step-5" / "model.safetensors",
    )
    _assert_same_weights(run / "final" / "model.safetensors", ref / "final" / "model.safetensors")
    return _rows(ref)


@pytest.mark.parametrize("overrides", [PPO_SEPARATE, PPO_SHARED_LORA], ids=["separate", "shared-lora"])
def test_ppo_killed_and_resumed_equals_uninterrupted(tiny_dirs, tmp_path, monkeypatch, capsys, overrides):
    monkeypatch.syspath_prepend(str(tiny_dirs))
    rows = _killed_and_resumed_equals_uninterrupted(
        ppo, [*_base(tiny_dirs), *overrides], tmp_path, monkeypatch, capsys
    )
    if "kl_target=1.0" in overrides:  # the adaptive beta moved, so the checkpoint had to carry it
        assert len({r["beta"] for r in rows}) == 5
    saved = load_file(str(tmp_path / "run" / "checkpoints" / "step-5" / "model.safetensors"))
    assert any(k.startswith("value_model.") or k.startswith("head.") for k in saved)  # the critic is saved


@pytest.mark.parametrize("stage", [grpo, rloo])
def test_grpo_rloo_killed_and_resumed_equals_uninterrupted(tiny_dirs, tmp_path, monkeypatch, capsys, stage):
    monkeypatch.syspath_prepend(str(tiny_dirs))
    _killed_and_resumed_equals_uninterrupted(
        stage, [*_base(tiny_dirs), *GROUPS], tmp_path, monkeypatch, capsys
    )


def test_more_iterations_continue_from_the_final_checkpoint(tiny_dirs, tmp_path, monkeypatch):
    """With a constant schedule, 3 iterations then resume=true with iterations=5 equals 5 at once."""
    monkeypatch.syspath_prepend(str(tiny_dirs))
    args = [*_base(tiny_dirs), *GROUPS]
    grpo.run(load_config(grpo.Config, None, [*args, "iterations=5", f"out={tmp_path / 'ref'}"]))
    grpo.run(load_config(grpo.Config, None, [*args, "iterations=3", f"out={tmp_path / 'run'}"]))
    assert _steps(tmp_path / "run") == ["step-3"]  # save_every 0: only at the end
    grpo.run(
        load_config(
            grpo.Config, None, [*args, "iterations=5", f"out={tmp_path / 'run'}", "train.resume=true"]
        )
    )
    assert _numbers(_rows(tmp_path / "run")) == _numbers(_rows(tmp_path / "ref"))
    _assert_same_weights(
        tmp_path / "run" / "final" / "model.safetensors", tmp_path / "ref" / "final" / "model.safetensors"
    )


def test_a_longer_resumed_run_reshapes_the_schedule(tiny_dirs, tmp_path, monkeypatch):
    """The loop's rule: the resumed run's horizon shapes the remaining steps. GRPO with 2 x 2
    minibatches = 4 optimizer steps per iteration; 2 iterations, then resume with 4: total 16
    steps, and after iteration 3 (12 steps) the cosine multiplier is 0.5 (1 + cos(pi 12/16)),
    not 0 as the first run's horizon of 8 steps would give."""
    import math

    monkeypatch.syspath_prepend(str(tiny_dirs))
    args = [*_base(tiny_dirs), *GROUPS, "train.schedule=cosine", f"out={tmp_path}"]
    grpo.run(load_config(grpo.Config, None, [*args, "iterations=2"]))
    grpo.run(load_config(grpo.Config, None, [*args, "iterations=4", "train.resume=true"]))
    rows = _rows(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[2]["lr"] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 12 / 16)), rel=1e-12)


def test_resume_before_the_first_checkpoint_starts_fresh(tiny_dirs, tmp_path, monkeypatch):
    """Killed after iteration 1 with save_every 2: nothing to resume from, so resume=true starts
    over and the killed run's row 1 is not kept twice."""
    monkeypatch.syspath_prepend(str(tiny_dirs))
    args = [*_base(tiny_dirs), *GROUPS, "iterations=2", "train.save_every=2", f"out={tmp_path}"]
    with monkeypatch.context() as m:
        _kill_after(m, 1)
        with pytest.raises(Killed):
            grpo.run(load_config(grpo.Config, None, args))
    first = _numbers(_rows(tmp_path))
    grpo.run(load_config(grpo.Config, None, [*args, "train.resume=true"]))
    assert [r["step"] for r in _rows(tmp_path)] == [1, 2]
    assert _numbers(_rows(tmp_path))[:1] == first


@pytest.mark.parametrize("stage", [ppo, grpo])
def test_an_earlier_run_needs_resume_or_overwrite(tiny_dirs, tmp_path, monkeypatch, stage):
    """The loop's rule: a fresh run where checkpoints exist stops before loading anything, naming
    the directory and both ways out; overwrite=true replaces the earlier run."""
    monkeypatch.syspath_prepend(str(tiny_dirs))
    extra = PPO_SEPARATE if stage is ppo else GROUPS
    args = [*_base(tiny_dirs), *extra, "iterations=1", f"out={tmp_path}"]
    stage.run(load_config(stage.Config, None, args))
    before = (tmp_path / "metrics.jsonl").read_text()
    with pytest.raises(FileExistsError) as err:
        stage.run(load_config(stage.Config, None, args))
    msg = str(err.value)
    assert (
        str(tmp_path / "checkpoints") in msg and "train.resume=true" in msg and "train.overwrite=true" in msg
    )
    assert (tmp_path / "metrics.jsonl").read_text() == before and _steps(tmp_path) == ["step-1"]

    stage.run(load_config(stage.Config, None, [*args, "iterations=2", "train.overwrite=true"]))
    assert [r["step"] for r in _rows(tmp_path)] == [1, 2] and _steps(tmp_path) == ["step-2"]


def test_resume_refuses_another_runs_settings(tiny_dirs, tmp_path, monkeypatch):
    """A changed knob (kl_coef here) or fewer iterations than done is an error naming the key,
    before anything is loaded or written; bookkeeping keys (iterations up, save_every) may change."""
    monkeypatch.syspath_prepend(str(tiny_dirs))
    args = [*_base(tiny_dirs), *PPO_SEPARATE, "iterations=2", f"out={tmp_path}"]
    ppo.run(load_config(ppo.Config, None, args))
    before = (tmp_path / "metrics.jsonl").read_text()
    with pytest.raises(ConfigError, match=r"kl_coef \([0-9.e-]+ -> 0\.3\)"):
        ppo.run(load_config(ppo.Config, None, [*args, "kl_coef=0.3", "train.resume=true"]))
    with pytest.raises(ConfigError, match="'iterations' is 1.*already at iteration 2"):
        ppo.run(load_config(ppo.Config, None, [*args, "iterations=1", "train.resume=true"]))
    assert (tmp_path / "metrics.jsonl").read_text() == before
    ppo.run(load_config(ppo.Config, None, [*args, "iterations=3", "train.save_every=1", "train.resume=true"]))
    assert [r["step"] for r in _rows(tmp_path)] == [1, 2, 3]
