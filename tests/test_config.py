"""Typed configs: YAML + dotted overrides; bad keys and values name the key."""

from dataclasses import dataclass, field

import pytest

from alignkit.config import ConfigError, ModelConfig, TrainConfig, load_config, to_dict


@dataclass(frozen=True)
class Stage:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(batch_size=32, warmup_steps=10))
    out: str = "runs/x"


def test_yaml_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("out: a\ntrain:\n  lr: 1.0e-3\n  betas: [0.9, 0.95]\n")
    cfg = load_config(Stage, f, ["train.lr=3e-4", "model.lora_r=8", "train.precision=fp32"])
    assert cfg.out == "a"
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.train.betas == (0.9, 0.95)
    assert cfg.model.lora_r == 8
    assert cfg.train.precision == "fp32"
    assert to_dict(cfg)["train"]["betas"] == [0.9, 0.95]


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.lrr=1", "unknown config key 'train.lrr' (did you mean 'train.lr'?)"),
        ("trian.lr=1", "did you mean 'train'?"),
        ("train.lr=fast", "config key 'train.lr': expected a number, got 'fast'"),
        ("train.batch_size=2.5", "config key 'train.batch_size': expected an integer"),
        ("train.precision=fp16", "expected one of ['auto', 'fp32', 'bf16']"),
        ("train.resume=maybe", "config key 'train.resume': expected true or false"),
        ("train", "must look like key=value"),
    ],
)
def test_bad_overrides_name_the_key(override, expected):
    with pytest.raises(ConfigError) as e:
        load_config(Stage, None, [override])
    assert expected in str(e.value)


def test_bad_yaml_names_file_and_key(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("train:\n  warmup: 10\n")
    with pytest.raises(ConfigError) as e:
        load_config(Stage, f)
    assert str(f) in str(e.value) and "train.warmup" in str(e.value) and "train.warmup_steps" in str(e.value)
    with pytest.raises(ConfigError, match="not found"):
        load_config(Stage, tmp_path / "missing.yaml")


def test_config_is_frozen():
    cfg = load_config(Stage)
    with pytest.raises(AttributeError):
        cfg.out = "y"  # type: ignore[misc]


def test_partial_section_keeps_the_stage_defaults(tmp_path):
    """Overriding train.lr must not reset the stage's own batch_size / warmup_steps to TrainConfig's."""
    cfg = load_config(Stage, None, ["train.lr=2e-3"])
    assert (cfg.train.lr, cfg.train.batch_size, cfg.train.warmup_steps) == (2e-3, 32, 10)
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  epochs: 3\n")
    cfg = load_config(Stage, f)
    assert (cfg.train.epochs, cfg.train.batch_size) == (3, 32)
