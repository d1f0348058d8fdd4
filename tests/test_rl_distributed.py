"""PPO, GRPO and RLOO on 2 torchrun ranks (gloo) equal one process with the same global batch.

One worker launch per side (tests/_rl_dist_worker.py runs all three stages): 2 iterations each;
on 2 ranks PPO runs 1 iteration and resumes to 2 from rank 0's checkpoint. Then the same on 2
ranks with a sharded policy (`alignkit.train.rl_shard`): PPO (with its separate value model) and
RLOO under FSDP2, GRPO under DeepSpeed ZeRO-3 (FSDP2 where DeepSpeed is not installed), and PPO
again under ZeRO-3 (its policy and critic an engine each); the PPO runs and GRPO resume from
sharded checkpoints. Metrics rows and the final weights must agree within 1e-5
(fp32). Also: the pieces that make it possible, by hand.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from alignkit.models.generate import HFGenerator, SamplingParams
from alignkit.models.load import tiny_llama
from alignkit.train.distributed import SINGLE, Dist, my_rows, row_seeds, shard

WORKER = Path(__file__).resolve().parent / "_rl_dist_worker.py"
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
GRPO_SHARDED = "deepspeed" if HAS_DEEPSPEED else "fsdp2"
EXT = os.environ.get("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache/alignkit-ext"))  # DeepSpeed's compiled comm op
TIMING = {"rollout_s", "iteration_s"}
# a fraction of tokens at a clip boundary: on the first minibatch values == old values, and a
# 1e-7 difference decides whether a tied token counts as clipped (the loss is the same either way)
THRESHOLD_COUNTS = {"vf_clipfrac"}


def test_shard_row_seeds_and_minibatch_split_by_hand():
    """6 prompts on 2 ranks: rank 1 holds prompts 3..5, whose rows (G=2) start at global row 6;
    its seeds are the one-process seeds of rows 6..11. A minibatch of 5 rows splits 3 + 2."""
    d1 = Dist(rank=1, world=2)
    assert shard(list("abcdef"), d1) == (list("def"), 3)
    assert row_seeds(1, 2, 6, 6) == row_seeds(1, 2, 0, 12)[6:]
    assert len(set(row_seeds(1, 2, 0, 12))) == 12
    idx = torch.tensor([9, 2, 4, 0, 7])
    assert my_rows(idx, Dist(rank=0, world=2)).tolist() == [9, 2, 4]
    assert my_rows(idx, d1).tolist() == [0, 7]
    assert my_rows(torch.tensor([3]), d1).tolist() == []  # a rank may get no row of a minibatch
    assert my_rows(idx, SINGLE).tolist() == idx.tolist()
    with pytest.raises(ValueError, match="split evenly"):
        shard([1, 2, 3], d1)


def test_row_seeded_sampling_does_not_depend_on_the_batch():
    """With one seed per row, sampling 4 prompts together equals sampling them 2 + 2 (as two
    ranks do), in any batch size; a single batch seed does not promise that."""
    model = tiny_llama("nano", vocab_size=40, seed=3).eval()
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [5, 6, 7]]
    seeds = row_seeds(0, 1, 0, 4)
    params = SamplingParams(max_new_tokens=8, row_seeds=seeds)
    whole = HFGenerator(model, batch_size=4).generate(prompts, params)
    halves = [HFGenerator(model, batch_size=1).generate(prompts[i : i + 2], SamplingParams(
        max_new_tokens=8, row_seeds=seeds[i : i + 2])) for i in (0, 2)]
    assert list(whole) == list(halves[0]) + list(halves[1])
    assert whole[0] != whole[3]  # the same prompt twice (a GRPO group) gets different samples
    with pytest.raises(ValueError, match="row_seeds"):
        HFGenerator(model).generate(prompts, SamplingParams(row_seeds=seeds[:2]))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from _rl_dist_worker import write_fixture

    root = tmp_path_factory.mktemp("rl_dist")
    write_fixture(root)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(WORKER.parents[1])}
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    # sharded: PPO (FSDP2) is SIGKILLed while writing its iteration-2 checkpoint, then resumed in
    # the launch of the others; GRPO and PPO under DeepSpeed stop after iteration 1 and resume
    sharded = ["--resume", "grpo,ppo-zero", "--set", "train.strategy=fsdp2", f"grpo:train.strategy={GRPO_SHARDED}",
               "ppo:train.resume=true", "ppo:train.save_every=1"]
    if HAS_DEEPSPEED:  # PPO's policy and critic as two ZeRO-3 engines
        sharded = ["--stages", "ppo,grpo,rloo,ppo-zero", *sharded, "ppo-zero:train.strategy=deepspeed"]
    env = {**env, "DS_ACCELERATOR": "cpu", "TORCH_EXTENSIONS_DIR": EXT}
    killed = ["--tag", "sharded", "--stages", "ppo", "--kill-at-save", "2", "--set", "train.strategy=fsdp2",
              "train.save_every=1"]
    died = subprocess.run([sys.executable, *torchrun, str(WORKER), "--root", str(root), *killed], env=env,
                          capture_output=True, text=True, timeout=600)
    out = root / "sharded-ppo"
    (root / "killed.json").write_text(json.dumps({"returncode": died.returncode, "final": (out / "final").exists(),
                                                  "checkpoints": sorted(p.name for p in (out / "checkpoints").iterdir())}))
    for tag, launcher, extra in (("one", [], []), ("two", torchrun, ["--resume", "ppo"]), ("sharded", torchrun, sharded)):
        done = subprocess.run([sys.executable, *launcher, str(WORKER), "--root", str(root), "--tag", tag, *extra],
                              env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        (root / f"{tag}.log").write_text(done.stderr)
    return root


@pytest.mark.slow
@pytest.mark.parametrize("stage,tag", [(s, t) for t in ("two", "sharded") for s in ("ppo", "grpo", "rloo")] + [
    pytest.param("ppo-zero", "sharded", marks=pytest.mark.skipif(not HAS_DEEPSPEED, reason="DeepSpeed is not installed"))])
def test_two_ranks_equal_one_process(runs, stage, tag):
    base = stage.split("-")[0]  # ppo-zero: PPO under DeepSpeed, against the one-process PPO
    one = [json.loads(x) for x in (runs / f"one-{base}" / "metrics.jsonl").read_text().splitlines()]
    two = [json.loads(x) for x in (runs / f"{tag}-{stage}" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in two] == [1, 2] == [r["step"] for r in one]  # rank 0 alone wrote them
    for a, b in zip(one, two):
        assert a.keys() == b.keys()
        for k in a.keys() - TIMING - THRESHOLD_COUNTS:
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-5), (stage, a["step"], k)
    start = load_file(runs / "sft" / "model.safetensors")
    wa = load_file(runs / f"one-{base}" / "final" / "model.safetensors")
    wb = load_file(runs / f"{tag}-{stage}" / "final" / "model.safetensors")
    assert wa.keys() == wb.keys()  # a sharded run writes the whole model
    assert max((wa[k] - start[k]).abs().max().item() for k in wa) > 1e-4  # the runs did train
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=1e-5, msg=lambda m, k=k: f"{stage} {k}: {m}")
    log = (runs / f"{tag}.log").read_text()
    if base == "ppo" or (tag == "sharded" and stage == "grpo"):  # resumed on 2 ranks from the checkpoint of iteration 1
        assert f"resumed from {runs / f'{tag}-{stage}'}/checkpoints/step-1 (iteration 1)" in log
    shards = runs / f"{tag}-{stage}" / "checkpoints" / "step-2" / "shards"
    assert shards.is_dir() == (tag == "sharded")  # model and optimizer states, one file per rank
    if tag == "sharded" and stage == "grpo" and GRPO_SHARDED == "deepspeed":
        assert (shards / "zero").is_dir()  # DeepSpeed's own checkpoint layout
    if stage == "ppo-zero":  # one engine each: the policy's and the critic's
        assert (shards / "zero-0").is_dir() and (shards / "zero-1").is_dir()


@pytest.mark.slow
def test_sharded_ppo_killed_while_checkpointing_resumed_from_the_last_whole_checkpoint(runs):
    """PPO under FSDP2: rank 1 was SIGKILLed as it started writing its shard of the iteration-2
    checkpoint (rank 0 inside the same collective write; torchrun stopped it). Iteration 1's
    checkpoint was whole and the half-written one was not taken for a checkpoint; the rerun with
    train.resume=true resumed from iteration 1, cleared the leftovers and ended where one process
    ends (test_two_ranks_equal_one_process[ppo-sharded])."""
    killed = json.loads((runs / "killed.json").read_text())
    assert killed["returncode"] != 0 and not killed["final"]
    # step-2 never appeared (its half-written shards, if any, stay in .tmp-step-2-shards)
    assert [c for c in killed["checkpoints"] if not c.startswith(".tmp-")] == ["step-1"]
    out = runs / "sharded-ppo"
    assert f"resumed from {out}/checkpoints/step-1 (iteration 1)" in (runs / "sharded.log").read_text()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2"]  # keep_checkpoints 1, no leftovers
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in metrics] == [1, 2]  # iteration 2's row, logged before the kill, once
