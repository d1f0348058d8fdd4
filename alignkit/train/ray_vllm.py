"""vLLM engines as Ray actors: `--launcher ray rollout.engine=vllm ray.vllm_engines=N`.

    alignkit grpo --launcher ray ... rollout.engine=vllm ray.workers=8 ray.num_gpus=1 \
        ray.vllm_engines=2 ray.vllm_num_gpus=1

The N engines live in actors of their own (one placement-group bundle each, after the trainers'),
run by the vLLM environment's Python (`ray.vllm_python`: Ray's runtime_env `py_executable`; vLLM
pins its own torch, so it has a venv of its own, scripts/setup_vllm_venv.sh, with the same Ray
and Python version as the driver). Each actor drives one `VLLMEngine`, the class the colocated
engine uses, so sampling parameters and per-row seeds map exactly as there.

Engine e belongs to trainer rank e % world. Before each rollout every rank that owns engines
puts the policy's current weights (the merged state dict, CPU tensors) into the Ray object store
once and its engines load them in memory (the vLLM worker's reload_weights; the first push
starts the engine). With fewer engines than ranks, rank r samples on engine r % N, owned by
another rank, so the ranks meet in a barrier after the push (a rollout is collective, as the
gather that follows it already is). Each rank then splits its rows into contiguous shares, one per
engine it uses, each row keeping its own seed, and concatenates the answers in row order.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import subprocess
import sys
import time
import weakref
from pathlib import Path
from typing import Any

from alignkit.config import ConfigError
from alignkit.models.generate import Generations, SamplingParams, check_request

DEFAULT_VLLM_PYTHON = "/work/venvs/vllm/bin/python"


def to_wire(weights: list[tuple[str, Any]]) -> list[tuple[str, Any, str]]:
    """[(name, numpy array, torch dtype)]: Ray's object store hands a numpy array to the reader
    without a copy (a torch tensor would be pickled); 16-bit floats travel as their int16 bits.
    Every name travels, a tied lm_head too: vLLM's reload_weights needs it (measured: without it
    the reloaded engine no longer decodes like the policy)."""
    import torch

    wire = []
    for name, t in weights:
        bits = t.contiguous().view(torch.int16) if t.dtype in (torch.bfloat16, torch.float16) else t.contiguous()
        wire.append((name, bits.numpy(), str(t.dtype).removeprefix("torch.")))
    return wire


def from_wire(wire: list[tuple[str, Any, str]]) -> list[tuple[str, Any]]:
    """`to_wire`'s tensors back, as views of the (read-only) arrays: the engine copies them in."""
    import warnings

    import torch

    out = []
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        for name, a, dtype in wire:
            t = torch.from_numpy(a)
            out.append((name, t.view(getattr(torch, dtype)) if dtype in ("bfloat16", "float16") else t))
    return out


def engines_of(rank: int, world: int, n: int) -> tuple[list[int], list[int]]:
    """(engines rank `rank` pushes weights to, engines it samples on): it owns engines e with
    e % world == rank and samples on them; a rank that owns none samples on engine rank % n."""
    owned = [e for e in range(n) if e % world == rank]
    return owned, owned or [rank % n]


def split_request(prompts: list[list[int]], params: SamplingParams, parts: int) -> list[tuple[list, SamplingParams]]:
    """`parts` contiguous, near-equal shares of the rows (empty ones left out), each with its rows'
    own seeds: `row_seeds` sliced, or seed + row made explicit, so a row samples what it samples
    in one engine's batch (VLLMEngine.sampling_params)."""
    n = len(prompts)
    seeds = params.row_seeds
    if seeds is None and params.seed is not None:
        seeds = tuple(params.seed + i for i in range(n))
    bounds = [n * k // parts for k in range(parts + 1)]
    return [(prompts[a:b], dataclasses.replace(params, row_seeds=None if seeds is None else tuple(seeds[a:b])))
            for a, b in zip(bounds, bounds[1:]) if b > a]


class VLLMActor:
    """One vLLM engine in a Ray actor, in the vLLM environment's Python; started by the first push."""

    def __init__(self, cwd: str, kv_cache_mb: int, gpu_memory_utilization: float):
        from alignkit.models.vllm_engine import import_vllm

        if os.path.isdir(cwd):
            os.chdir(cwd)
        import_vllm()  # the slow import, while the trainer ranks load their models
        self.kv_cache_mb, self.gpu_memory_utilization = kv_cache_mb, gpu_memory_utilization
        self.engine: Any = None
        self.rows = 0
        self.start_s = 0.0
        self.load_ms: list[float] = []  # each reload after the start

    def push(self, wire: list, spec: Any = None) -> None:
        """Load the weights (`to_wire`'s list) in memory; the first push starts the engine from
        `spec` (a vllm_engine.ModelSpec) and these weights."""
        import torch

        from alignkit.models.vllm_engine import VLLMEngine

        t0 = time.perf_counter()
        weights = from_wire(wire)
        if self.engine is None:
            self.engine = VLLMEngine(spec, weights, torch.cuda.is_available(), kv_cache_mb=self.kv_cache_mb,
                                     gpu_memory_utilization=self.gpu_memory_utilization, sleep=False)
            self.start_s = time.perf_counter() - t0
            return
        self.engine.load_weights(weights)
        self.load_ms.append(1e3 * (time.perf_counter() - t0))

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> tuple[list[list[int]], list[bool]]:
        out = self.engine.generate(prompts, params)
        self.rows += len(prompts)
        return list(out), out.finished

    def served(self) -> dict:
        """Rows sampled, weight reloads after the start and their median time, the start's time, this Python."""
        import statistics

        return {"rows": self.rows, "pushes": len(self.load_ms),
                "load_ms": round(statistics.median(self.load_ms), 2) if self.load_ms else None,
                "start_s": round(self.start_s, 2), "python": sys.executable}


class RemoteVLLM:
    """rollout.engine=vllm on one trainer rank when the engines are Ray actors: `bind(policy,
    tokenizer)` gives the Generator the rollout uses (rollout.vllm_elsewhere)."""

    def __init__(self, engines: list, rank: int, world: int):
        self.engines, self.world = engines, world
        self.owned, self.used = engines_of(rank, world, len(engines))
        self.started = False
        self.push_ms: list[float] = []  # this rank's pushes after the first: ray.put + every owned engine loaded
        self._policy: Any = None
        self.tokenizer: Any = None

    def bind(self, policy: Any, tokenizer: Any) -> RemoteVLLM:
        self._policy, self.tokenizer = weakref.ref(policy), tokenizer
        return self

    def push(self) -> None:
        """The policy's current weights into the engines this rank owns, through the object store."""
        import ray

        from alignkit.models.vllm_engine import model_spec, policy_weights

        if not self.owned:
            return
        policy = self._policy()
        t0 = time.perf_counter()
        ref = ray.put(to_wire(policy_weights(policy)))
        spec = None if self.started else model_spec(policy, self.tokenizer)
        ray.get([self.engines[e].push.remote(ref, spec) for e in self.owned])
        if self.started:
            self.push_ms.append(round(1e3 * (time.perf_counter() - t0), 2))
        self.started = True

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> Generations:
        """Collective when there are fewer engines than ranks (every rank must call it)."""
        import ray
        import torch.distributed as tdist

        check_request(prompts, params)
        self.push()
        if len(self.engines) < self.world and tdist.is_initialized():
            tdist.barrier()  # an engine this rank does not own has the new weights
        if params.max_new_tokens == 0 or not prompts:
            return Generations([[] for _ in prompts], [False] * len(prompts))
        shares = split_request([list(p) for p in prompts], params, len(self.used))
        answers = ray.get([self.engines[e].generate.remote(p, sp) for e, (p, sp) in zip(self.used, shares)])
        return Generations([r for ids, _ in answers for r in ids], [f for _, fin in answers for f in fin])


def vllm_python(configured: str | None) -> str:
    """The vLLM actors' Python: `ray.vllm_python`, else this Python when it imports vllm, else
    $ALIGNKIT_VLLM_PYTHON, else the venv scripts/setup_vllm_venv.sh builds."""
    if configured:
        return configured
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    return os.environ.get("ALIGNKIT_VLLM_PYTHON", DEFAULT_VLLM_PYTHON)


def check_vllm_python(python: str) -> None:
    """ConfigError unless `python` has vllm, and Ray and a Python of this driver's versions (a Ray
    worker of another version cannot join the cluster)."""
    import ray

    fix = ("build it with `bash scripts/setup_vllm_venv.sh` (which also installs this Ray), or point "
           "ray.vllm_python (or ALIGNKIT_VLLM_PYTHON) at a python with vllm and ray")
    if not Path(python).is_file():
        raise ConfigError(f"config key 'ray.vllm_python': no python at {python}; {fix}")
    probe = ("import importlib.util as u, sys\ntry:\n    import ray; v = ray.__version__\nexcept ImportError:\n    v = None\n"
             "print(v, bool(u.find_spec('vllm')), '%d.%d' % sys.version_info[:2])")
    got = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=120)
    words = got.stdout.split()
    if got.returncode != 0 or len(words) != 3:
        raise ConfigError(f"config key 'ray.vllm_python': {python} does not run ({got.stderr.strip()[-300:]}); {fix}")
    ray_version, has_vllm, py_version = words
    here = f"{sys.version_info[0]}.{sys.version_info[1]}"
    if has_vllm != "True":
        raise ConfigError(f"config key 'ray.vllm_python': {python} cannot import vllm; {fix}")
    if ray_version != ray.__version__ or py_version != here:
        raise ConfigError(f"config key 'ray.vllm_python': {python} has Ray {ray_version} on Python {py_version}, the "
                          f"driver Ray {ray.__version__} on Python {here}; they must match: {fix}")


def runtime_env(python: str) -> dict:
    """Ray runtime_env of a vLLM actor: the vLLM Python, and this alignkit checkout first on its
    path when alignkit runs from a source tree (the actor must unpickle what the ranks send)."""
    env = {"py_executable": python}
    root = Path(__file__).resolve().parents[2]
    if (root / "pyproject.toml").is_file():
        env["env_vars"] = {"PYTHONPATH": os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH")) if p)}
    return env


def start_engines(ray: Any, rc: Any, python: str, options: Any) -> list:
    """`rc.vllm_engines` VLLMActor handles run by `python` (which check_vllm_python passed: else
    the worker would never start) and placed by `options(i)`."""
    cls = ray.remote(num_cpus=rc.vllm_num_cpus, num_gpus=rc.vllm_num_gpus)(VLLMActor)
    return [cls.options(runtime_env=runtime_env(python), **options(i)).remote(
        os.getcwd(), rc.vllm_kv_cache_mb, rc.vllm_gpu_memory_utilization) for i in range(rc.vllm_engines)]
