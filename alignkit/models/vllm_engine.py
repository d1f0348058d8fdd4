"""vLLM as a rollout engine behind the Generator protocol, colocated with the trainer.

    gen = vllm_generator(policy, tokenizer)        # one engine per policy, started on first use
    out = gen.generate(prompt_ids, SamplingParams(max_new_tokens=32, seed=0))

The engine is built once from the policy (its config and weights saved to a temporary directory
that vLLM reads at start); afterwards, before every `generate`, the policy's current weights are
pushed into the engine in memory (no disk round trip), so a rollout always samples from the
policy as the last optimiser step left it. Only token ids come back: the trainer recomputes every
log-prob used in a loss. On CUDA the engine sleeps between rollouts (vLLM sleep mode, weights and
KV cache released) and wakes up for the next one; on CPU sleep mode does not exist and is skipped.

vLLM runs in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`) so the weight push is a plain
function call. `VLLMEngine` is the engine without a policy (start from a ModelSpec and weights,
load_weights, generate): the colocated generator and the Ray vLLM actors
(alignkit/train/ray_vllm.py) both drive it, so sampling maps the same way in both. Install: `bash scripts/setup_vllm_venv.sh` (CPU, its own venv) or see
docs/distributed-vllm.md for the CUDA build.
"""

from __future__ import annotations

import os
import tempfile
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from alignkit.models.generate import Generations, SamplingParams, _core_model, _eos_ids, check_request

INSTALL_HINT = (
    "rollout.engine=vllm needs the `vllm` package, which is not importable in this Python ({exe}). "
    "It needs its own environment (it pins its own torch): on CPU run `bash scripts/setup_vllm_venv.sh` "
    "and use /work/venvs/vllm/bin/python; on GPU `pip install vllm` in a fresh venv "
    "(docs/distributed-vllm.md). Or set rollout.engine=hf."
)


def import_vllm() -> Any:
    """The vllm module, configured to run in this process; a clear ImportError when it is absent."""
    import sys

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    if not torch.cuda.is_available():
        os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    try:
        import vllm
    except ImportError as e:
        raise ImportError(INSTALL_HINT.format(exe=sys.executable) + f" (import error: {e})") from e
    return vllm


def merged_state_dict(model: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs in the plain transformers layout vLLM loads. For a peft LoRA model each
    adapted weight is yielded as base + its active adapters' delta (computed, the model is not
    touched: merge/unmerge in place would drift the base weights by rounding), names without
    peft's `base_layer` / `modules_to_save` parts, adapter tensors left out."""
    core = _core_model(model)
    deltas = {}
    for mod_name, mod in core.named_modules():
        if hasattr(mod, "get_delta_weight") and hasattr(mod, "base_layer") and not getattr(mod, "merged", False):
            names = [a for a in getattr(mod, "active_adapters", []) if a in getattr(mod, "lora_A", {})]
            if names:
                deltas[f"{mod_name}.base_layer.weight"] = sum(mod.get_delta_weight(a) for a in names)
    for name, tensor in core.state_dict().items():
        if "lora_" in name or ".original_module." in name:
            continue
        if name in deltas:
            tensor = tensor + deltas[name].to(tensor.dtype)
        yield name.replace(".base_layer.", ".").replace(".modules_to_save.default.", "."), tensor


@dataclass(frozen=True)
class ModelSpec:
    """What an engine is started from besides the weights: plain JSON text and ids, so that it
    crosses processes and environments (a Ray vLLM actor runs its own Python and transformers)."""

    config_json: str
    """The model's config.json (the merged model's: a LoRA policy's base config)."""
    generation_json: str | None
    """Its generation_config.json, or None."""
    dtype: str
    """Parameter dtype without `torch.`, e.g. `float32`; vLLM runs in it."""
    eos_ids: tuple[int, ...]
    """Token ids that end a response (tokenizer's EOS, else the config's)."""


def model_spec(policy: Any, tokenizer: Any = None) -> ModelSpec:
    core = _core_model(policy)
    gen = getattr(core, "generation_config", None)
    return ModelSpec(core.config.to_json_string(), None if gen is None else gen.to_json_string(),
                     str(next(policy.parameters()).dtype).removeprefix("torch."), tuple(_eos_ids(policy, tokenizer)))


def policy_weights(policy: Any) -> list[tuple[str, torch.Tensor]]:
    """merged_state_dict as detached CPU tensors, ready to be sent to another process."""
    with torch.no_grad():
        return [(name, t.detach().to("cpu")) for name, t in merged_state_dict(policy)]


def _write_model_dir(path: str, spec: ModelSpec, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Config, generation config and weights in Hugging Face format, which vLLM reads at start."""
    from safetensors.torch import save_file

    Path(path, "config.json").write_text(spec.config_json)
    if spec.generation_json is not None:
        Path(path, "generation_config.json").write_text(spec.generation_json)
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in weights:
        if t.data_ptr() in seen:
            continue  # tied weights (lm_head = embed_tokens): vLLM ties them from the config
        seen.add(t.data_ptr())
        tensors[name] = t
    save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()},
              os.path.join(path, "model.safetensors"), metadata={"format": "pt"})


def _check_cpu_head_size(config: dict) -> None:
    """vLLM's CPU attention kernel supports only some head sizes; fail at start, not mid-rollout."""
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    head = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    sizes = CPUAttentionBackend.get_supported_head_sizes()
    if head not in sizes:
        raise ValueError(f"rollout.engine=vllm on CPU: the policy's attention head size is {head}, vLLM's CPU "
                         f"attention supports {sizes} (e.g. the `tiny` preset, not `nano`); use rollout.engine=hf")


class VLLMEngine:
    """One vLLM engine in this process, started from a ModelSpec and weights; it knows no policy.
    The colocated generator below and the Ray vLLM actor (alignkit/train/ray_vllm.py) both drive
    one: `load_weights` before a rollout, then `generate`.

    kv_cache_mb: KV-cache size on CPU (vLLM reserves it up front); gpu_memory_utilization: the
    share of GPU memory vLLM may take on CUDA; sleep: release weights and KV cache between
    rollouts on CUDA (ignored on CPU).
    """

    def __init__(
        self, spec: ModelSpec, weights: Iterable[tuple[str, torch.Tensor]], cuda: bool, kv_cache_mb: int = 64,
        gpu_memory_utilization: float = 0.3, sleep: bool = True, max_model_len: int | None = None,
    ):
        import json

        vllm = import_vllm()
        self.eos_ids = list(spec.eos_ids)
        self.cuda = cuda
        self.sleep_mode = sleep and cuda
        if not cuda:
            _check_cpu_head_size(json.loads(spec.config_json))
        self._dir = tempfile.TemporaryDirectory(prefix="alignkit-vllm-")
        _write_model_dir(self._dir.name, spec, weights)
        kwargs: dict[str, Any] = dict(
            model=self._dir.name, skip_tokenizer_init=True, dtype=spec.dtype, enforce_eager=True, seed=0,
            max_model_len=max_model_len,
        )
        if cuda:
            kwargs.update(gpu_memory_utilization=gpu_memory_utilization, enable_sleep_mode=self.sleep_mode)
        else:
            kwargs.update(kv_cache_memory_bytes=kv_cache_mb * 2**20)
        self.llm = vllm.LLM(**kwargs)
        self._vllm = vllm
        self._asleep = False
        if self.sleep_mode:
            self.llm.sleep(level=2)
            self._asleep = True

    def _worker(self) -> Any:
        return self.llm.llm_engine.model_executor.driver_worker.worker

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Replace the engine's weights in memory (woken up first when it sleeps)."""
        if self._asleep:
            self.llm.wake_up()
            self._asleep = False
        with torch.no_grad():
            self._worker().reload_weights(weights_iterator=iter(weights))

    def sampling_params(self, params: SamplingParams, row: int) -> Any:
        """vLLM's SamplingParams for prompt `row`: each row gets its own seed, so the G copies of
        one prompt in a GRPO group draw different samples: `row_seeds[row]` when the caller gives
        per-row seeds (the RL stages: then a row's tokens do not depend on which rank, engine or
        batch position draws it), else seed + row."""
        greedy = params.greedy or params.temperature == 0
        kw: dict[str, Any] = dict(max_tokens=params.max_new_tokens, detokenize=False)
        if greedy:
            kw.update(temperature=0.0)
        else:
            kw.update(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k if params.top_k > 0 else -1)
            if params.row_seeds is not None:
                kw["seed"] = int(params.row_seeds[row])
            elif params.seed is not None:
                kw["seed"] = params.seed + row
        if params.stop_at_eos and self.eos_ids:
            kw["stop_token_ids"] = list(self.eos_ids)
        else:
            kw["ignore_eos"] = True
        return self._vllm.SamplingParams(**kw)

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> Generations:
        """Sample from the weights loaded last (the caller has checked the request)."""
        if params.max_new_tokens == 0 or not prompts:
            return Generations([[] for _ in prompts], [False] * len(prompts))
        if self._asleep:
            self.llm.wake_up()
            self._asleep = False
        reqs = [{"prompt_token_ids": list(p)} for p in prompts]
        sps = [self.sampling_params(params, i) for i in range(len(prompts))]
        outs = self.llm.generate(reqs, sps, use_tqdm=False)
        ids, finished = [], []
        for o in outs:
            toks = list(o.outputs[0].token_ids)
            ids.append(toks)
            finished.append(bool(params.stop_at_eos and toks and toks[-1] in self.eos_ids))
        if self.sleep_mode:
            self.llm.sleep(level=2)
            self._asleep = True
        return Generations(ids, finished)


class VLLMGenerator:
    """A vLLM engine colocated with `policy` that samples from the policy's current weights
    (the policy's current weights are pushed in before every generate). Keyword arguments: VLLMEngine's."""

    def __init__(self, policy: Any, tokenizer: Any = None, **engine_kwargs: Any):
        import_vllm()
        self._policy = weakref.ref(policy)  # the engine cache must not keep the policy alive
        cuda = next(policy.parameters()).device.type == "cuda"
        with torch.no_grad():
            self.engine = VLLMEngine(model_spec(policy, tokenizer), merged_state_dict(policy), cuda, **engine_kwargs)
        self.eos_ids = self.engine.eos_ids
        self.llm = self.engine.llm

    @property
    def policy(self) -> Any:
        return self._policy()

    def sync_weights(self) -> None:
        """Push the policy's current weights into the engine, in memory."""
        with torch.no_grad():
            self.engine.load_weights(merged_state_dict(self.policy))

    def sampling_params(self, params: SamplingParams, row: int) -> Any:
        return self.engine.sampling_params(params, row)

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> Generations:
        check_request(prompts, params)
        if params.max_new_tokens == 0 or not prompts:
            return Generations([[] for _ in prompts], [False] * len(prompts))
        self.sync_weights()
        return self.engine.generate(prompts, params)


_ENGINES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def vllm_generator(policy: Any, tokenizer: Any = None, **kwargs: Any) -> VLLMGenerator:
    """The engine of `policy`, started on the first call and reused (weights re-synced) after."""
    gen = _ENGINES.get(policy)
    if gen is None:
        gen = VLLMGenerator(policy, tokenizer, **kwargs)
        _ENGINES[policy] = gen
    return gen
