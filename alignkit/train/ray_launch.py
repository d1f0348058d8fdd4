"""Ray placement for the RL stages (`alignkit ppo|grpo|rloo|iterate --launcher ray`): the trainer
ranks as Ray actors in one placement group, optionally the reward source and the frozen KL
reference model each in an actor of its own.

    alignkit ppo --launcher ray --config configs/ppo.yaml ray.workers=4 ray.num_gpus=1 ...

The trainer group is `ray.workers` actors, one placement-group bundle each ({CPU: num_cpus,
GPU: num_gpus}, strategy PACK or SPREAD). Each actor sets the variables torchrun would set
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) and runs the stage's own `train`
function, so the ranks join the same process group (alignkit.train.distributed.init_dist) and
run exactly the code of the torchrun path: same seeds, same results. Ray only places and starts
the processes; every collective is torch.distributed's.

With `ray.reward_actor=true` the reward source (reward model(s) and their ensemble, the gold
judge or a reward function) lives in one more actor: each rank sends it its share's token ids
and texts and receives the scores, so the reward models need no memory on the trainer ranks.
With `ray.reference_actor=true` the frozen reference model lives in one more actor: each rank
sends it (input_ids, attention_mask, response_ids) and receives the per-token reference
log-probs, computed by the same code, temperature and chunking as a local reference, so the
trainer ranks never load it (not with LoRA, whose reference is the policy itself).
With `ray.vllm_engines=N` (and rollout.engine=vllm) N vLLM engines in actors of their own sample
the rollouts; the ranks push their weights into them in memory (alignkit/train/ray_vllm.py).

Ray is optional (`pip install 'alignkit[ray]'`); it is imported only when a run asks for it.
docs/distributed-rl.md has the recipes (one machine, a cluster joined with `ray.address`).
"""

from __future__ import annotations

import math
import os
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from alignkit.config import ConfigError


@dataclass(frozen=True)
class RayConfig:
    """Where `--launcher ray` places the trainer ranks (and the reward actor)."""

    workers: int = 2
    """Trainer ranks: Ray actors, one placement-group bundle each (the torchrun world size)."""
    num_cpus: float = 1.0
    """CPUs reserved per trainer actor."""
    num_gpus: float = 0.0
    """GPUs per trainer actor (1 on a GPU cluster: Ray gives each actor its own device)."""
    strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    """Placement-group strategy: PACK fills a node before the next, SPREAD puts bundles on distinct nodes where it can."""
    address: str | None = None
    """Cluster to join (`auto`, `HOST:6379`, `ray://HOST:10001`); None starts a local one-machine cluster on 127.0.0.1."""
    reward_actor: bool = False
    """Score rollouts in a separate actor that holds the reward source (reward model(s), gold judge or function)."""
    reward_num_cpus: float = 1.0
    """CPUs reserved for the reward actor."""
    reward_num_gpus: float = 0.0
    """GPUs for the reward actor."""
    reference_actor: bool = False
    """Compute the KL reference's log-probs in a separate actor that holds the frozen reference model (not with LoRA)."""
    reference_num_cpus: float = 1.0
    """CPUs reserved for the reference actor."""
    reference_num_gpus: float = 0.0
    """GPUs for the reference actor."""
    vllm_engines: int = 0
    """vLLM engines as Ray actors that sample every rank's rollouts (needs rollout.engine=vllm); 0: one engine colocated in each trainer rank."""
    vllm_num_cpus: float = 1.0
    """CPUs reserved per vLLM engine actor."""
    vllm_num_gpus: float = 0.0
    """GPUs per vLLM engine actor."""
    vllm_python: str | None = None
    """Python of the vLLM actors (a venv with vllm and this Ray); None: this one if it imports vllm, else $ALIGNKIT_VLLM_PYTHON, else /work/venvs/vllm/bin/python."""
    vllm_kv_cache_mb: int = 64
    """KV cache of each vLLM engine actor on CPU, MiB."""
    vllm_gpu_memory_utilization: float = 0.9
    """Share of its GPU a vLLM engine actor may take."""
    object_store_mb: int = 256
    """Object store of a local cluster, MiB (ids, scores, log-probs, configs, and the weights pushed to vLLM actors travel through it)."""
    placement_timeout_s: float = 600.0
    """Give up when the cluster cannot hold the placement group within this many seconds."""


class RemoteReward:
    """A RewardSource whose scores come from the reward actor (rollout.RewardSource protocol)."""

    def __init__(self, actor: Any):
        self.actor = actor
        self.last_member_scores = None

    def __call__(self, prompts, responses, input_ids, attention_mask):
        import ray

        device = input_ids.device
        scores, raw, members = ray.get(self.actor.score.remote(
            list(prompts), list(responses), input_ids.cpu(), attention_mask.cpu()))
        self.last_member_scores = None if members is None else members.to(device)
        return scores.to(device), raw.to(device)


class RemoteReference:
    """The frozen reference as a trainer rank sees it when it lives in the reference actor: the
    two methods of rollout.Reference that the RL stages call, answered by the actor."""

    def __init__(self, actor: Any):
        self.actor = actor

    def logprobs(self, input_ids, attention_mask, response_ids, temperature=1.0, chunk=0, share_prompt_prefix=False):
        """(B, L), (B, L), (B, T) -> (B, T) reference log-probs, on the ids' device."""
        import ray

        got = ray.get(self.actor.logprobs.remote(input_ids.cpu(), attention_mask.cpu(), response_ids.cpu(),
                                                 temperature, chunk, share_prompt_prefix))
        return got.to(input_ids.device)

    def greedy_responses(self, tokenizer, prompt_ids, max_new_tokens: int) -> list[str]:
        """The reference's greedy answers (the gold evaluation's other side), decoded in the actor."""
        import ray

        return ray.get(self.actor.greedy_responses.remote([list(p) for p in prompt_ids], max_new_tokens))


@dataclass(frozen=True)
class DriverState:
    """What an actor takes over from the process that launched it."""

    cwd: str
    """The driver's working directory (relative `out`, `model.path` resolve against it)."""
    paths: tuple[str, ...]
    """The driver's sys.path (a `reward.function` module importable there is importable here)."""
    quiet: bool
    """transformers' progress bars were off in the driver (the CLI turns them off)."""


def driver_state() -> DriverState:
    try:
        from transformers.utils import logging as hf_logging

        quiet = not hf_logging.is_progress_bar_enabled()
    except ImportError:
        quiet = False
    return DriverState(os.getcwd(), tuple(sys.path), quiet)


def _join_driver(d: DriverState) -> None:
    """Run from the driver's directory with its import path, so relative paths and a
    `reward.function` module resolve as they do in the driver (on another node: where they exist)."""
    if os.path.isdir(d.cwd):
        os.chdir(d.cwd)
    sys.path[:0] = [p for p in d.paths if p not in sys.path and (p == "" or os.path.isdir(p))]
    if d.quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


class RewardScorer:
    """The reward actor: builds the stage's reward source once and scores every rank's rows."""

    def __init__(self, reward_cfg: Any, world_dir: str | None, driver: DriverState):
        from alignkit.train.rollout import build_reward_source, pick_device

        _join_driver(driver)
        world = None
        if world_dir:
            from alignkit.world import load_world

            world = load_world(world_dir)
        self.device = pick_device()
        self.source = build_reward_source(reward_cfg, world, self.device)
        self.rows = 0

    def score(self, prompts, responses, input_ids, attention_mask):
        """Texts (B,), ids and mask (B, L) -> scores (B,), raw scores (B,), member scores (K, B) or None."""
        scores, raw = self.source(prompts, responses, input_ids.to(self.device), attention_mask.to(self.device))
        members = getattr(self.source, "last_member_scores", None)
        self.rows += len(responses)
        return scores.cpu(), raw.cpu(), None if members is None else members.cpu()

    def served(self) -> int:
        """Rows scored so far."""
        return self.rows


class ReferenceHolder:
    """The reference actor: loads the frozen reference model once and answers every rank's
    log-prob passes (and rank 0's greedy evaluation) with rollout.Reference's own code."""

    def __init__(self, model_path: str, tokenizer_path: str, precision: str, driver: DriverState):
        from alignkit.train.rollout import build_reference, pick_device

        _join_driver(driver)
        self.device = pick_device()
        self.reference = build_reference(None, model_path, False, self.device)
        self.tokenizer_path, self.tokenizer = tokenizer_path, None
        self.precision = precision
        self.rows = 0

    def logprobs(self, input_ids, attention_mask, response_ids, temperature, chunk, share_prompt_prefix):
        """(B, L), (B, L), (B, T) -> (B, T) log-probs, under the autocast the trainers' `train.precision` gives here."""
        from alignkit.train.rollout import autocast_for

        d = self.device
        with autocast_for(self.precision, d):
            got = self.reference.logprobs(input_ids.to(d), attention_mask.to(d), response_ids.to(d), temperature,
                                          chunk, share_prompt_prefix=share_prompt_prefix)
        self.rows += len(input_ids)
        return got.cpu()

    def greedy_responses(self, prompt_ids: list[list[int]], max_new_tokens: int) -> list[str]:
        from alignkit.models.load import load_tokenizer

        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(self.tokenizer_path)
        return self.reference.greedy_responses(self.tokenizer, prompt_ids, max_new_tokens)

    def served(self) -> int:
        """Rows whose log-probs were computed so far."""
        return self.rows


class Trainer:
    """One trainer rank: the torchrun environment, then the stage's `train(cfg, reward)`."""

    def __init__(self, rank: int, world: int, driver: DriverState):
        _join_driver(driver)
        self.rank, self.world = rank, world

    def address(self) -> tuple[str, int]:
        """This actor's node address and a port free on it (rank 0's become the rendezvous)."""
        import ray

        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def run(self, train: Callable[..., dict], cfg: Any, master: tuple[str, int], local_rank: int,
            reward_actor: Any = None, reference_actor: Any = None, vllm_engines: list | None = None) -> dict:
        """The stage's result; with vLLM actors, plus `vllm_push_ms`: this rank's weight pushes."""
        import contextlib

        import torch.distributed as tdist

        os.environ.update(RANK=str(self.rank), WORLD_SIZE=str(self.world), LOCAL_RANK=str(local_rank),
                          MASTER_ADDR=master[0], MASTER_PORT=str(master[1]))
        extra = {} if reference_actor is None else {"reference": RemoteReference(reference_actor)}
        sampler = None
        if vllm_engines:
            from alignkit.train.ray_vllm import RemoteVLLM
            from alignkit.train.rollout import vllm_elsewhere

            sampler = RemoteVLLM(vllm_engines, self.rank, self.world)
        try:
            with vllm_elsewhere(sampler) if sampler is not None else contextlib.nullcontext():
                result = train(cfg, RemoteReward(reward_actor) if reward_actor is not None else None, **extra)
            return result if sampler is None else {**result, "vllm_push_ms": sampler.push_ms}
        finally:
            if tdist.is_initialized():
                tdist.destroy_process_group()


def _import_ray():
    try:
        import ray
    except ImportError:
        raise ConfigError("launcher=ray needs Ray: pip install 'alignkit[ray]' (or pip install ray)") from None
    return ray


def _connect(ray: Any, rc: RayConfig) -> bool:
    """Join `rc.address` or start a local cluster; True when this call did (and must shut it down)."""
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if rc.address:
        try:
            ray.init(address=rc.address)
        except ConnectionError as e:
            raise ConfigError(
                f"config key 'ray.address': cannot join the Ray cluster at {rc.address!r} ({e}); is `ray start --head` "
                "running there, and does this shell set RAY_AUTH_MODE=token when the cluster uses token authentication?"
            ) from None
        return True
    need = (rc.workers * rc.num_cpus + (rc.reward_num_cpus if rc.reward_actor else 0.0)
            + (rc.reference_num_cpus if rc.reference_actor else 0.0) + rc.vllm_engines * rc.vllm_num_cpus)
    # "local": a new cluster even where RAY_ADDRESS or a previous `ray start` points at another one
    ray.init(address="local", num_cpus=max(os.cpu_count() or 1, math.ceil(need)), include_dashboard=False,
             _node_ip_address="127.0.0.1", object_store_memory=rc.object_store_mb * 2**20)
    return True


def local_ranks(nodes: list[str], num_gpus: float) -> list[int]:
    """LOCAL_RANK of each trainer: 0 for GPU actors (Ray shows each actor only its own device),
    else its index among the trainers on the same node."""
    if num_gpus > 0:
        return [0] * len(nodes)
    return [nodes[:i].count(n) for i, n in enumerate(nodes)]


def _bundle(cpus: float, gpus: float) -> dict[str, float]:
    return {k: v for k, v in (("CPU", cpus), ("GPU", gpus)) if v}


def check_actors(cfg: Any) -> None:
    """Refuse, before any cluster starts, the actors a run cannot use."""
    rc: RayConfig = cfg.ray
    if rc.workers < 1:
        raise ConfigError(f"config key 'ray.workers' must be >= 1, got {rc.workers}")
    if rc.reference_actor and cfg.model.lora_r > 0:
        raise ConfigError(
            "config key 'ray.reference_actor': not with model.lora_r > 0; a LoRA policy's reference is the policy "
            "itself with the adapter switched off, so the trainer ranks hold no second model to move out "
            "(set ray.reference_actor=false)")
    rollout = getattr(cfg, "rollout", None)
    if rc.vllm_engines and getattr(rollout, "engine", None) != "vllm":
        raise ConfigError(f"config key 'ray.vllm_engines' ({rc.vllm_engines}): vLLM actors sample the rollouts only "
                          "with rollout.engine=vllm (set it, or ray.vllm_engines=0)")


def _actor_rows(ray: Any, actor: Any) -> int | None:
    return None if actor is None else ray.get(actor.served.remote())


def run_here_or_on_ray(train: Callable[..., dict], cfg: Any) -> dict:
    """`train(cfg)` in this process (one process or a torchrun rank), or with `launcher: ray` on Ray
    actors (`launch`): a stage's `run`."""
    if cfg.launcher != "ray" and cfg.ray.vllm_engines:
        raise ConfigError(f"config key 'ray.vllm_engines' ({cfg.ray.vllm_engines}) needs launcher=ray (--launcher ray); "
                          "under torchrun or one process, rollout.engine=vllm runs an engine in each rank")
    return launch(train, cfg) if cfg.launcher == "ray" else train(cfg)


def launch(train: Callable[..., dict], cfg: Any) -> dict:
    """Run `train(cfg, reward[, reference=...])` on `cfg.ray.workers` Ray actors; returns rank 0's
    result, with `ray`: every rank's peak memory and the rows the reward / reference actors served."""
    ray = _import_ray()
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    rc: RayConfig = cfg.ray
    check_actors(cfg)
    vllm_exe = None
    if rc.vllm_engines:
        from alignkit.train.ray_vllm import check_vllm_python, vllm_python

        vllm_exe = vllm_python(rc.vllm_python)
        check_vllm_python(vllm_exe)  # before the cluster starts: a missing venv is a config error
    owned = _connect(ray, rc)
    bundles = [_bundle(rc.num_cpus, rc.num_gpus) for _ in range(rc.workers)]
    index: dict[str, int] = {}  # reward / reference / vLLM actor -> its bundle (one that reserves nothing needs none)
    for name, on, cpus, gpus in (("reward", rc.reward_actor, rc.reward_num_cpus, rc.reward_num_gpus),
                                 ("reference", rc.reference_actor, rc.reference_num_cpus, rc.reference_num_gpus),
                                 *((f"vllm{i}", True, rc.vllm_num_cpus, rc.vllm_num_gpus) for i in range(rc.vllm_engines))):
        if on and _bundle(cpus, gpus):
            index[name] = len(bundles)
            bundles.append(_bundle(cpus, gpus))
    pg = placement_group(bundles, strategy=rc.strategy)

    def in_bundle(name_or_rank: str | int) -> dict:
        i = index.get(name_or_rank) if isinstance(name_or_rank, str) else name_or_rank
        if i is None:
            return {}
        return {"scheduling_strategy": PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=i)}

    actors: list[Any] = []
    try:
        if not pg.wait(rc.placement_timeout_s):
            raise ConfigError(
                f"config keys 'ray.*': the cluster cannot place the bundles {bundles} (strategy {rc.strategy}) "
                f"within {rc.placement_timeout_s:g} s; it has {ray.cluster_resources()}")
        driver = driver_state()
        reward_actor = reference_actor = None
        vllm_engines: list = []
        if vllm_exe is not None:
            from alignkit.train.ray_vllm import start_engines

            vllm_engines = start_engines(ray, rc, vllm_exe, lambda i: in_bundle(f"vllm{i}"))
            actors += vllm_engines
        if rc.reward_actor:
            reward_cls = ray.remote(num_cpus=rc.reward_num_cpus, num_gpus=rc.reward_num_gpus)(RewardScorer)
            reward_actor = reward_cls.options(**in_bundle("reward")).remote(cfg.reward, cfg.world, driver)
            actors.append(reward_actor)
        if rc.reference_actor:
            ref_cls = ray.remote(num_cpus=rc.reference_num_cpus, num_gpus=rc.reference_num_gpus)(ReferenceHolder)
            reference_actor = ref_cls.options(**in_bundle("reference")).remote(
                getattr(cfg, "reference", None) or cfg.model.path, cfg.model.tokenizer or cfg.model.path,
                cfg.train.precision, driver)
            actors.append(reference_actor)
        trainer_cls = ray.remote(num_cpus=rc.num_cpus, num_gpus=rc.num_gpus)(Trainer)
        trainers = [trainer_cls.options(**in_bundle(r)).remote(r, rc.workers, driver) for r in range(rc.workers)]
        actors += trainers
        addresses = ray.get([t.address.remote() for t in trainers])
        ranks = local_ranks([a[0] for a in addresses], rc.num_gpus)
        refs = [t.run.remote(train, cfg, addresses[0], lr, reward_actor, reference_actor, vllm_engines)
                for t, lr in zip(trainers, ranks)]
        results = _wait_all(ray, refs)
        result = {k: v for k, v in results[0].items() if k != "vllm_push_ms"}
        placed = {"workers": rc.workers, "peak_mem_mb_per_rank": [r.get("peak_mem_mb") for r in results],
                  "reward_actor_rows": _actor_rows(ray, reward_actor),
                  "reference_actor_rows": _actor_rows(ray, reference_actor),
                  "vllm_engines": ray.get([e.served.remote() for e in vllm_engines]) or None,
                  "vllm_push_ms_per_rank": [r.get("vllm_push_ms") for r in results] if vllm_engines else None}
        result["ray"] = {k: v for k, v in placed.items() if v is not None and v != [None] * rc.workers}
        return result
    finally:
        for a in actors:
            ray.kill(a)
        remove_placement_group(pg)
        if owned:
            ray.shutdown()


def _wait_all(ray: Any, refs: list) -> list:
    """Every rank's result in rank order; the first rank that fails ends the wait (its peers would
    block in a collective) and its own exception is raised."""
    pending, t0 = list(refs), time.perf_counter()
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        try:
            ray.get(done[0])
        except ray.exceptions.RayTaskError as e:
            cause = getattr(e, "cause", None)
            rank = refs.index(done[0])
            print(f"alignkit: Ray trainer rank {rank} failed after {time.perf_counter() - t0:.0f} s", file=sys.stderr)
            raise (cause if isinstance(cause, Exception) else e) from e
    return ray.get(refs)
