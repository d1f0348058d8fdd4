"""The presets for real data (configs/presets/): each loads for the stage its run line names,
counts in epochs, and on data of its format trains without a warning (no cut, <= 3 epochs)."""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path

import pytest

from alignkit.cli import STAGES, main
from alignkit.config import load_config
from alignkit.models.bpe import train_bpe_tokenizer
from alignkit.models.load import save_model, tiny_llama

PRESETS = sorted((Path(__file__).resolve().parents[1] / "configs" / "presets").glob("*.yaml"))


def test_there_are_presets_for_real_data():
    assert {p.stem for p in PRESETS} >= {"alpaca-sft", "dpo-en-demo", "hh-rlhf-reward"}


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_preset_loads_for_its_stage_and_counts_epochs(path):
    text = path.read_text()
    stage = re.search(r"alignkit (\w+) --config configs/presets/" + re.escape(path.name), text)
    assert stage and stage.group(1) in STAGES, "the header's run line names the stage"
    cfg = load_config(importlib.import_module(STAGES[stage.group(1)][0]).Config, path)
    assert cfg.train.max_steps == 0 and 1 <= cfg.train.epochs <= 3
    assert "data inspect" in text, "the header says how the lengths were measured"


@pytest.mark.usefixtures("one_thread")
def test_alpaca_preset_trains_on_alpaca_data_without_warnings(tmp_path, capsys):
    """Ten Alpaca records (one batch of the preset's 16): 3 epochs are 3 steps; the preset's
    limits cut nothing, so the console has the header and no warning."""
    rows = [{"instruction": f"Name a colour number {i}.", "input": "" if i % 2 else "Be brief.",
             "output": f"Colour {i} is blue, like the sky."} for i in range(10)]
    data = tmp_path / "alpaca.json"
    data.write_text(json.dumps(rows))
    tok = train_bpe_tokenizer([r["instruction"] + r["output"] for r in rows], vocab_size=300)
    model = save_model(tiny_llama("nano", tokenizer=tok, seed=0), tok, tmp_path / "base")
    preset = next(p for p in PRESETS if p.stem == "alpaca-sft")
    assert main(["sft", "--config", str(preset), f"model.path={model}", f"data.path={data}",
                 "--out", str(tmp_path / "out"), "train.tensorboard=false", "train.grad_accum=1"]) == 0
    err = capsys.readouterr().err
    assert "alignkit sft: 10 examples, 3 steps (3.0 epochs), batch 16" in err
    assert "warning" not in err
    assert "step 3/3 (100%)" in err  # the progress line of a non-terminal stderr
