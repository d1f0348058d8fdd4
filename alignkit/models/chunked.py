"""Log-probs of chosen tokens without the (tokens x vocabulary) logits tensor.

A causal LM's last step is `logits = head(hidden)`: (N, H) -> (N, V). At a 128k vocabulary and
thousands of tokens that tensor (and its float32 log-softmax and their gradients) is most of a
step's memory. Here the decoder runs once to the final hidden states, and the head, the optional
logit scaling / soft-capping and the logsumexp run over `chunk` tokens at a time; each chunk is
recomputed in the backward pass (`torch.utils.checkpoint`), so peak memory holds one
(chunk, V) block instead of (N, V), and grows with the hidden size, not with the vocabulary.
The numbers are the full path's: the same matmul, the same float32 logsumexp, per row.

Models it cannot split (a head that is not a plain `nn.Linear`, e.g. LoRA on `lm_head`; no
`get_decoder`; a class whose full forward disagrees with the split on a probe) go through the
full path, so callers never need to check. Legend: B batch, T tokens, H hidden, V vocabulary,
N scored tokens.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from alignkit.models.logprobs import position_ids_from_mask

DEFAULT_CHUNK = 1024
"""Tokens per LM-head chunk; 0 turns chunking off (full logits)."""

MAX_BLOCK = 2**25
"""Most logits in one chunk (128 MiB in float32): at a large vocabulary a chunk holds fewer
tokens than asked (256 at 128k), since the backward keeps a few (chunk, V) blocks alive at once."""

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Head:
    """The LM head as plain tensors plus the logit post-processing its config asks for."""

    weight: torch.Tensor
    """(V, H) output projection (the embedding matrix when tied)."""
    bias: torch.Tensor | None
    """(V,) or None."""
    scale: float = 1.0
    """Logits are multiplied by this (Cohere `logit_scale`, 1 / Granite `logits_scaling`)."""
    softcap: float | None = None
    """Gemma-2 style `cap * tanh(logits / cap)` when set."""

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(n, H) -> (n, V) exactly as the model's own head computes them."""
        z = nn.functional.linear(hidden, self.weight, self.bias)
        if self.scale != 1.0:
            z = z * self.scale
        if self.softcap:
            z = torch.tanh(z / self.softcap) * self.softcap
        return z


def unwrap(model: Any) -> Any:
    """The transformers model under DDP (`.module`) and peft (`get_base_model()`) wrappers."""
    model = getattr(model, "module", model)
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _is_ddp(model: Any) -> bool:
    return isinstance(model, nn.parallel.DistributedDataParallel)


def split_head(model: Any) -> tuple[Any, Head] | None:
    """(decoder, head) of a causal LM, or None when it cannot be split safely.

    peft injects LoRA layers into the decoder in place, so calling the unwrapped decoder runs
    the adapters (and `disable_adapter()` still switches them off).
    """
    core = unwrap(model)
    get_out, get_dec = getattr(core, "get_output_embeddings", None), getattr(core, "get_decoder", None)
    if not callable(get_out) or not callable(get_dec):
        return None
    lin = get_out()
    if type(lin) is not nn.Linear:  # LoRA-wrapped or custom head: its forward is more than a matmul
        return None
    if type(lin.weight).__name__ == "DTensor" or hasattr(lin.weight, "ds_id"):
        return None  # sharded (FSDP2, ZeRO-3): only the model's own forward gathers the head
    if any(type(p).__name__ == "DTensor" or hasattr(p, "ds_id") for p in core.parameters()):
        return None
    try:
        decoder = get_dec()
    except (AttributeError, NotImplementedError):
        return None
    if decoder is None or decoder is core:
        return None
    cfg = getattr(core, "config", None)
    scale = 1.0
    if getattr(cfg, "logit_scale", None):
        scale *= float(cfg.logit_scale)
    if getattr(cfg, "logits_scaling", None):
        scale /= float(cfg.logits_scaling)
    softcap = getattr(cfg, "final_logit_softcapping", None)
    return decoder, Head(lin.weight, lin.bias, scale, float(softcap) if softcap else None)


_VERIFIED: dict[type, bool] = {}


def _verified(model: Any) -> bool:
    """Whether this model class's full forward equals decoder + `Head` (checked once per class on
    a 6-token probe in eval mode); unknown post-processing of the logits shows up here."""
    core = unwrap(model)
    key = type(core)
    if key not in _VERIFIED:
        parts = split_head(core)
        ok = parts is not None
        if ok:
            decoder, head = parts
            ids = torch.arange(6, device=head.weight.device).unsqueeze(0) % head.weight.shape[0]
            mask = torch.ones_like(ids)
            flags = [(m, m.training) for m in core.modules()]
            core.eval()
            try:
                with torch.no_grad():
                    full = core(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
                    h = decoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
                    split = head.logits(h).float()
                ok = full.shape == split.shape and torch.allclose(full, split, rtol=1e-4, atol=1e-4)
            finally:
                for m, flag in flags:
                    m.training = flag
            if not ok:
                log.warning("%s: LM head does not split cleanly; log-probs use full logits", key.__name__)
        _VERIFIED[key] = ok
    return _VERIFIED[key]


def hidden_states(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor | None = None
) -> tuple[torch.Tensor, Head] | None:
    """(B, T, H) final hidden states and the head, or None (use the full path).

    A DDP-wrapped model is called through the wrapper (its gradient synchronisation hooks into
    the wrapper's forward) with the head's forward switched to the identity for the call, so
    its "logits" are the hidden states; a head with scaling or soft-capping then takes the full
    path, since the model would apply them to the hidden states.
    """
    parts = split_head(model)
    if parts is None or not _verified(model):
        return None
    decoder, head = parts
    if position_ids is None:
        position_ids = position_ids_from_mask(attention_mask)
    call = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    if not _is_ddp(model):
        return decoder(**call).last_hidden_state, head
    if head.scale != 1.0 or head.softcap:
        return None
    with _identity_head(unwrap(model).get_output_embeddings()):
        return model(**call).logits, head


@contextlib.contextmanager
def _identity_head(lin: nn.Linear):
    lin.forward = lambda x: x
    try:
        yield
    finally:
        del lin.forward


def _chunk_logprobs(hidden: torch.Tensor, targets: torch.Tensor, head: Head) -> torch.Tensor:
    logits = head.logits(hidden)  # (n, V)
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1).float()  # (n,)
    return picked - logits.float().logsumexp(-1)


def chunked_logprobs(hidden: torch.Tensor, targets: torch.Tensor, head: Head, chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """(N,) float32 log softmax(head(hidden[i]))[targets[i]], `chunk` rows at a time.

    hidden: (N, H), targets: (N,). With gradients on, each chunk is recomputed in the backward
    (so only one chunk's (chunk, V) blocks live at a time); the head weight's gradient sums over
    chunks. A chunk holds at most MAX_BLOCK // V tokens.
    """
    if len(hidden) == 0:
        return hidden.new_zeros(0, dtype=torch.float32)
    grad = torch.is_grad_enabled() and (hidden.requires_grad or head.weight.requires_grad)
    chunk = max(1, min(chunk, MAX_BLOCK // head.weight.shape[0]))
    parts = []
    for h, y in zip(hidden.split(chunk), targets.split(chunk)):
        if grad:
            parts.append(checkpoint(_chunk_logprobs, h, y, head, use_reentrant=False))
        else:
            parts.append(_chunk_logprobs(h, y, head))
    return torch.cat(parts)


def segment_sums(values: torch.Tensor, index: torch.Tensor, n: int) -> torch.Tensor:
    """(n,) sums of `values` (N,) grouped by `index` (N,) in [0, n), in the values' dtype.

    Accumulated in float64 (float32 on MPS, which has no float64): `index_add` adds one value at
    a time into its slot, so a float32 sum of 1,500 log-probs near -12 drifts by ~1e-2, ten
    times the rounding of the result itself; a DPO margin is a difference of four such sums.
    """
    wide = torch.float32 if values.device.type == "mps" else torch.float64
    out = torch.zeros(n, dtype=wide, device=values.device).index_add(0, index, values.to(wide))
    return out.to(values.dtype)


def chunked_entropy(hidden: torch.Tensor, head: Head, chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """(N,) float32 entropy of softmax(head(hidden[i])), without gradient (a metric)."""
    out = []
    with torch.no_grad():
        for h in hidden.split(chunk):
            lp = head.logits(h).float().log_softmax(-1)  # (n, V)
            out.append(-(lp.exp() * lp).sum(-1))
    return torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float32)


def scored_logprobs(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
    chunk: int = DEFAULT_CHUNK, position_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(N,) log-probs of the label tokens and (B, T) bool `keep` (position t scores token t+1,
    row-major order), through the chunked head; None when the model cannot be split or
    `chunk` is 0 (the caller takes its full-logits path)."""
    if chunk <= 0:
        return None
    got = hidden_states(model, input_ids, attention_mask, position_ids)
    if got is None:
        return None
    hidden, head = got  # (B, T, H)
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != -100
    targets = labels[:, 1:][keep[:, :-1]]  # (N,)
    return chunked_logprobs(hidden[keep], targets, head, chunk), keep


def sft_loss_of_model(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
    chunk: int = DEFAULT_CHUNK, position_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`losses.sft.sft_loss(model logits, labels)`: (summed response-token NLL, token count),
    with the head chunked when the model allows it (full logits otherwise)."""
    from alignkit.losses.sft import response_mask, sft_loss

    got = scored_logprobs(model, input_ids, attention_mask, labels, chunk, position_ids)
    if got is None:
        if position_ids is None:
            position_ids = position_ids_from_mask(attention_mask)
        logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       use_cache=False).logits
        return sft_loss(logits, labels)
    lp, _ = got
    return -lp.sum(), response_mask(labels).sum()
