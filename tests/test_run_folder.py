"""A run folder can be shared and re-run: files readable under umask 022, the resolved config and
the command recorded, a model card; `--help` lists every key of every stage; Hugging Face names
get a precise suggestion."""

import json
import os
import stat
from pathlib import Path

import pytest
import yaml

from alignkit.cli import STAGES, SUBCOMMANDS, main, stage_help
from alignkit.config import ConfigError, describe, load_config
from alignkit.models.bpe import train_bpe_tokenizer
from alignkit.models.load import save_model, tiny_llama
from alignkit.train import checkpoint as ckpt
from alignkit.world import write_world


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("world")
    write_world(d, n_pairs=16, n_sft=32, n_pretrain=16, n_eval=8, n_pairs_eval=4)
    return d


@pytest.fixture(scope="module")
def base_dir(world, tmp_path_factory):
    rows = [json.loads(x) for x in (world / "sft.jsonl").read_text().splitlines()]
    tok = train_bpe_tokenizer([r["prompt"] + r["response"] for r in rows], vocab_size=300)
    return save_model(tiny_llama("nano", tokenizer=tok, seed=0), tok, tmp_path_factory.mktemp("base") / "m")


def _modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) for p in [root, *root.rglob("*")]}


def test_saved_models_and_checkpoint_dirs_follow_the_umask(tmp_path):
    """mkdtemp makes 0700 directories and safetensors writes 0600 files; under umask 022 another
    user must be able to read (and enter) everything a run saves."""
    old = os.umask(0o022)
    try:
        model = tiny_llama("nano", vocab_size=64)
        save_model(model, None, tmp_path / "final")
        with ckpt.atomic_dir(tmp_path / "ckpt") as tmp:
            ckpt.save_weights(model, tmp / "model.safetensors")
    finally:
        os.umask(old)
    for root in (tmp_path / "final", tmp_path / "ckpt"):
        modes = _modes(root)
        assert "model.safetensors" in modes
        for name, mode in modes.items():
            want = 0o755 if (root / name).is_dir() else 0o644
            assert mode == want, (root, name, oct(mode))


def test_help_lists_every_key_of_every_stage():
    """`alignkit STAGE [WORD] --help` names every config key, with its description, and marks the
    keys the stage cannot run without."""
    for name in STAGES:
        for word in [None, *SUBCOMMANDS.get(name, {})]:
            text = stage_help(name, word)
            import importlib

            module = importlib.import_module(STAGES[name][0])
            cls = getattr(module, SUBCOMMANDS[name][word][0]) if word else module.Config
            for row in describe(cls):
                assert f" {row['key']} " in text, (name, word, row["key"])
                if row["doc"]:
                    assert row["doc"][:40] in text
    sft = stage_help("sft", None)
    assert " * model.path " in sft and " * data.path " in sft and "   train.lr " in sft
    assert "example: alignkit sft --config configs/sft.yaml model.path=... data.path=..." in sft


def test_cli_help_flag_prints_keys(capsys):
    assert main(["cai", "label", "--help"]) == 0
    out = capsys.readouterr().out
    assert "alignkit cai label" in out and " * policy " in out and " * feedback " in out


@pytest.mark.parametrize("key, suggestion", [
    ("train.learning_rate", "'train.lr'"),
    ("num_train_epochs", "'train.epochs'"),
    ("train.per_device_train_batch_size", "GLOBAL batch"),
    ("gradient_accumulation_steps", "'train.grad_accum'"),
    ("train.lrr", "did you mean 'train.lr'"),
])
def test_hugging_face_names_get_a_precise_suggestion(key, suggestion):
    from alignkit.train.sft import Config

    with pytest.raises(ConfigError) as e:
        load_config(Config, None, [f"{key}=1"])
    assert suggestion in str(e.value) and "overwrite" not in str(e.value)


def _first_loss(out: Path) -> float:
    return json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["loss"]


@pytest.mark.usefixtures("one_thread")
def test_run_folder_records_config_and_reruns_to_the_same_first_loss(world, base_dir, tmp_path, capsys):
    out = tmp_path / "sft"
    args = ["sft", f"model.path={base_dir}", f"data.path={world / 'sft.jsonl'}", "--out", str(out),
            "train.max_steps=2", "train.batch_size=8", "train.progress=false", "train.tensorboard=false",
            "train.log_every=1", "train.lr=0.01"]
    assert main(args) == 0
    capsys.readouterr()
    first = _first_loss(out)
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["out"] == str(out) and saved["train"]["lr"] == 0.01 and saved["train"]["max_steps"] == 2
    run = json.loads((out / "run.json").read_text())
    assert run["command"].startswith("alignkit sft model.path=") and "--out" in run["command"]
    assert {"torch", "transformers", "alignkit"} <= set(run["versions"])
    assert run["rerun"] == f"alignkit sft --config {out / 'config.yaml'}"
    card = (out / "final" / "README.md").read_text()
    assert "alignkit sft" in card and str(base_dir) in card
    # re-run from the folder: same data, model and seed, so the same first-step loss
    assert main(["sft", "--config", str(out / "config.yaml"), "train.overwrite=true"]) == 0
    assert _first_loss(out) == first


@pytest.mark.usefixtures("one_thread")
def test_silent_cuts_and_synthetic_pairs_are_warned(world, base_dir, tmp_path, capsys):
    """A prompt limit that cuts most prompts, and the reward model's synthetic mismatched pairs,
    are said on the console before training (not only in the closing JSON)."""
    common = ["train.max_steps=1", "train.progress=false", "train.tensorboard=false", f"model.path={base_dir}"]
    assert main(["sft", f"data.path={world / 'sft.jsonl'}", "--out", str(tmp_path / "s"),
                 "data.max_prompt_len=4", *common]) == 0
    err = capsys.readouterr().err
    assert "alignkit: warning:" in err and "data.max_prompt_len=4 cuts 32 of 32 prompts (100%)" in err
    assert main(["reward", f"data.path={world / 'preferences.jsonl'}", "--out", str(tmp_path / "r"),
                 "mismatched_pairs=0.5", "train.batch_size=8", *common]) == 0
    err = capsys.readouterr().err
    assert "mismatched_pairs=0.5 adds 8 synthetic pairs" in err and "data.max_prompt_len" not in err
