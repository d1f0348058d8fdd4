"""`alignkit ppo --launcher ray` (alignkit/train/ray_launch.py) equals one process with the same
global batch, which tests/test_rl_distributed.py holds equal to torchrun's 2 ranks.

The Ray run: a local cluster on 127.0.0.1 (dashboard off, 2 CPUs, a 100 MiB object store), a
placement group of 4 bundles: 2 trainer actors (0.5 CPU each; they form the gloo group from the
torchrun variables the launcher sets), 0.5 CPU for the reward actor, where the reward function
scores both ranks' rows, and 0.5 CPU for the reference actor, which holds the frozen reference
and computes both ranks' reference log-probs (the ranks load none). Same tiny policy, prompts
and settings as the torchrun test (tests/_rl_dist_worker.py), 2 iterations: every metric and
every final weight within 1e-5 of the one-process run, every row of the Ray run scored in the
reward actor (the reward function logs which process called it), and every row's reference
log-probs computed in the reference actor (it counts them). Ray with the reference on the
trainer ranks (the default) runs in tests/test_iterate_distributed.py (iterate on Ray).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from alignkit.config import ConfigError, load_config
from alignkit.models.load import tiny_llama
from alignkit.train import ppo
from alignkit.train.ray_launch import RayConfig, launch, local_ranks

HAVE_RAY = importlib.util.find_spec("ray") is not None
needs_ray = pytest.mark.skipif(not HAVE_RAY, reason="Ray is not installed (pip install -e '.[ray]'): the Ray launcher is not tested")
REPO = Path(__file__).resolve().parents[1]
TIMING = {"rollout_s", "iteration_s"}
THRESHOLD_COUNTS = {"vf_clipfrac"}  # a tie at the value clip boundary (see tests/test_rl_distributed.py)


def test_local_ranks_count_trainers_per_node():
    """CPU actors on nodes a, b, a, a are local ranks 0, 0, 1, 2; a GPU actor sees only its own
    device (Ray sets CUDA_VISIBLE_DEVICES), so it is always local rank 0."""
    assert local_ranks(["a", "b", "a", "a"], num_gpus=0) == [0, 0, 1, 2]
    assert local_ranks(["a", "b", "a", "a"], num_gpus=1) == [0, 0, 0, 0]


def test_without_ray_the_launcher_is_a_one_line_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    cfg = load_config(ppo.Config, None, ["model.path=x", "data.path=y", "launcher=ray"])
    assert cfg.ray == RayConfig()
    with pytest.raises(ConfigError, match=r"launcher=ray needs Ray: pip install 'alignkit\[ray\]'"):
        launch(ppo.train, cfg)


def test_reward_actor_scores_like_the_local_source(tmp_path):
    """The reward actor's class, called in this process: a 2-model uwo ensemble built from the
    config scores, raw scores and member scores exactly as the source each rank would build."""
    from alignkit.models.heads import RewardModel, RewardStats, save_reward_model
    from alignkit.train.ray_launch import RewardScorer, driver_state
    from alignkit.train.rollout import RewardConfig, build_reward_source

    for seed, (mean, std) in ((2, (0.1, 2.0)), (3, (-0.5, 0.25))):
        rm = RewardModel.from_model(tiny_llama("nano", vocab_size=40, seed=seed), seed=seed)
        save_reward_model(rm, None, tmp_path / f"rm{seed}", RewardStats(mean=mean, std=std, n=2))
    cfg = RewardConfig(model=str(tmp_path / "rm2"), ensemble=(str(tmp_path / "rm3"),), ensemble_mode="uwo")
    ids = torch.tensor([[0, 5, 6, 7], [8, 9, 10, 11]])  # (B, L)
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    local = build_reward_source(cfg)
    want, want_raw = local(["p", "q"], ["a", "b"], ids, mask)
    got, got_raw, members = RewardScorer(cfg, None, driver_state()).score(["p", "q"], ["a", "b"], ids, mask)
    assert torch.equal(got, want) and torch.equal(got_raw, want_raw)
    assert members.shape == (2, 2) and torch.equal(members, local.last_member_scores)
    assert not torch.equal(members[0], members[1])  # two different models really were loaded


def test_reference_holder_answers_like_the_local_reference(tmp_path):
    """The reference actor's class, called in this process: per-token log-probs at temperature
    0.7, through the chunked head and the plain path, with and without the shared prompt prefix,
    and the greedy answers, exactly those of the Reference a trainer rank builds from the same
    directory; `served` counts the rows. Rows 0 and 1 share their prompt (a GRPO group)."""
    from alignkit.models.bpe import train_bpe_tokenizer
    from alignkit.models.load import load_tokenizer, save_model
    from alignkit.train.ray_launch import ReferenceHolder, driver_state
    from alignkit.train.rollout import build_reference

    tok = train_bpe_tokenizer(["Human: one two three\nAssistant: four five six"] * 10, vocab_size=280)
    save_model(tiny_llama("nano", tokenizer=tok, seed=4), tok, tmp_path / "ref")
    holder = ReferenceHolder(str(tmp_path / "ref"), str(tmp_path / "ref"), "fp32", driver_state())
    local = build_reference(None, str(tmp_path / "ref"), False, "cpu")
    ids = torch.tensor([[0, 7, 8, 9, 10, 11], [0, 7, 8, 9, 12, 0], [13, 14, 15, 16, 17, 18]])  # (B, L), P = 3
    mask = torch.tensor([[0, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])
    resp = ids[:, 3:]  # (B, T)
    for chunk, share in ((0, False), (2, False), (0, True)):
        want = local.logprobs(ids, mask, resp, 0.7, chunk, share_prompt_prefix=share)
        got = holder.logprobs(ids, mask, resp, 0.7, chunk, share)
        assert torch.equal(got, want), (chunk, share)
    assert holder.served() == 9
    prompts = [[7, 8, 9], [13, 14]]
    assert holder.greedy_responses(prompts, 5) == local.greedy_responses(load_tokenizer(str(tmp_path / "ref")), prompts, 5)


@needs_ray
def test_remote_reference_hands_the_arguments_to_the_actor(monkeypatch):
    """RemoteReference sends the tensors and settings in the actor method's order and returns
    its answer on the ids' device (the actor handle is replaced by a recorder, ray.get by identity)."""
    import ray

    from alignkit.train.ray_launch import RemoteReference

    calls = []

    class Handle:
        def __getattr__(self, name):
            return type("M", (), {"remote": staticmethod(lambda *a: calls.append((name, a)) or torch.ones(1, 2))})

    monkeypatch.setattr(ray, "get", lambda x: x)
    ids, mask, resp = torch.tensor([[1, 2, 3]]), torch.tensor([[1, 1, 1]]), torch.tensor([[2, 3]])
    assert torch.equal(RemoteReference(Handle()).logprobs(ids, mask, resp, 0.7, 4, True), torch.ones(1, 2))
    assert calls[0][0] == "logprobs" and calls[0][1][3:] == (0.7, 4, True)
    assert all(torch.equal(a, b) for a, b in zip(calls[0][1][:3], (ids, mask, resp)))
    RemoteReference(Handle()).greedy_responses(None, [(5, 6)], 3)
    assert calls[1] == ("greedy_responses", ([[5, 6]], 3))


def test_reference_actor_with_lora_is_a_config_error():
    from alignkit.train.ray_launch import check_actors

    cfg = load_config(ppo.Config, None, ["model.path=x", "data.path=y", "launcher=ray", "ray.reference_actor=true",
                                         "model.lora_r=8"])
    with pytest.raises(ConfigError, match=r"'ray.reference_actor': not with model.lora_r > 0"):
        check_actors(cfg)
    check_actors(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, lora_r=0)))  # full fine-tuning: fine


def test_iterate_on_ray_refuses_the_actors_and_a_nested_launcher():
    """iterate's reward model and KL anchor change every round, so neither goes to an actor; and
    where its ranks run is iterate's own `launcher`, not its PPO's."""
    from alignkit.train import iterate

    base = ["policy=p", "world=w", "launcher=ray"]
    assert iterate._check(load_config(iterate.Config, None, base)) is None
    for key in ("reward_actor", "reference_actor"):
        with pytest.raises(ConfigError, match=rf"'ray.{key}': not with iterate"):
            iterate._check(load_config(iterate.Config, None, [*base, f"ray.{key}=true"]))
    with pytest.raises(ConfigError, match=r"'ppo.launcher' is set by each round; set 'launcher' instead"):
        iterate._check(load_config(iterate.Config, None, [*base, "ppo.launcher=ray"]))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from _rl_dist_worker import overrides, write_fixture

    root = tmp_path_factory.mktemp("rl_ray")
    write_fixture(root)
    # count_e, and which process scored how many rows (the Ray run must score in its reward actor)
    (root / "ray_rewards.py").write_text(
        "import os\nfrom dist_rewards import count_e\n\n"
        "def count_e_logged(prompts, responses):\n"
        f"    with open({str(root / 'scored_by.txt')!r}, 'a') as f:\n"
        "        f.write(f'{os.getpid()} {len(responses)}\\n')\n"
        "    return count_e(prompts, responses)\n")
    reward = "reward.function=ray_rewards:count_e_logged"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO), str(root)]),
           "RAY_USAGE_STATS_ENABLED": "0"}
    ray_args = ["ray.workers=2", "ray.num_cpus=0.5", "ray.reward_actor=true", "ray.reward_num_cpus=0.5",
                "ray.reference_actor=true", "ray.reference_num_cpus=0.5", "ray.object_store_mb=100",
                "ray.placement_timeout_s=60"]
    cmd = [sys.executable, "-m", "alignkit.cli", "ppo", "--launcher", "ray", *overrides(root, "ppo", "ray"), reward, *ray_args]
    ray_run = subprocess.Popen(cmd, env=env, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sys.path.insert(0, str(root))  # the reward function's module
    try:  # the one-process run, here, while the Ray cluster starts
        ppo.run(load_config(ppo.Config, None, [*overrides(root, "ppo", "one"), reward]))
    finally:
        sys.path.remove(str(root))
        out, err = ray_run.communicate(timeout=300)
    assert ray_run.returncode == 0, err[-3000:]
    (root / "ray_result.json").write_text(out[out.index("\n{") :])  # the CLI's last output: the result
    (root / "driver_pid.txt").write_text(str(ray_run.pid))
    return root


def _assert_equal_runs(root: Path, one: str, two: str) -> None:
    """Every metric (bar timings and the vf_clipfrac tie) and every final weight of run `two` within
    1e-5 of run `one`, and both trained."""
    a_rows = [json.loads(x) for x in (root / one / "metrics.jsonl").read_text().splitlines()]
    b_rows = [json.loads(x) for x in (root / two / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in b_rows] == [1, 2] == [r["step"] for r in a_rows]  # rank 0 alone wrote them
    for a, b in zip(a_rows, b_rows):
        assert a.keys() == b.keys()
        for k in a.keys() - TIMING - THRESHOLD_COUNTS:
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-5), (a["step"], k)
    start = load_file(root / "sft" / "model.safetensors")
    wa = load_file(root / one / "final" / "model.safetensors")
    wb = load_file(root / two / "final" / "model.safetensors")
    assert max((wa[k] - start[k]).abs().max().item() for k in wa) > 1e-4  # the runs did train
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")


@needs_ray
@pytest.mark.slow
def test_ppo_on_ray_actors_equals_one_process(runs):
    _assert_equal_runs(runs, "one-ppo", "ray-ppo")
    scored = [line.split() for line in (runs / "scored_by.txt").read_text().splitlines()]
    ray_side = [(pid, int(n)) for pid, n in scored if pid != str(os.getpid())]
    assert [int(n) for pid, n in scored if pid == str(os.getpid())] == [4, 4]  # one process: 4 rows per iteration
    # 2 iterations x 2 ranks, 2 rows each, all scored by one process: the reward actor, not the driver
    assert [n for _, n in ray_side] == [2, 2, 2, 2] and len({pid for pid, _ in ray_side}) == 1
    assert ray_side[0][0] != (runs / "driver_pid.txt").read_text()
    assert "launcher: ray" in (runs / "ray-ppo" / "config.yaml").read_text()  # its rerun command relaunches on Ray
    launched = json.loads((runs / "ray-ppo" / "run.json").read_text())["launch"]
    assert launched == {"world_size": 2, "nnodes": None, "launcher": "ray"}
    # the reference actor computed the reference log-probs of every row: 2 iterations x 2 ranks x 2 rows
    placed = json.loads((runs / "ray_result.json").read_text())["ray"]
    assert placed["reference_actor_rows"] == 8 and placed["reward_actor_rows"] == 8
    assert len(placed["peak_mem_mb_per_rank"]) == 2

