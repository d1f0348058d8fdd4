"""Where a run's metric rows go, the same for every stage (the supervised loop and the RL
stages): OUT/metrics.jsonl always, TensorBoard (OUT/tb) when `train.tensorboard` is true, and
the experiment trackers named in `train.report_to`, each through its own library:

    wandb     Weights & Biases; offline with WANDB_MODE=offline (files under OUT/wandb)
    mlflow    MLflow; MLFLOW_TRACKING_URI when set, else a local store sqlite:///OUT/mlflow.db
    trackio   Trackio (Hugging Face's local-first tracker); TRACKIO_DIR sets where it stores

Each is an optional extra (`pip install 'alignkit[wandb]'`); naming one that is not installed
fails before training starts with the command that installs it.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import secrets
from pathlib import Path
from typing import Any

from alignkit.config import ConfigError

PACKAGES = {"tensorboard": ("tensorboard",), "wandb": ("wandb",), "mlflow": ("mlflow", "sqlalchemy", "alembic"),
            "trackio": ("trackio",)}
"""Tracker name in train.report_to -> the modules it needs (MLflow's local sqlite store: sqlalchemy, alembic)."""


def check_installed(names: tuple[str, ...] | list[str]) -> None:
    """ConfigError naming the first tracker of `names` whose library is missing, and its extra."""
    for name in names:
        if name not in PACKAGES:
            raise ConfigError(f"config key 'train.report_to': unknown tracker {name!r} "
                              f"(expected some of {', '.join(PACKAGES)})")
        missing = [m for m in PACKAGES[name] if importlib.util.find_spec(m) is None]
        if missing:
            raise ConfigError(f"config key 'train.report_to' names {name}, but the {', '.join(missing)} package"
                              f"{'s are' if len(missing) > 1 else ' is'} not installed: pip install 'alignkit[{name}]'")


class _TensorBoard:
    def __init__(self, out: Path, name: str, config: dict, resume_step: int):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step drops events of steps after the resumed checkpoint (a killed run's)
        self.writer = SummaryWriter(str(out / "tb"), purge_step=resume_step + 1 if resume_step else None)

    def log(self, scalars: dict[str, float], step: int) -> None:
        for k, v in scalars.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _WandB:
    def __init__(self, out: Path, name: str, config: dict, resume_step: int):
        import wandb

        # one W&B run per run folder: a resumed run continues the id it saved
        id_file = out / "wandb_run_id"
        run_id = id_file.read_text().strip() if resume_step and id_file.is_file() else secrets.token_hex(4)
        id_file.write_text(run_id + "\n")
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "alignkit"), name=name, id=run_id,
                              resume="allow", dir=str(out), config=config)

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


class _MLflow:
    def __init__(self, out: Path, name: str, config: dict, resume_step: int):
        import mlflow

        self.mlflow = mlflow
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            mlflow.set_tracking_uri(f"sqlite:///{(out / 'mlflow.db').resolve()}")
        mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", "alignkit"))
        mlflow.start_run(run_name=name)
        params = _flat(config)
        mlflow.log_params({k: str(v)[:500] for k, v in params.items()})

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.mlflow.log_metrics({k: v for k, v in scalars.items() if math.isfinite(v)}, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


class _Trackio:
    def __init__(self, out: Path, name: str, config: dict, resume_step: int):
        import trackio

        self.trackio = trackio
        trackio.init(project=os.environ.get("TRACKIO_PROJECT", "alignkit"), name=name, config=config,
                     resume="allow")

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.trackio.log(scalars, step=step)

    def close(self) -> None:
        self.trackio.finish()


TRACKERS = {"tensorboard": _TensorBoard, "wandb": _WandB, "mlflow": _MLflow, "trackio": _Trackio}


def _flat(d: dict, prefix: str = "") -> dict:
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _run_config(out: Path, fallback: dict) -> dict:
    """The run's resolved config (OUT/config.yaml, written by the CLI), else `fallback`."""
    path = out / "config.yaml"
    if path.is_file():
        import yaml

        loaded = yaml.safe_load(path.read_text())
        if isinstance(loaded, dict):
            return loaded
    return fallback


class MetricsLog:
    """The metric rows of one run. `write(row)` appends it to OUT/metrics.jsonl and sends its
    numbers (all but "step") to every tracker; only the main process writes (main=False: no-op)."""

    def __init__(self, out: str | Path, train: Any, *, name: str, resume_step: int = 0, main: bool = True,
                 config: dict | None = None):
        self.path = Path(out) / "metrics.jsonl"
        self.main = main
        self.trackers: list[Any] = []
        if not main:
            return
        names = list(dict.fromkeys((["tensorboard"] if train.tensorboard else []) + list(train.report_to)))
        check_installed(names)
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        settings = _run_config(out, config or {})
        try:
            for tracker in names:
                self.trackers.append(TRACKERS[tracker](out, name, settings, resume_step))
        except BaseException:
            self.close()
            raise

    def write(self, row: dict[str, Any]) -> None:
        if not self.main:
            return
        with open(self.path, "a") as f:  # appended as it comes: a killed run keeps its rows
            f.write(json.dumps(row) + "\n")
        scalars = {k: float(v) for k, v in row.items()
                   if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        for t in self.trackers:
            t.log(scalars, int(row["step"]))

    def close(self) -> None:
        while self.trackers:
            self.trackers.pop().close()
