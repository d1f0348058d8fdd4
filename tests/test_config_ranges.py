"""Every numeric config key of every stage has a declared range, and a value outside it is a
one-line error at load time that names the key and the allowed range."""

import dataclasses
import importlib
import typing

import pytest

from alignkit.cli import STAGES, SUBCOMMANDS, main
from alignkit.config import RANGES, UNBOUNDED, ConfigError, load_config
from alignkit.eval.monitor import MonitorConfig


def _numeric_fields(cls, prefix=""):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from _numeric_fields(tp, prefix + f.name + ".")
            continue
        if typing.get_origin(tp) is typing.Literal:
            continue
        args = set(typing.get_args(tp)) or {tp}
        if args & {int, float}:
            yield prefix + f.name, f.name


def _all_configs():
    for name, (mod, _) in STAGES.items():
        m = importlib.import_module(mod)
        yield name, m.Config
        for word, (cls, _) in SUBCOMMANDS.get(name, {}).items():
            yield f"{name} {word}", getattr(m, cls)
    yield "monitor", MonitorConfig


def test_every_numeric_key_has_a_range():
    missing = [(stage, key) for stage, cls in _all_configs() for key, name in _numeric_fields(cls)
               if key not in RANGES and name not in RANGES and name not in UNBOUNDED]
    assert missing == []


@pytest.mark.parametrize("override, expected", [
    ("train.lr=-1", "'train.lr': expected > 0, got -1.0"),
    ("train.lr=.nan", "'train.lr': expected a finite number"),
    ("train.batch_size=0", "'train.batch_size': expected >= 1, got 0"),
    ("train.grad_accum=0", "'train.grad_accum': expected >= 1"),
    ("train.epochs=0", "'train.epochs': expected >= 1"),
    ("train.max_steps=-2", "'train.max_steps': expected >= -1"),
    ("data.limit=-1", "'data.limit': expected >= 0"),
    ("data.max_len=0", "'data.max_len': expected >= 1"),
    ("data.max_len=16", "'data.max_len' (16) must be >= data.max_prompt_len (256)"),
    ("beta=0", "'beta': expected > 0, got 0.0"),
    ("train.betas=[0.9,1.5]", "'train.betas': expected in [0, 1)"),
    ("model.lora_dropout=1", "'model.lora_dropout': expected in [0, 1)"),
])
def test_bad_values_are_one_line_errors_naming_the_key(override, expected, capsys):
    assert main(["dpo", "--print-config", override]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert expected in err, err


def test_ranges_apply_in_every_stage_and_in_yaml(tmp_path):
    from alignkit.train import grpo, ppo

    with pytest.raises(ConfigError, match="'rollout.temperature': expected >= 0"):
        load_config(ppo.Config, None, ["rollout.temperature=-1"])
    with pytest.raises(ConfigError, match="'group_size': expected >= 1"):
        load_config(grpo.Config, None, ["group_size=0"])
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  lr: 0\n")
    with pytest.raises(ConfigError, match=f"{f}: config key 'train.lr'"):
        load_config(ppo.Config, f)
    assert load_config(ppo.Config, None, ["train.max_steps=-1", "train.lr=1e-5"]).train.lr == 1e-5
