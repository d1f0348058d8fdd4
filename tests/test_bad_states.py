"""Bad states end in one line naming the file: a torn last metrics line resumes, a corrupt
model file, a checkpoint that cannot be written (disk full) keeps the earlier ones, a diverged
run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from alignkit.atomic import FileProblem, read_jsonl
from alignkit.cli import main

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _ddp_worker as w  # noqa: E402


def test_a_torn_last_line_is_skipped_and_a_torn_middle_line_is_an_error(tmp_path):
    f = tmp_path / "metrics.jsonl"
    f.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    assert [r["step"] for r in read_jsonl(f)] == [1, 2]
    f.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo\n{"step": 3, "loss": 1.0}\n')
    with pytest.raises(ValueError, match=f"{f}:2: not valid JSON"):
        read_jsonl(f)


def test_resume_after_a_torn_metrics_line_equals_the_uninterrupted_run(tmp_path):
    """A run killed after step 5 (checkpoint every 2 steps: step 4) whose metrics file then lost
    the end of its last line, as a full disk would cut it, resumes and ends like a clean run."""
    full, cut = tmp_path / "full", tmp_path / "cut"
    w.main(["--out", str(full), "--max-steps", "8", "--save-every", "2", "--epochs", "3"])
    done = subprocess.run([sys.executable, str(Path(w.__file__)), "--out", str(cut), "--max-steps", "8",
                           "--save-every", "2", "--epochs", "3", "--kill-at", "5"], capture_output=True)
    assert done.returncode != 0
    m = cut / "metrics.jsonl"
    m.write_text(m.read_text()[:-7])  # tear the last line
    w.main(["--out", str(cut), "--max-steps", "8", "--save-every", "2", "--epochs", "3", "--resume"])
    a = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in m.read_text().splitlines()]
    assert [r["step"] for r in b] == list(range(1, 9))
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], abs=1e-6)


def test_a_corrupt_model_file_is_one_line(tmp_path, capsys):
    from alignkit.models.load import load_model, save_model, tiny_llama

    d = save_model(tiny_llama("nano", vocab_size=64), None, tmp_path / "m")
    weights = d / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(FileProblem) as e:
        load_model(d)
    assert str(d) in str(e.value) and "cannot load the model" in str(e.value)
    assert len(str(e.value).splitlines()) == 1


def test_a_corrupt_checkpoint_names_the_file(tmp_path):
    from alignkit.train import checkpoint as ckpt

    out = tmp_path / "run"
    w.main(["--out", str(out), "--max-steps", "2", "--save-every", "2"])
    step = out / "checkpoints" / "step-2"
    (step / "model.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(FileProblem, match="step-2/model.safetensors: cannot read the checkpoint"):
        ckpt.read_checkpoint(step, w.make_model())


def test_disk_full_during_a_checkpoint_keeps_the_earlier_one(tmp_path):
    """A 1 MiB tmpfs (root only): the first checkpoints fit, a later one does not."""
    from alignkit.train import checkpoint as ckpt

    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root")
    try:
        model = w.make_model()
        ckpt.write_checkpoint(mnt / "step-1", model=model, optimizer=_Fake(), scheduler=_Fake(), rng_states=[],
                              trainer_state={"step": 1})
        big = _Fake(size=200_000)
        with pytest.raises(FileProblem, match=r"step-2: cannot write the checkpoint \(earlier checkpoints are kept; \d+ bytes free"):
            ckpt.write_checkpoint(mnt / "step-2", model=model, optimizer=big, scheduler=_Fake(), rng_states=[],
                                  trainer_state={"step": 2})
        assert ckpt.complete(mnt / "step-1") and not (mnt / "step-2").exists()
        assert not [p for p in os.listdir(mnt) if p.startswith(".tmp-")]
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


class _Fake:
    def __init__(self, size: int = 1):
        self.size = size

    def state_dict(self):
        import torch

        return {"x": torch.zeros(self.size)}


def test_a_diverged_run_is_one_line(tmp_path, capsys, monkeypatch):
    from alignkit.train import loop

    def boom(*a, **k):
        raise loop.TrainingDiverged("step 3: loss is nan; the last good checkpoint is X")

    monkeypatch.setattr("alignkit.train.sft.train", boom)
    from alignkit.models.load import save_model, tiny_llama

    d = save_model(tiny_llama("nano", vocab_size=64), None, tmp_path / "m")
    (tmp_path / "x.jsonl").write_text('{"prompt": "a", "response": "b"}\n')
    from alignkit.models.bpe import train_bpe_tokenizer

    train_bpe_tokenizer(["a b c"], vocab_size=300).save_pretrained(d)
    capsys.readouterr()
    code = main(["sft", f"model.path={d}", f"data.path={tmp_path / 'x.jsonl'}", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == "alignkit: error: step 3: loss is nan; the last good checkpoint is X"


def test_pairs_without_signal_stop_before_training():
    """chosen == rejected teaches a DPO or Bradley-Terry loss nothing (zero gradient): more than
    data.max_no_signal of such pairs is an error naming the file, fewer a warning."""
    from alignkit.data.lint import check_signal
    from alignkit.data.load import DataError
    from alignkit.data.records import PreferencePair

    same = [PreferencePair(f"q{i}", f"The answer is {i}.", f"The answer is {i}.") for i in range(4)]
    good = [PreferencePair(f"q{i}", f"The answer is {i}.", "idk, google it") for i in range(4, 8)]
    with pytest.raises(DataError, match="data.jsonl: 4 of 4 pairs .* carry no preference signal"):
        check_signal(same, "data.jsonl", 0.5)
    assert "1 of 4 pairs (25%) carry no preference signal" in check_signal(same[:1] + good[:3], "data.jsonl", 0.5)
    assert check_signal(good, "data.jsonl", 0.5) is None
    assert check_signal(same, "data.jsonl", 1.0) is not None  # 1: never stop, still warn


@pytest.mark.parametrize("stage,extra,expected", [
    ("ppo", ["train.strategy=deepspeed", "value_model=shared"], "'train.strategy' is 'deepspeed' with value_model=shared"),
    ("grpo", ["train.strategy=deepspeed", "model.lora_r=8"], "'train.strategy' is 'deepspeed' with a LoRA policy"),
    ("rloo", ["train.strategy=fsdp2", "model.lora_r=8"], "'train.strategy' is 'fsdp2' with a LoRA policy"),
])
def test_rl_stages_refuse_a_strategy_they_cannot_run(tmp_path, capsys, stage, extra, expected):
    """A strategy an RL stage would not honour is a config error that names the key, before any
    model is loaded (the paths need not exist)."""
    assert main([stage, "model.path=nowhere", "data.path=nowhere.jsonl", *extra, "--out", str(tmp_path / "o")]) == 2
    assert expected in capsys.readouterr().err
