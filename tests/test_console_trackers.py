"""One progress/logging design for every stage: the header line, progress on a terminal or as
plain lines in a log, metrics.jsonl + TensorBoard for the RL stages as for the supervised loop,
the experiment trackers of train.report_to (W&B offline, MLflow on a local store), and the
warning when max_steps means many epochs."""

from __future__ import annotations

import io
import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _ddp_worker as w  # noqa: E402

from alignkit.config import ConfigError, TrainConfig, load_config  # noqa: E402
from alignkit.console import Progress  # noqa: E402
from alignkit.models.bpe import train_bpe_tokenizer  # noqa: E402
from alignkit.models.load import save_model, tiny_llama  # noqa: E402
from alignkit.train import grpo, trackers  # noqa: E402
from alignkit.train.loop import train  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _toy(out: Path, n: int = 20, **kw):
    cfg = TrainConfig(lr=1e-2, batch_size=8, log_every=1, progress=False, tensorboard=False, precision="fp32", **kw)
    return train(w.make_model(), w.step, w.make_data(n), w.collate, w.make_plan(n, 8), cfg, out, name="toy")


def _rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_progress_prints_plain_lines_off_a_terminal():
    """StringIO is not a terminal: every update prints when the interval is 0; with a long
    interval only the first and the last unit print. The remaining time is extrapolated."""
    s = io.StringIO()
    p = Progress(3, stream=s, every_s=0.0)
    for loss in (1.5, 1.25, 1.0):
        p.update(1, loss=loss, tok_s="812")
    lines = s.getvalue().splitlines()
    assert [x.split(" |")[0] for x in lines] == [
        "step 1/3 (33%) loss 1.5 tok_s 812", "step 2/3 (67%) loss 1.25 tok_s 812", "step 3/3 (100%) loss 1 tok_s 812"]
    assert lines[-1].endswith("elapsed, 0:00 left") and "\r" not in s.getvalue()

    s = io.StringIO()
    p = Progress(100, initial=40, stream=s, unit="iteration", every_s=3600)
    for _ in range(60):
        p.update(1)
    assert [x.split(" |")[0] for x in s.getvalue().splitlines()] == ["iteration 41/100 (41%)", "iteration 100/100 (100%)"]
    s = io.StringIO()
    Progress(5, stream=s, enabled=False).update(5)
    assert s.getvalue() == ""


WORDS = "Human: What is one plus two?\nAssistant: three . four five six seven eight nine ten"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("rl")
    tok = train_bpe_tokenizer([WORDS] * 20, vocab_size=300)
    save_model(tiny_llama("nano", tokenizer=tok, seed=0), tok, root / "sft")
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": f"Human: What is {x} plus two?\nAssistant:"})
                                                + "\n" for x in ("one", "two", "three", "four")))
    (root / "rewards_mod.py").write_text("def count_e(prompts, responses):\n    return [r.count('e') / 4 for r in responses]\n")
    return root


def test_rl_run_logs_like_the_supervised_loop(tiny, monkeypatch, capsys):
    """RLOO (the GRPO stage's code): a header line, one plain progress line per iteration off a
    terminal (the first and last at least), one metrics.jsonl row per iteration, and TensorBoard
    scalars equal to those rows."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from alignkit.train import rloo

    monkeypatch.syspath_prepend(str(tiny))
    out = tiny / "rloo"
    cfg = load_config(rloo.Config, None, [
        f"model.path={tiny / 'sft'}", f"data.path={tiny / 'prompts.jsonl'}", f"out={out}", "reward.source=function",
        "reward.function=rewards_mod:count_e", "iterations=2", "prompts_per_step=2", "group_size=2",
        "rollout.max_new_tokens=4", "train.tensorboard=true", "train.progress=true",
    ])
    grpo.run(cfg)
    err = capsys.readouterr().err
    assert "alignkit rloo: 4 prompts, 2 iterations, 2 prompts x 2 samples per iteration" in err
    assert f"-> {out}" in err
    assert "iteration 1/2 (50%) reward " in err and "iteration 2/2 (100%) reward " in err
    rows = _rows(out)
    assert [r["step"] for r in rows] == [1, 2]
    tb = EventAccumulator(str(out / "tb"))
    tb.Reload()
    for key in ("reward", "kl", "loss", "entropy"):
        assert [(e.step, pytest.approx(e.value, rel=1e-6)) for e in tb.Scalars(key)] == \
            [(r["step"], r[key]) for r in rows], key


def test_rl_run_without_tensorboard_writes_no_events(tiny, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(tiny))
    out = tiny / "grpo-quiet"
    cfg = load_config(grpo.Config, None, [
        f"model.path={tiny / 'sft'}", f"data.path={tiny / 'prompts.jsonl'}", f"out={out}", "reward.source=function",
        "reward.function=rewards_mod:count_e", "iterations=1", "prompts_per_step=2", "group_size=2",
        "rollout.max_new_tokens=4", "train.tensorboard=false", "train.progress=false",
    ])
    grpo.run(cfg)
    assert "iteration 1/1" not in capsys.readouterr().err
    assert len(_rows(out)) == 1 and not (out / "tb").exists()


def test_a_missing_tracker_package_is_a_config_error_naming_the_extra(tmp_path, monkeypatch):
    real = trackers.importlib.util.find_spec
    monkeypatch.setattr(trackers.importlib.util, "find_spec", lambda n: None if n == "trackio" else real(n))
    with pytest.raises(ConfigError, match=r"train.report_to' names trackio.*pip install 'alignkit\[trackio\]'"):
        _toy(tmp_path, max_steps=1, report_to=("trackio",))
    assert not (tmp_path / "metrics.jsonl").exists()


def test_wandb_offline_run_gets_every_metric(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb not installed (pip install 'alignkit[wandb]')")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    import wandb

    _toy(tmp_path, max_steps=2, report_to=("wandb",))
    wandb.teardown()  # stops W&B's writer process: under load it may still be flushing after finish()
    (run,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    data = run.read_bytes()  # W&B's record log: the metric names and JSON values appear verbatim
    rows = _rows(tmp_path)
    for key in ("loss", "grad_norm", "accuracy", "tokens_per_s"):
        assert key.encode() in data, key
    assert json.dumps(rows[-1]["loss"]).encode() in data
    assert (tmp_path / "wandb_run_id").read_text().strip() in run.name


def test_mlflow_local_store_gets_the_metrics_jsonl_values(tmp_path, monkeypatch):
    pytest.importorskip("mlflow", reason="mlflow not installed (pip install 'alignkit[mlflow]')")
    pytest.importorskip("alembic", reason="MLflow's local sqlite store needs alembic (pip install 'alignkit[mlflow]')")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    import mlflow

    _toy(tmp_path, max_steps=3, report_to=("mlflow",))
    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("alignkit").experiment_id])
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == \
        [(r["step"], pytest.approx(r["loss"], rel=1e-12)) for r in _rows(tmp_path)]
    assert run.data.params["train.lr"] == "0.01"
    assert run.info.run_name == "toy"


def test_many_epochs_from_max_steps_are_warned(tmp_path, capsys):
    """20 examples in batches of 8 are 3 batches an epoch: 10 steps are 3.3 epochs (warned),
    9 steps are 3.0 (not)."""
    _toy(tmp_path / "a", max_steps=10)
    err = capsys.readouterr().err
    assert "alignkit: warning: train.max_steps=10 with train.batch_size=8 is 3.3 passes over the 20 examples" in err
    _toy(tmp_path / "b", max_steps=9)
    assert "warning" not in capsys.readouterr().err


def test_header_line_of_the_supervised_loop(tmp_path, capsys):
    _toy(tmp_path, max_steps=2)
    err = capsys.readouterr().err.splitlines()
    assert err[0] == (f"alignkit toy: 20 examples, 2 steps (0.7 epochs), batch 8 (1 process x 1 micro-batches), "
                      f"lr 0.01, fp32 on cpu -> {tmp_path}")
    assert os.path.isfile(tmp_path / "metrics.jsonl")


def test_rl_prompt_truncation_is_warned(tiny, monkeypatch, capsys):
    """data.max_prompt_len=4 cuts every one of the 4 prompts (each is more than 4 tokens)."""
    monkeypatch.syspath_prepend(str(tiny))
    cfg = load_config(grpo.Config, None, [
        f"model.path={tiny / 'sft'}", f"data.path={tiny / 'prompts.jsonl'}", f"out={tiny / 'cut'}",
        "reward.source=function", "reward.function=rewards_mod:count_e", "iterations=1", "prompts_per_step=2",
        "group_size=2", "rollout.max_new_tokens=2", "train.tensorboard=false", "data.max_prompt_len=4",
    ])
    grpo.run(cfg)
    assert "alignkit: warning: " in (err := capsys.readouterr().err)
    assert f"{tiny / 'prompts.jsonl'}: data.max_prompt_len=4 cuts 4 of 4 prompts (100%)" in err
