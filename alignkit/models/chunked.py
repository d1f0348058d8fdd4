"""Log-probs of chosen tokens without the (tokens x vocabulary) logits tensor.

A causal LM's last step is `logits = head(hidden)`: (N, H) -> (N, V). At a 128k vocabulary and
thousands of tokens that tensor (and its float32 log-softmax and their gradients) is most of a
step's memory. Here the decoder runs once to the final hidden states, and the head, the optional
logit scaling / soft-capping and the logsumexp run over `chunk` tokens at a time; each chunk's
logits are recomputed once in a hand-written backward (`_HeadLogprobs`), so peak memory holds one
(chunk, V) block instead of (N, V), and grows with the hidden size, not with the vocabulary.
The numbers are the full path's: the same matmul, the same float32 logsumexp, per row.

Models it cannot split (a head that is not a plain `nn.Linear`, e.g. LoRA on `lm_head`; no
`get_decoder`; a class whose full forward disagrees with the split on a probe) go through the
full path, so callers never need to check. Legend: B batch, T tokens, H hidden, V vocabulary,
N scored tokens.
"""

from __future__ import annotations

import contextlib
import dataclasses
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
    temperature: float = 1.0
    """Logits are divided by this last (the RL stages' sampling temperature), as the full path does."""

    def logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """(n, H) -> (n, V) exactly as the model's own head computes them; with `out` ((>= n, V),
        the dtype of `hidden`) into its first n rows, unless autocast is on. The arithmetic is the
        same (`linear` is addmm, or mm without a bias, and the post-processing runs in place); a
        reused block saves a fresh (n, V) allocation, whose pages a CPU faults in anew each time
        (~60 ms per 128 MiB here)."""
        if out is not None and out.dtype == hidden.dtype and not torch.is_autocast_enabled(hidden.device.type):
            return self._logits_into(hidden, out[: len(hidden)])
        z = nn.functional.linear(hidden, self.weight, self.bias)
        if self.scale != 1.0:
            z = z * self.scale
        if self.softcap:
            z = torch.tanh(z / self.softcap) * self.softcap
        if self.temperature != 1.0:
            z = z / self.temperature
        return z

    def _logits_into(self, hidden: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        if self.bias is None:
            torch.mm(hidden, self.weight.t(), out=z)
        else:
            torch.addmm(self.bias, hidden, self.weight.t(), out=z)
        if self.scale != 1.0:
            z.mul_(self.scale)
        if self.softcap:
            z.div_(self.softcap).tanh_().mul_(self.softcap)
        if self.temperature != 1.0:
            z.div_(self.temperature)
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
    emb = core.get_input_embeddings() if callable(getattr(core, "get_input_embeddings", None)) else None
    for w in (lin.weight, getattr(emb, "weight", None)):
        if type(w).__name__ == "DTensor" or hasattr(w, "ds_id"):
            # sharded and not gathered (FSDP2 outside its root's forward, ZeRO-3): only the model's
            # own forward gathers the head. Blocks sharded as their own FSDP2 units gather themselves
            # (the RL stages call in here from inside their root's forward, `rl_shard.Entry`).
            return None
    if any(hasattr(p, "ds_id") for p in core.parameters()):
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
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None = None
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
    attention_mask = custom_mask_for(model, attention_mask)
    call = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    if not _is_ddp(model):
        return decoder(**call).last_hidden_state, head
    if head.scale != 1.0 or head.softcap:
        return None
    with _identity_head(unwrap(model).get_output_embeddings()):
        return model(**call).logits, head


CUSTOM_MASK_ATTENTION = ("sdpa", "eager")
"""Attention implementations that take a custom (B, 1, T, T) mask (`supports_custom_mask`)."""


def supports_custom_mask(model: Any) -> bool:
    """Whether the model's attention takes a custom 4-D mask such as `SharedPromptPairs`' (SDPA
    and eager do; FlashAttention and flex attention do not)."""
    impl = getattr(getattr(unwrap(model), "config", None), "_attn_implementation", None)
    return impl in CUSTOM_MASK_ATTENTION


def custom_mask_for(model: Any, mask: torch.Tensor | None) -> torch.Tensor | None:
    """A (B, 1, T, T) boolean mask (True: may attend) as the model's attention wants it: SDPA takes
    it as is, eager attention adds it to the scores (0 or the float32 minimum). 2-D masks and
    None pass through."""
    if mask is None or mask.dim() != 4 or mask.dtype != torch.bool:
        return mask
    if not supports_custom_mask(model):
        raise ValueError(f"{type(unwrap(model)).__name__}: a custom 4-D attention mask needs attention "
                         f"'sdpa' or 'eager' (attn_implementation)")
    impl = unwrap(model).config._attn_implementation
    if impl == "sdpa":
        return mask
    return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill_(
        ~mask, torch.finfo(torch.float32).min)


@contextlib.contextmanager
def _identity_head(lin: nn.Linear):
    lin.forward = lambda x: x
    try:
        yield
    finally:
        del lin.forward


def _entropy(z: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """(n,) entropy -sum_v q_v log q_v from finite float32 logits (n, V) and their logsumexp (n,),
    as `entropy_from_logits` (a linear head never gives the -inf logits it guards against)."""
    logq = z - lse.unsqueeze(-1)  # (n, V)
    return -(logq.exp() * logq).sum(-1)


def _lse_stats(z: torch.Tensor, targets: torch.Tensor, want_entropy: bool, spare: torch.Tensor | None = None):
    """(n,) log-probs of `targets`, (n,) logsumexp and, with `want_entropy`, (n,) entropies of
    float32 logits z (n, V), which it overwrites. The logsumexp is `torch.logsumexp`'s own
    arithmetic (amax, exp(z - max), sum, log, + max: bitwise the same, tested), with its
    exponentials kept for the entropy, log s - sum_v e_v d_v / s (d = z - max, e = exp(d),
    s = sum e): one (n, V) temporary (`spare`'s first n rows when given) instead of logsumexp's
    one plus the entropy's three, no cancellation of large logits, and float32 throughout (no
    matmul that autocast or TF32 would run in lower precision)."""
    picked = z.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (n,)
    m = z.amax(-1, keepdim=True)  # (n, 1)
    m.masked_fill_(m.abs() == float("inf"), 0)
    d = z.sub_(m)  # (n, V) in place: z - max
    if not want_entropy:
        e = d.exp_()
    else:
        e = d.exp() if spare is None else torch.exp(d, out=spare[: len(d)])
    s = e.sum(-1)  # (n,)
    log_s = s.log()
    lse = log_s + m.squeeze(-1)
    ent = None
    if want_entropy:
        # sum_v e_v d_v elementwise in place (a matmul would run in bf16 under autocast, in
        # TF32 where it is on); e is spent after this
        ent = log_s - e.mul_(d).sum(-1) / s
    return picked - lse, lse, ent


def _blocks(hidden: torch.Tensor, head: Head, chunk: int, dtype: torch.dtype, spare: bool) -> tuple:
    """A reusable (min(chunk, N), V) block in `dtype` for the chunks' logits (None under
    autocast, where the head's matmul picks its own dtype) and, with `spare`, a float32 one for
    the entropy's exponentials: a large vocabulary's blocks are allocated once per pass, not per
    chunk."""
    n, V = min(chunk, len(hidden)), head.weight.shape[0]
    autocast = torch.is_autocast_enabled(hidden.device.type)
    block = None if autocast else hidden.new_empty((n, V), dtype=dtype)
    return block, hidden.new_empty((n, V), dtype=torch.float32) if spare else None


class _HeadLogprobs(torch.autograd.Function):
    """Chunked log-probs (and, as a metric, entropies) with a hand-written backward.

    Forward: per chunk, logits z = post(h W^T + b) (`Head.logits`), lse = logsumexp(z) in
    float32, lp = z[y] - lse; only h, y and lse (N floats) are kept. Backward: per chunk the
    logits are recomputed once (one matmul) and

        dlp/dz = onehot(y) - softmax(z),   dz/da = scale / temperature * (1 - (v / cap)^2)

    (v = z * temperature, the capped value; the last factor only with soft-capping), then
    grad_h = g_a W and grad_W = g_a^T h: four head matmuls a step against the full path's three
    (which keeps the (N, V) logits for its backward), and no autograd graph per chunk. The matmuls
    run in the dtype the forward's logits had (bf16 under autocast), so the recomputed logits are
    the forward's; grad_W's per-chunk products are summed in float32. At a large vocabulary the
    elementwise passes over each (chunk, V) block cost as much as its matmul, so both directions
    reuse one block per pass (`_blocks`) and work in place (`_lse_stats`; the backward's
    exp / scale on the recomputed logits).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, head: Head, chunk: int, want_entropy: bool):
        lps, lses, ents = [], [], []
        block, spare = _blocks(hidden, head, chunk, hidden.dtype, want_entropy)
        for h, y in zip(hidden.split(chunk), targets.split(chunk)):
            logits = head.logits(h, block)  # (n, V)
            ctx.mm_dtype = logits.dtype
            z = logits.float() if logits.dtype != torch.float32 else logits  # overwritten below
            lp, lse, ent = _lse_stats(z, y, want_entropy, spare)
            lps.append(lp)
            lses.append(lse)
            if want_entropy:
                ents.append(ent)
        ctx.save_for_backward(hidden, weight, bias, targets, torch.cat(lses))
        ctx.head, ctx.chunk = head, chunk
        ent = torch.cat(ents) if want_entropy else hidden.new_zeros(0, dtype=torch.float32)
        ctx.mark_non_differentiable(ent)
        return torch.cat(lps), ent

    @staticmethod
    def backward(ctx, g_lp, g_ent):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        head, chunk, dt = ctx.head, ctx.chunk, ctx.mm_dtype
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        w = weight.to(dt)
        b = bias.to(dt) if bias is not None else None
        low = Head(w, b, head.scale, head.softcap, head.temperature)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        block, _ = _blocks(hidden, low, chunk, dt, spare=False)
        for i in range(0, len(hidden), chunk):
            h, y, g = hidden[i : i + chunk].to(dt), targets[i : i + chunk], g_lp[i : i + chunk].float()
            z = low.logits(h, block).float()  # (n, V), overwritten below
            cap = 1 - (z * (head.temperature / head.softcap)).square_() if head.softcap else None
            ga = z.sub_(lse[i : i + chunk].unsqueeze(-1)).exp_().mul_(-g.unsqueeze(-1))  # -g * softmax
            ga.scatter_add_(-1, y.unsqueeze(-1), g.unsqueeze(-1))  # + g * onehot
            factor = head.scale / head.temperature
            if cap is not None:
                ga.mul_(cap)
            if factor != 1.0:
                ga.mul_(factor)
            if need_b:
                grad_b += ga.sum(0)
            ga = ga.to(dt)
            if need_h:
                grad_h[i : i + chunk] = (ga @ w).to(hidden.dtype)
            if need_w and dt == torch.float32:
                grad_w.addmm_(ga.t(), h)
            elif need_w:  # in the logits' dtype, as the full path's product (tensor cores for bf16); summed in fp32
                grad_w.add_(ga.t() @ h)
        return (grad_h, None if grad_w is None else grad_w.to(weight.dtype),
                None if grad_b is None else grad_b.to(bias.dtype), None, None, None, None)


def chunked_logprobs(hidden: torch.Tensor, targets: torch.Tensor, head: Head, chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """(N,) float32 log softmax(head(hidden[i]))[targets[i]], `chunk` rows at a time.

    hidden: (N, H), targets: (N,). Only one (chunk, V) block lives at a time, forward and
    backward (`_HeadLogprobs`); the head weight's gradient sums over chunks. A chunk holds at
    most MAX_BLOCK // V tokens.
    """
    if len(hidden) == 0:
        return hidden.new_zeros(0, dtype=torch.float32)
    return _HeadLogprobs.apply(hidden, head.weight, head.bias, targets, head, capped(chunk, head), False)[0]


def capped(chunk: int, head: Head) -> int:
    """`chunk` tokens, at most MAX_BLOCK // V of them (V: the head's vocabulary)."""
    return max(1, min(chunk, MAX_BLOCK // head.weight.shape[0]))


def segment_sums(values: torch.Tensor, index: torch.Tensor, n: int) -> torch.Tensor:
    """(n,) sums of `values` (N,) grouped by `index` (N,) in [0, n), in the values' dtype.

    Accumulated in float64 (float32 on MPS, which has no float64): `index_add` adds one value at
    a time into its slot, so a float32 sum of 1,500 log-probs near -12 drifts by ~1e-2, ten
    times the rounding of the result itself; a DPO margin is a difference of four such sums.
    """
    wide = torch.float32 if values.device.type == "mps" else torch.float64
    out = torch.zeros(n, dtype=wide, device=values.device).index_add(0, index, values.to(wide))
    return out.to(values.dtype)


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


# ---------------------------------------------------------------------------------- RL passes
def _chunk_stats(hidden: torch.Tensor, targets: torch.Tensor, head: Head):
    """(n,) log-probs of `targets` and (n,) entropies of one chunk, both differentiable."""
    logits = head.logits(hidden)  # (n, V)
    z = logits.float()
    lse = z.logsumexp(-1)  # (n,)
    lp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1).float() - lse
    return lp, _entropy(z, lse)


def chunked_stats(
    hidden: torch.Tensor, targets: torch.Tensor, head: Head, chunk: int = DEFAULT_CHUNK, entropy_grad: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,) float32 log-probs of `targets` and (N,) entropies of softmax(head(hidden)), `chunk`
    rows at a time. The entropy is that of `losses.policy.entropy_from_logits`; it carries a
    gradient only with `entropy_grad` (then each chunk goes through `torch.utils.checkpoint`,
    otherwise through `_HeadLogprobs`, which returns the entropy as a metric)."""
    if len(hidden) == 0:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return empty, empty
    chunk = capped(chunk, head)
    if not entropy_grad:
        return _HeadLogprobs.apply(hidden, head.weight, head.bias, targets, head, chunk, True)
    grad = torch.is_grad_enabled() and (hidden.requires_grad or head.weight.requires_grad)
    lps, ents = [], []
    for h, y in zip(hidden.split(chunk), targets.split(chunk)):
        if grad:
            lp, ent = checkpoint(_chunk_stats, h, y, head, use_reentrant=False)
        else:
            lp, ent = _chunk_stats(h, y, head)
        lps.append(lp)
        ents.append(ent)
    return torch.cat(lps), torch.cat(ents)


@dataclass(frozen=True)
class ResponseStats:
    """Per-token numbers of the response tokens of [prompt; response] rows (see `response_stats`).

    Legend: B rows, T response columns (right-padded), H hidden size.
    """

    logprobs: torch.Tensor
    """(B, T) float32 log-probs of the response tokens (divided logits by the temperature); 0 on padding."""
    entropy: torch.Tensor | None
    """(B, T) float32 entropy of the next-token distribution, 0 on padding; None when not asked."""
    hidden: torch.Tensor
    """(B, T, H) final hidden state at the position predicting each response token (value heads read it)."""


def _grouped_hidden(
    model: Any, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, response_ids: torch.Tensor,
    response_mask: torch.Tensor,
) -> tuple[torch.Tensor, Head] | None:
    """(B, T, H) hidden states predicting the response tokens with each distinct prompt run once
    (its KV cache gathered back to its rows), as `train.rollout.grouped_response_logits` does
    for logits; None when the model cannot be split (or is DDP-wrapped: the RL stages are not)."""
    from alignkit.models.generate import cache_kwarg, distinct_prompts, new_kv_cache

    P, T = prompt_ids.shape[1], response_ids.shape[1]
    full_mask = torch.cat([prompt_mask.long(), response_mask.long()], dim=1)  # (B, L)
    distinct = distinct_prompts(prompt_ids, prompt_mask) if P else None
    if distinct is None:
        got = hidden_states(model, torch.cat([prompt_ids, response_ids], dim=1), full_mask)
        return None if got is None else (got[0][:, P - 1 : P - 1 + T], got[1])
    parts = split_head(model)
    if parts is None or _is_ddp(model) or not _verified(model):
        return None
    decoder, head = parts
    u_ids, u_mask, inverse = distinct  # (U, P), (U, P), (B,)
    kw, cache = cache_kwarg(decoder), new_kv_cache(model)  # filled in place by the prefill
    pre = decoder(input_ids=u_ids, attention_mask=u_mask, position_ids=position_ids_from_mask(u_mask),
                  use_cache=True, **{kw: cache}).last_hidden_state
    hidden = pre[:, -1:].index_select(0, inverse)  # (B, 1, H): column P-1 predicts token 0
    if T > 1:
        cache.reorder_cache(inverse)  # (U, ...) -> (B, ...) per layer, differentiable
        mask = full_mask[:, : P + T - 1]  # the last response token predicts nothing
        out = decoder(input_ids=response_ids[:, :-1], attention_mask=mask,
                      position_ids=position_ids_from_mask(mask)[:, P:], use_cache=True, **{kw: cache})
        hidden = torch.cat([hidden, out.last_hidden_state], dim=1)  # (B, T, H)
    return hidden, head


def response_stats(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_ids: torch.Tensor, *,
    temperature: float = 1.0, chunk: int = DEFAULT_CHUNK, entropy: bool = False, entropy_grad: bool = False,
    share_prompt_prefix: bool = False,
) -> ResponseStats | None:
    """Log-probs (and entropies) of the response tokens through the chunked head, or None when
    `chunk` is 0 or the model cannot be split (the caller takes its full-logits path).

    input_ids, attention_mask: (B, L) = [left-padded prompt (P); right-padded response (T)];
    response_ids: (B, T), the last T columns of `input_ids`. Only the response tokens (mask 1)
    go through the head. `share_prompt_prefix` runs each distinct prompt once (`_grouped_hidden`).
    """
    if chunk <= 0:
        return None
    T = response_ids.shape[1]
    P = input_ids.shape[1] - T
    r_mask = attention_mask[:, P:]  # (B, T)
    if share_prompt_prefix:
        got = _grouped_hidden(model, input_ids[:, :P], attention_mask[:, :P], response_ids, r_mask)
    else:
        got = hidden_states(model, input_ids, attention_mask)
        got = None if got is None else (got[0][:, P - 1 : P - 1 + T], got[1])
    if got is None:
        return None
    hidden, head = got  # (B, T, H)
    if temperature != 1.0:
        head = dataclasses.replace(head, temperature=temperature)
    keep = r_mask.bool()  # (B, T)
    if entropy:
        lp, ent = chunked_stats(hidden[keep], response_ids[keep], head, chunk, entropy_grad)
    else:  # no (n, V) entropy arithmetic for a pass that drops it (the reference's)
        lp, ent = chunked_logprobs(hidden[keep], response_ids[keep], head, chunk), None
    zeros = torch.zeros(keep.shape, dtype=torch.float32, device=hidden.device)
    return ResponseStats(
        logprobs=zeros.index_put((keep,), lp),
        entropy=zeros.index_put((keep,), ent) if entropy else None,
        hidden=hidden,
    )


# ---------------------------------------------------------------------------------- scoring
def sums_by_sequence(
    token_values: torch.Tensor, keep: torch.Tensor, seq_index: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(S,) sums of per-token values (N,) and (S,) token counts per sequence.

    keep: (R, T) bool, True at the positions whose values `token_values` holds (row-major).
    seq_index: (R * T,) the sequence of each position of a packed batch (R = 1); None: a
    sequence is a row (S = R).
    """
    if seq_index is None:
        slot, n = keep.nonzero()[:, 0], keep.shape[0]  # (N,) row of each scored token
    else:
        slot, n = seq_index[keep.reshape(-1)], (int(seq_index[-1]) + 1 if len(seq_index) else 0)
    return segment_sums(token_values, slot, n), torch.bincount(slot, minlength=n)


def sequence_sums(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, labels: torch.Tensor,
    chunk: int = DEFAULT_CHUNK, position_ids: torch.Tensor | None = None, seq_index: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(S,) summed log-probs of each sequence's label tokens and (S,) their counts through the
    chunked head (a sequence is a row, or with `seq_index` a packed sequence, `sums_by_sequence`);
    None when `chunk` is 0 or the model cannot be split (the caller's full path)."""
    got = scored_logprobs(model, input_ids, attention_mask, labels, chunk, position_ids)
    if got is None:
        return None
    token_lp, keep = got  # (N,), (R, T)
    return sums_by_sequence(token_lp, keep, seq_index)


def last_token_logprobs(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, chunk: int = DEFAULT_CHUNK
) -> torch.Tensor | None:
    """(B, V) float32 log-softmax of the next-token distribution after the last column of
    left-padded rows, the head run on that column only, `chunk` rows at a time; None when
    `chunk` is 0 or the model cannot be split."""
    if chunk <= 0:
        return None
    got = hidden_states(model, input_ids, attention_mask)
    if got is None:
        return None
    hidden, head = got
    return torch.cat([head.logits(h).float().log_softmax(-1) for h in hidden[:, -1].split(chunk)])
