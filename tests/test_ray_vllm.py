"""vLLM engines as Ray actors (`--launcher ray rollout.engine=vllm ray.vllm_engines=N`,
alignkit/train/ray_vllm.py), held against the colocated vLLM engine in one process.

The end-to-end test runs GRPO twice, at the same time: on a local Ray cluster (127.0.0.1,
dashboard off, 2 CPUs, 100 MiB object store) with 2 trainer actors in this Python, which has no
vLLM, and 1 vLLM actor in the vLLM venv's Python (Ray runtime_env py_executable); and in one
process under the venv's Python with the colocated engine. Rollouts are sampled (temperature 1,
per-row seeds), so the groups have real advantages: every sampled response, every metric and every
final weight must agree (1e-5). Skips with the reason when Ray, the vLLM venv or Ray in that venv
is missing (`bash scripts/setup_vllm_venv.sh` builds the venv with Ray).
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
from alignkit.models.generate import SamplingParams
from alignkit.models.load import tiny_llama
from alignkit.train import grpo
from alignkit.train.ray_vllm import RemoteVLLM, engines_of, from_wire, split_request, to_wire

HAVE_RAY = importlib.util.find_spec("ray") is not None
VENV_PYTHON = os.environ.get("ALIGNKIT_VLLM_PYTHON", "/work/venvs/vllm/bin/python")
REPO = Path(__file__).resolve().parents[1]
TIMING = {"rollout_s", "iteration_s"}


def test_each_engine_has_one_owner_and_every_rank_an_engine():
    """Engine e is pushed by rank e % world. 3 engines, 2 ranks: rank 0 owns and samples on 0 and 2,
    rank 1 on 1. 1 engine, 2 ranks: rank 1 owns none and samples on rank 0's engine. 2 engines,
    4 ranks: ranks 2 and 3 sample on engines 0 and 1."""
    assert [engines_of(r, 2, 3) for r in range(2)] == [([0, 2], [0, 2]), ([1], [1])]
    assert [engines_of(r, 2, 1) for r in range(2)] == [([0], [0]), ([], [0])]
    assert [engines_of(r, 4, 2) for r in range(4)] == [([0], [0]), ([1], [1]), ([], [0]), ([], [1])]


def test_split_request_keeps_each_rows_seed():
    """5 rows over 2 engines are rows 0-1 and 2-4 (5*1//2 = 2); seed 7 becomes the row seeds
    7+row that one engine would give them (7, 8 | 9, 10, 11); given row seeds are sliced; a share
    with no row (3 rows, 4 engines: bounds 0 0 1 2 3) is left out."""
    rows = [[1], [2], [3], [4], [5]]
    got = split_request(rows, SamplingParams(max_new_tokens=3, seed=7), 2)
    assert [(p, sp.row_seeds) for p, sp in got] == [([[1], [2]], (7, 8)), ([[3], [4], [5]], (9, 10, 11))]
    assert all(sp.max_new_tokens == 3 for _, sp in got)
    got = split_request(rows[:3], SamplingParams(row_seeds=(40, 50, 60)), 4)
    assert [(p, sp.row_seeds) for p, sp in got] == [([[1]], (40,)), ([[2]], (50,)), ([[3]], (60,))]
    assert [sp.row_seeds for _, sp in split_request(rows, SamplingParams(greedy=True), 2)] == [None, None]


def test_weights_cross_the_wire_bit_exact_as_numpy():
    """fp32 and bf16 tensors come back bit-equal (bf16 travels as int16 bits: numpy has no
    bf16), as numpy arrays on the wire; a tied head travels under its own name too."""
    emb = torch.randn(5, 3)
    half = torch.randn(4, dtype=torch.float32).to(torch.bfloat16)
    wire = to_wire([("embed.weight", emb), ("norm.weight", half), ("lm_head.weight", emb)])
    assert [(n, type(a).__name__, d) for n, a, d in wire] == [("embed.weight", "ndarray", "float32"),
                                                              ("norm.weight", "ndarray", "bfloat16"),
                                                              ("lm_head.weight", "ndarray", "float32")]
    back = dict(from_wire(wire))
    assert back["embed.weight"].dtype == torch.float32 and torch.equal(back["embed.weight"], emb)
    assert back["norm.weight"].dtype == torch.bfloat16 and torch.equal(back["norm.weight"].view(torch.int16), half.view(torch.int16))


class _Engine:
    """A recorder standing in for a VLLMActor handle: `x.method.remote(*args)` logs and answers."""

    def __init__(self, name, log):
        self.name, self.log = name, log

    def __getattr__(self, method):
        def remote(*args):
            self.log.append((self.name, method, args))
            if method == "generate":
                prompts, params = args
                return [[p[0] * 10, params.row_seeds[i]] for i, p in enumerate(prompts)], [i == 0 for i in range(len(prompts))]
            return None

        return type("M", (), {"remote": staticmethod(remote)})


@pytest.mark.skipif(not HAVE_RAY, reason="Ray is not installed (pip install -e '.[ray]')")
def test_remote_sampler_pushes_once_per_owned_engine_and_keeps_row_order(monkeypatch):
    """Rank 0 of 1 with 2 engines: each rollout puts the weights once and pushes them to both
    engines (the first push with the ModelSpec that starts the engine, later ones without), then
    samples rows 0-1 on engine 0 and 2-4 on engine 1 with their own seeds, and returns the answers
    in row order. Rank 1 of 2 with 1 engine pushes nothing and samples on engine 0."""
    import ray

    puts, log = [], []
    monkeypatch.setattr(ray, "put", lambda x: puts.append(x) or f"ref{len(puts)}")
    monkeypatch.setattr(ray, "get", lambda x: x)
    policy = tiny_llama("nano", vocab_size=40, seed=0)
    engines = [_Engine("e0", log), _Engine("e1", log)]
    sampler = RemoteVLLM(engines, rank=0, world=1)
    params = SamplingParams(max_new_tokens=4, seed=3)
    for _ in range(2):
        out = sampler.bind(policy, None).generate([[1], [2], [3], [4], [5]], params)
    assert list(out) == [[10, 3], [20, 4], [30, 5], [40, 6], [50, 7]] and out.finished == [True, False, True, False, False]
    pushes = [(name, args) for name, method, args in log if method == "push"]
    assert [(n, a[0]) for n, a in pushes] == [("e0", "ref1"), ("e1", "ref1"), ("e0", "ref2"), ("e1", "ref2")]
    assert pushes[0][1][1].eos_ids == (policy.config.eos_token_id,) and pushes[2][1][1] is None
    sd = policy.state_dict()
    assert len(puts) == 2 and [n for n, _ in from_wire(puts[0])] == list(sd)
    assert all(torch.equal(t, sd[n]) for n, t in from_wire(puts[0]))
    assert len(sampler.push_ms) == 1  # the second push; the first one started the engines

    log.clear()
    other = RemoteVLLM(engines[:1], rank=1, world=2).bind(policy, None)
    assert list(other.generate([[6], [7]], params)) == [[60, 3], [70, 4]]
    assert [(n, m) for n, m, _ in log] == [("e0", "generate")]


def test_vllm_engines_are_config_errors_off_ray_without_vllm_rollouts_and_with_iterate():
    from alignkit.train import iterate
    from alignkit.train.ray_launch import check_actors, run_here_or_on_ray

    base = ["model.path=x", "data.path=y", "ray.vllm_engines=1"]
    cfg = load_config(grpo.Config, None, [*base, "rollout.engine=vllm"])
    with pytest.raises(ConfigError, match=r"'ray.vllm_engines' \(1\) needs launcher=ray"):
        run_here_or_on_ray(lambda c: pytest.fail("trained"), cfg)
    with pytest.raises(ConfigError, match=r"'ray.vllm_engines' \(1\): vLLM actors sample the rollouts only with rollout.engine=vllm"):
        check_actors(load_config(grpo.Config, None, [*base, "launcher=ray"]))
    check_actors(dataclasses.replace(cfg, launcher="ray"))
    with pytest.raises(ConfigError, match=r"'ray.vllm_engines': not with iterate"):
        iterate._check(load_config(iterate.Config, None, ["policy=p", "world=w", "launcher=ray", "ray.vllm_engines=1"]))
    with pytest.raises(ConfigError, match=r"'ray.vllm_engines': expected >= 0"):
        load_config(grpo.Config, None, ["model.path=x", "ray.vllm_engines=-1"])


@pytest.mark.skipif(not HAVE_RAY, reason="Ray is not installed (pip install -e '.[ray]')")
def test_a_python_without_vllm_is_a_config_error_before_the_cluster_starts(tmp_path):
    from alignkit.train.ray_vllm import check_vllm_python

    with pytest.raises(ConfigError, match=r"'ray.vllm_python': no python at .*setup_vllm_venv.sh"):
        check_vllm_python(str(tmp_path / "python"))
    if importlib.util.find_spec("vllm") is None:
        with pytest.raises(ConfigError, match=r"'ray.vllm_python': .* cannot import vllm"):
            check_vllm_python(sys.executable)
    import ray

    from alignkit.train.ray_launch import launch

    cfg = load_config(grpo.Config, None, ["model.path=x", "launcher=ray", "rollout.engine=vllm", "ray.vllm_engines=1",
                                          f"ray.vllm_python={tmp_path / 'python'}"])
    with pytest.raises(ConfigError, match=r"'ray.vllm_python': no python at"):
        launch(lambda c: pytest.fail("trained"), cfg)
    assert not ray.is_initialized()  # refused before any cluster started


def _venv_problem() -> str | None:
    """Why the end-to-end test cannot run here, or None."""
    if not HAVE_RAY:
        return "Ray is not installed here (pip install -e '.[ray]')"
    if importlib.util.find_spec("vllm") is not None:
        return "vllm is importable here: run this test from the main environment (its point is a driver without vLLM)"
    if not Path(VENV_PYTHON).is_file():
        return f"no vLLM venv at {VENV_PYTHON}: build it with `bash scripts/setup_vllm_venv.sh`"
    from alignkit.train.ray_vllm import check_vllm_python

    try:
        check_vllm_python(VENV_PYTHON)
    except ConfigError as e:
        return str(e)
    return None


@pytest.mark.slow
def test_grpo_with_a_vllm_actor_equals_the_colocated_engine(tmp_path):
    if (why := _venv_problem()) is not None:
        pytest.skip(why)
    from alignkit.models.bpe import train_bpe_tokenizer
    from alignkit.models.load import save_model

    tok = train_bpe_tokenizer(["Human: What is one plus two?\nAssistant: three . four five six seven"] * 20, vocab_size=300)
    save_model(tiny_llama("tiny", tokenizer=tok, seed=0), tok, tmp_path / "sft")  # head size 32: vLLM's CPU kernel
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": f"Human: What is {w} plus two?\nAssistant:"}) + "\n"
                                                    for w in ("one", "two", "three", "four")))
    (tmp_path / "ray_vllm_rewards.py").write_text(  # count_e, logging each response with its run's tag
        "import os\n\ndef count_e(prompts, responses):\n"
        f"    with open(os.path.join({str(tmp_path)!r}, os.environ['RUN_TAG'] + '.txt'), 'a') as f:\n"
        "        f.writelines(repr(r) + '\\n' for r in responses)\n"
        "    return [r.count('e') / 4 for r in responses]\n")
    args = [f"model.path={tmp_path / 'sft'}", f"data.path={tmp_path / 'prompts.jsonl'}", "reward.source=function",
            "reward.function=ray_vllm_rewards:count_e", "iterations=2", "prompts_per_step=2", "group_size=2",
            "train.batch_size=4", "rollout.max_new_tokens=6", "train.lr=5e-2", "train.precision=fp32",
            "rollout.engine=vllm", "eval_every=0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0",
           "PYTHONPATH": os.pathsep.join([str(REPO), str(tmp_path)])}
    ray_args = ["--launcher", "ray", "ray.workers=2", "ray.num_cpus=0.5", "ray.vllm_engines=1", "ray.vllm_num_cpus=0.5",
                f"ray.vllm_python={VENV_PYTHON}", "ray.object_store_mb=100", "ray.placement_timeout_s=60"]
    on_ray = subprocess.Popen([sys.executable, "-m", "alignkit.cli", "grpo", *args, f"out={tmp_path / 'ray'}", *ray_args],
                              env={**env, "RUN_TAG": "ray"}, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    one = subprocess.run([VENV_PYTHON, "-m", "alignkit.cli", "grpo", *args, f"out={tmp_path / 'one'}"],
                         env={**env, "RUN_TAG": "one"}, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    out, err = on_ray.communicate(timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    assert on_ray.returncode == 0, err[-3000:]

    placed = json.loads(out[out.index("\n{"):])["ray"]
    engine = placed["vllm_engines"][0]
    assert engine["python"] == VENV_PYTHON != sys.executable  # sampled in the venv's actor, not in a rank
    assert engine["rows"] == 8 and engine["pushes"] == 1  # 2 iterations x 4 rows; the second rollout's push
    assert [len(p) for p in placed["vllm_push_ms_per_rank"]] == [1, 0]  # rank 0 owns the engine
    sampled = {tag: (tmp_path / f"{tag}.txt").read_text().splitlines() for tag in ("one", "ray")}
    assert sorted(sampled["ray"]) == sorted(sampled["one"]) and len(sampled["one"]) == 8
    assert len(set(sampled["one"])) > 2  # sampled, not greedy: the groups have advantages

    rows = {tag: [json.loads(x) for x in (tmp_path / tag / "metrics.jsonl").read_text().splitlines()] for tag in ("one", "ray")}
    assert [r["step"] for r in rows["ray"]] == [1, 2] == [r["step"] for r in rows["one"]]
    for a, b in zip(rows["one"], rows["ray"]):
        assert a.keys() == b.keys()
        for k in a.keys() - TIMING:
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-5), (a["step"], k)
    assert rows["one"][0]["grad_norm"] > 1e-3
    start, wa, wb = (load_file(tmp_path / d / "model.safetensors") for d in ("sft", "one/final", "ray/final"))
    assert max((wa[k] - start[k]).abs().max().item() for k in wa) > 1e-4  # both trained
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")
