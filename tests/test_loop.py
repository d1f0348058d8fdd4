"""Tests of the one training loop: exact normalisation, resume, DDP, guard, checkpoints, schedule, metrics.

The toy run lives in tests/_ddp_worker.py (a per-token next-token model over sequences of
different lengths), so one micro-batch's loss sum covers a different number of tokens than the
next: exactly the case where a mean-of-means would be wrong.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _ddp_worker as w  # noqa: E402

from alignkit.config import TrainConfig  # noqa: E402
from alignkit.train import checkpoint as ckpt  # noqa: E402
from alignkit.train.loop import (  # noqa: E402
    StepOutput,
    TrainingDiverged,
    build_optimizer,
    build_scheduler,
    split_batch,
    to_device,
    train,
)

WORKER = Path(__file__).resolve().parent / "_ddp_worker.py"
REPO = WORKER.parents[1]


def config(**kw) -> TrainConfig:
    base = dict(
        lr=1e-2,
        weight_decay=0.1,
        warmup_steps=2,
        batch_size=8,
        epochs=2,
        max_grad_norm=0.5,
        log_every=1,
        progress=False,
        tensorboard=False,
        precision="fp32",
    )
    base.update(kw)
    return TrainConfig(**base)


def run_toy(out: Path, cfg: TrainConfig, n: int = 20, dropout: float = 0.0, step=w.step, **kw):
    data = w.make_data(n)
    model = w.make_model(dropout)
    result = train(model, step, data, w.collate, w.make_plan(n, cfg.batch_size), cfg, out, **kw)
    return model, result


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def assert_same(a: dict, b: dict, atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k].cpu(), b[k].cpu(), atol=atol, rtol=0, msg=k)


def run_worker(*args: str, torchrun: bool = False) -> subprocess.CompletedProcess:
    launcher = [sys.executable]
    if torchrun:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    if torchrun:
        env["CUDA_VISIBLE_DEVICES"] = ""  # two CPU ranks over gloo, even on a one-GPU machine
    return subprocess.run(
        launcher + [str(WORKER), *args], capture_output=True, text=True, env=env, timeout=180
    )


def test_split_batch_is_contiguous_and_balanced():
    assert split_batch([0, 1, 2, 3, 4], 3) == [[0, 1], [2, 3], [4]]
    assert split_batch([7, 8], 4) == [[7], [8], [], []]


def test_accumulation_equals_one_batch_and_a_naive_reference(tmp_path):
    """batch 8 x accum 1 == batch 1 x accum 8 == batch 3+3+2 x accum 3 == a plain loop written here.

    The reference takes each global batch in one forward, divides its loss sum by its token count,
    clips to 0.5, and steps AdamW (decay on matrices only) with the LR set by hand:
    warm-up (s + 1) / 2 for s < 2, then 0.5 * (1 + cos(pi * (s - 2) / (6 - 2))).
    """
    n = 20
    data, plan = w.make_data(n), w.make_plan(n, 8)
    counts = [int((w.collate([data[i]]).labels != -100).sum()) for i in plan(0)[0]]
    assert len(set(counts)) > 1, "micro-batches must cover different token counts"

    ref = w.make_model()
    opt = torch.optim.AdamW(
        [
            {"params": [p for p in ref.parameters() if p.ndim >= 2], "weight_decay": 0.1},
            {"params": [p for p in ref.parameters() if p.ndim < 2], "weight_decay": 0.0},
        ],
        lr=1e-2,
    )
    batches = plan(0) + plan(1)
    for s, batch in enumerate(batches):
        factor = (s + 1) / 2 if s < 2 else 0.5 * (1 + math.cos(math.pi * (s - 2) / (len(batches) - 2)))
        for g in opt.param_groups:
            g["lr"] = 1e-2 * factor
        out = w.step(ref, w.collate([data[i] for i in batch]))
        (out.loss / out.weight).backward()
        nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
        opt.step()
        opt.zero_grad()
    expected = {k: v.detach() for k, v in ref.state_dict().items()}

    for accum in (1, 8, 3):
        model, result = run_toy(tmp_path / f"accum{accum}", config(grad_accum=accum))
        assert result.step == 6
        assert_same({k: v.detach() for k, v in model.state_dict().items()}, expected)
        assert_same(weights(result.final_dir), expected)


def test_sigkill_and_resume_equals_uninterrupted(tmp_path):
    """Dropout on; checkpoint every 3 steps; SIGKILL after step 5 (steps 4-5 are lost); resume."""
    args = ["--dropout", "0.1", "--epochs", "3", "--save-every", "3"]
    killed = run_worker("--out", str(tmp_path / "run"), "--kill-at", "5", *args)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert [p.name for _, p in ckpt.step_dirs(tmp_path / "run" / "checkpoints")] == ["step-3"]
    assert not (tmp_path / "run" / "final").exists()

    resumed = run_worker("--out", str(tmp_path / "run"), "--resume", *args)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stderr and "step 3" in resumed.stderr

    w.main(["--out", str(tmp_path / "ref"), *args])
    assert_same(weights(tmp_path / "run" / "final"), weights(tmp_path / "ref" / "final"))

    def losses(run: str) -> list[tuple[int, float]]:
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [(m["step"], m["loss"]) for m in map(json.loads, lines)]

    assert losses("run") == losses("ref")  # no duplicate lines from the killed run's steps 4-5
    assert [p.name for _, p in ckpt.step_dirs(tmp_path / "run" / "checkpoints")] == ["step-6", "step-9"]


def test_two_ddp_ranks_equal_one_process(tmp_path):
    """torchrun, 2 CPU ranks (gloo), accum 2: 18 items in batches 8, 8, 2. The last batch splits into
    4 chunks [1], [1], [], [], so rank 1 has no item left and must still join the gradient all-reduce."""
    ddp = run_worker("--out", str(tmp_path / "ddp"), "--items", "18", "--accum", "2", torchrun=True)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    w.main(["--out", str(tmp_path / "one"), "--items", "18"])
    assert_same(weights(tmp_path / "ddp" / "final"), weights(tmp_path / "one" / "final"))
    a = [json.loads(x) for x in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in a] == [x["step"] for x in b]
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-6)
        assert x["accuracy"] == pytest.approx(y["accuracy"], abs=1e-6)


def _digest(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}


@pytest.mark.parametrize("what", ["loss", "grad_norm"])
def test_nan_guard_stops_and_keeps_last_checkpoint(tmp_path, what):
    calls = {"n": 0}

    def bad_step(model, batch):
        out = w.step(model, batch)
        calls["n"] += 1
        if calls["n"] == 5:  # accum 1: the 5th call is optimizer step 5
            if what == "loss":
                return StepOutput(out.loss * float("nan"), out.weight, out.metrics)
            b = model.out.bias
            # sqrt'(0) = inf: the loss value stays finite, its gradient does not
            return StepOutput(out.loss + torch.sqrt((b - b.detach()).sum()), out.weight, out.metrics)
        return out

    seen = {}

    def on_log(step, metrics):
        if step == 4:
            seen["digest"] = _digest(tmp_path / "checkpoints" / "step-4")

    with pytest.raises(TrainingDiverged) as err:
        run_toy(tmp_path, config(save_every=2, keep_checkpoints=3), step=bad_step, on_log=on_log)
    msg = str(err.value)
    assert msg.startswith(f"step 5: {what} is ")
    assert str(tmp_path / "checkpoints" / "step-4") in msg
    assert [p.name for _, p in ckpt.step_dirs(tmp_path / "checkpoints")] == ["step-2", "step-4"]
    assert _digest(tmp_path / "checkpoints" / "step-4") == seen["digest"]
    assert [m["step"] for m in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())] == [
        1,
        2,
        3,
        4,
    ]


def test_crashed_saves_are_ignored_on_resume(tmp_path, monkeypatch):
    """A save that dies half-way leaves the previous checkpoint intact; leftovers are ignored on resume."""
    real_save, count = torch.save, {"n": 0}

    def dying_save(obj, f, *a, **kw):
        count["n"] += 1
        if count["n"] == 5:  # 3 torch.save calls per checkpoint: scheduler.pt of the 2nd one
            raise OSError("disk full")
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(ckpt.torch, "save", dying_save)
    with pytest.raises(OSError, match="disk full"):
        run_toy(tmp_path / "run", config(save_every=2, max_steps=6))
    monkeypatch.setattr(ckpt.torch, "save", real_save)
    root = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-2"]

    # what a SIGKILL mid-save leaves, and a directory copied in by hand without its last file
    (root / ".tmp-step-4-12345").mkdir()
    (root / ".tmp-step-4-12345" / "model.safetensors").write_bytes(b"\0garbage")
    (root / "step-8").mkdir()
    (root / "step-8" / "model.safetensors").write_bytes(b"\0garbage")
    assert ckpt.latest(root) == root / "step-2"

    _, resumed = run_toy(tmp_path / "run", config(save_every=2, max_steps=6, resume=True))
    _, ref = run_toy(tmp_path / "ref", config(save_every=2, max_steps=6))
    assert resumed.step == 6
    assert_same(weights(resumed.final_dir), weights(ref.final_dir))
    assert not (root / ".tmp-step-4-12345").exists()


def test_resume_without_a_checkpoint_starts_fresh_without_old_rows(tmp_path):
    """A run killed before its first checkpoint left metric rows; resume=true has nothing to load,
    so it starts over and the dead run's rows do not stay in front of the new ones."""
    run_toy(tmp_path / "ref", config(max_steps=3))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 1, "loss": 123.0}\n{"step": 2, "loss": 99.0}\n')
    run_toy(tmp_path / "run", config(max_steps=3, resume=True))
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(x) for x in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [r["step"] for r in ref] and rows[0]["loss"] == ref[0]["loss"]


def test_schedule_warmup_then_cosine_by_hand():
    """warm-up 2, 6 steps, lr 1: steps 0, 1 -> 1/2, 2/2; then p = (s - 2) / 4 for s = 2..5 and
    cosine 0.5 * (1 + cos(pi * p)) = 1, (1 + sqrt(1/2)) / 2, 1/2, (1 - sqrt(1/2)) / 2; linear 1 - p."""
    r = math.sqrt(0.5)
    expected = {
        "cosine": [0.5, 1.0, 1.0, (1 + r) / 2, 0.5, (1 - r) / 2],
        "linear": [0.5, 1.0, 1.0, 0.75, 0.5, 0.25],
        "constant": [0.5, 1.0, 1.0, 1.0, 1.0, 1.0],
    }
    for kind, values in expected.items():
        p = nn.Parameter(torch.zeros(2, 2))
        opt = build_optimizer([p], config(lr=1.0, schedule=kind))
        sched = build_scheduler(opt, config(lr=1.0, schedule=kind), total_steps=6)
        lrs = []
        for _ in range(6):
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        assert lrs == pytest.approx(values, abs=1e-12), kind


def test_weight_decay_skips_biases_and_norms():
    model = w.make_model()
    opt = build_optimizer(model.parameters(), config(weight_decay=0.3))
    by_decay = {g["weight_decay"]: {id(p) for p in g["params"]} for g in opt.param_groups}
    assert by_decay[0.3] == {id(model.emb.weight), id(model.hidden.weight), id(model.out.weight)}
    assert id(model.norm.weight) in by_decay[0.0] and id(model.out.bias) in by_decay[0.0]


def test_metrics_jsonl_tensorboard_and_result(tmp_path):
    cfg = config(max_steps=5, log_every=2, tensorboard=True)
    data = w.make_data(20)
    first = w.collate([data[i] for i in w.make_plan(20, 8)(0)[0]])
    with torch.no_grad():
        out = w.step(w.make_model(), first)
    _, result = run_toy(tmp_path, cfg)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [2, 4, 5]  # every 2 steps and the last
    keys = {"step", "epoch", "loss", "lr", "grad_norm", "items_per_s", "tokens_per_s", "accuracy"}
    assert all(set(m) == keys for m in lines)
    assert lines[-1]["epoch"] == pytest.approx(1 + 2 / 3)
    assert result.metrics == lines[-1] and result.step == 5
    assert result.checkpoint == tmp_path / "checkpoints" / "step-5"
    assert result.peak_memory_mb > 0 and result.wall_time_s > 0
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))

    with pytest.raises(FileExistsError, match="train.overwrite=true"):  # an earlier run is never clobbered
        run_toy(tmp_path, config(max_steps=1, tensorboard=False))
    (tmp_path / "metrics.jsonl").unlink()
    _, result = run_toy(tmp_path, config(max_steps=1, tensorboard=False, overwrite=True))
    loss = json.loads((tmp_path / "metrics.jsonl").read_text())["loss"]
    assert loss == pytest.approx(out.loss.item() / out.weight.item(), rel=1e-6)


def test_to_device_moves_every_tensor_field():
    batch = w.collate([[1, 2, 3], [4, 5]])
    moved = to_device({"b": batch, "xs": [torch.ones(1)], "n": 3}, "meta")
    assert moved["b"].input_ids.device.type == "meta" and moved["b"].attention_mask.device.type == "meta"
    assert moved["xs"][0].device.type == "meta" and moved["n"] == 3


def test_tiny_llama_tied_weights_resume_and_hf_export(tmp_path):
    """A tiny LlamaForCausalLM (tied embeddings, dropout): interrupted at step 3 after checkpoint 2,
    resumed, equals an uninterrupted run; save_fn exports a directory that from_pretrained reads."""
    from transformers import LlamaConfig, LlamaForCausalLM

    def make():
        torch.manual_seed(0)
        c = LlamaConfig(
            vocab_size=16,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=32,
            tie_word_embeddings=True,
            attention_dropout=0.1,
        )
        return LlamaForCausalLM(c)

    data = [x[:8] for x in w.make_data(12)]

    def collate(items):
        b = w.collate(items)
        return {"input_ids": b.input_ids, "attention_mask": b.attention_mask, "labels": b.labels}

    def step(model, batch):
        logits = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).logits  # (B, T, V)
        losses = nn.functional.cross_entropy(
            logits.transpose(1, 2), batch["labels"], reduction="none"
        )  # (B, T)
        return StepOutput(losses.sum(), (batch["labels"] != -100).sum(), {})

    class Stop(Exception):
        pass

    def stop_at_3(step_n, metrics):
        if step_n == 3:
            raise Stop

    def save_fn(model, path):
        model.save_pretrained(path)

    cfg = config(batch_size=4, grad_accum=2, epochs=2, save_every=2)
    plan = w.make_plan(len(data), 4)
    with pytest.raises(Stop):
        train(make(), step, data, collate, plan, cfg, tmp_path / "run", on_log=stop_at_3)
    resumed = make()
    result = train(
        resumed,
        step,
        data,
        collate,
        plan,
        dataclasses.replace(cfg, resume=True),
        tmp_path / "run",
        save_fn=save_fn,
    )
    ref = make()
    train(ref, step, data, collate, plan, cfg, tmp_path / "ref")
    assert result.step == 6
    assert_same(resumed.state_dict(), ref.state_dict())
    exported = LlamaForCausalLM.from_pretrained(result.final_dir)
    assert_same(exported.state_dict(), ref.state_dict())
    stored = weights(result.checkpoint)
    assert "lm_head.weight" not in stored or "model.embed_tokens.weight" not in stored  # tied: stored once


def test_a_second_stage_in_the_process_may_change_precision():
    """accelerate allows one AcceleratorState per process; a bf16 stage followed by an fp32 one (the
    demo, `alignkit compare`, a test session on a GPU) must not fail on the second."""
    from alignkit.train.loop import _make_accelerator

    assert _make_accelerator(TrainConfig(precision="bf16")).mixed_precision == "bf16"
    assert _make_accelerator(TrainConfig(precision="fp32")).mixed_precision == "no"
