"""The frozen reference model of DPO-style training, kept cheap: three interchangeable modes.

DPO's implicit reward is beta * (log pi(y|x) - log pi_ref(y|x)) (Rafailov et al. 2023, Eq. 5),
so every step needs the reference log-probs of the batch's responses. Three ways to get them,
chosen by config, all giving the same numbers on the same data (tests/test_dpo.py checks it):

  "copy"         a second, frozen copy of the reference model (eval mode, requires_grad False,
                 forward under no_grad). Memory: one more model; time: one more forward per step.
  "precomputed"  one pass over the data before training computes the reference log-prob of every
                 sequence, cached on disk under a key (`cache_key`) built from a fingerprint of
                 the reference model, of the tokenised data and of the log-prob normalisation.
                 A later run with the same key reads the file and never loads the model. During
                 training no reference model is in memory: the collate looks the values up by
                 dataset index and the batch carries them.
  "lora"         the policy is the reference plus LoRA adapters; the reference is the same
                 weights with the adapter switched off (`with model.disable_adapter():` under
                 no_grad). No second copy; the base weights are frozen anyway.

Losses that need no reference (SimPO, ORPO) use `NoReference`.

Every mode goes through `response_logps`, so their numbers agree: the rows' summed (or
per-token averaged) log-probs of the label tokens, with only the response positions projected
through the LM head.

Legend: R rows (sequences) of a batch, T tokens, V vocabulary, N response tokens in a batch.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import json
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from alignkit.atomic import share_tree
from alignkit.data.batching import collate_preference, collate_sft
from alignkit.data.packing import collate_shared_prompt, shared_prompt_is_cheaper
from alignkit.data.tokenize import TokenizedPair, TokenizedSFT
from alignkit.models.chunked import DEFAULT_CHUNK, custom_mask_for, sequence_sums, sums_by_sequence
from alignkit.models.logprobs import position_ids_from_mask

CACHE_FORMAT = 1
"""Bumped whenever the cached numbers could change for the same key (e.g. a new log-prob path)."""

Sequences = Sequence[tuple[Sequence[int], Sequence[int]]]
"""(prompt_ids, response_ids) per dataset index."""


def _core(model: Any) -> Any:
    """The transformers model under DDP (`.module`) and peft (`get_base_model()`) wrappers."""
    model = getattr(model, "module", model)
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


_NO_MASK_KEEP: set[type] = set()  # model classes whose forward took logits_to_keep but not a mask


@functools.cache
def _accepts_logits_to_keep(forward_type: type) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(forward_type.forward).parameters
    except (TypeError, ValueError):
        return False


def response_logps(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    labels: torch.Tensor,
    chunk_tokens: int = 8192,
    logprob_chunk: int = DEFAULT_CHUNK,
    position_ids: torch.Tensor | None = None,
    seq_index: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-prob of each sequence's label tokens, and their count: log pi(y | x) of DPO.

        sums[r] = sum_{t: labels[r, t+1] != -100} log softmax(logits[r, t])[labels[r, t+1]]

    Only the N positions whose next token is a label go through the LM head (transformers'
    boolean `logits_to_keep`), so prompt and padding positions cost no (T, V) logits at all;
    a model that does not take `logits_to_keep` falls back to full logits, then selects.
    Position ids come from the mask, so the padding side does not matter. The logsumexp runs
    over at most `chunk_tokens` rows of (N, V) at a time, in float32. With `logprob_chunk` > 0
    (and a model whose head splits off, `alignkit.models.chunked`) the (N, V) logits are never
    built at all: the head runs `logprob_chunk` tokens at a time, forward and backward.

    Args:
        model: a causal LM (possibly wrapped in DDP / peft); called through its own forward.
        input_ids, attention_mask, labels: (R, T); labels -100 on prompt and padding.
        position_ids, seq_index: a packed batch (`alignkit.data.packing.PackedBatch`): one row
            (R = 1), `attention_mask` None, positions restarting at each sequence (attention is
            then block-diagonal), and the (T,) sequence of each token; sums are per sequence.

    Returns:
        sums (S,) float32 with gradient when enabled, counts (S,) int64; S = R, or the number of
        packed sequences.
    """
    chunked = sequence_sums(model, input_ids, attention_mask, labels, logprob_chunk, position_ids, seq_index)
    if chunked is not None:
        return chunked
    keep = torch.zeros_like(labels, dtype=torch.bool)  # (R, T): position t scores token t+1
    keep[:, :-1] = labels[:, 1:] != -100
    targets = labels[:, 1:][keep[:, :-1]]  # (N,)
    core_type = type(_core(model))
    if position_ids is None:
        position_ids = position_ids_from_mask(attention_mask)
    call = dict(input_ids=input_ids, attention_mask=custom_mask_for(model, attention_mask), position_ids=position_ids,
                use_cache=False)
    logits = None
    if _accepts_logits_to_keep(core_type) and core_type not in _NO_MASK_KEEP:
        try:
            logits = model(**call, logits_to_keep=keep).logits
        except (IndexError, TypeError, RuntimeError):
            # a boolean (R, T) logits_to_keep is recent in transformers (5.17 rejects it): full logits
            _NO_MASK_KEEP.add(core_type)
    if logits is None:
        logits = model(**call).logits
    if logits.dim() == 3:  # no compact head: (R, T, V) -> (N, V)
        logits = logits[keep]
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1).float()  # (N,)
    lse = torch.cat([c.float().logsumexp(-1) for c in logits.split(chunk_tokens)]) if len(logits) else picked
    return sums_by_sequence(picked - lse, keep, seq_index)


def normalise(sums: torch.Tensor, counts: torch.Tensor, average: bool) -> torch.Tensor:
    """(R,) summed log-probs, or per-token averages when `average` (a row without tokens gives 0)."""
    return sums / counts.clamp(min=1) if average else sums


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put `model` in eval mode for the block and restore each module's own flag after."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode and requires_grad False on every parameter; returns the model."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class Reference(Protocol):
    """Where a step's reference log-probs come from."""

    mode: str

    def logps(
        self,
        policy: Any,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        cached: torch.Tensor | None,
        position_ids: torch.Tensor | None = None,
        seq_index: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """(S,) detached reference log-probs of the sequences (normalised as configured), or None
        when the loss needs none. `cached` is what the batch carries (precomputed mode);
        `position_ids` / `seq_index` describe a packed batch (see `response_logps`)."""
        ...


class NoReference:
    """For reference-free losses (SimPO, ORPO): nothing is computed or stored."""

    mode = "none"

    def logps(self, policy, input_ids, attention_mask, labels, cached, position_ids=None, seq_index=None) -> None:
        return None


class CopyReference:
    """A separate frozen model; it follows the batch to its device on first use."""

    mode = "copy"

    def __init__(self, model: nn.Module, average: bool = False, logprob_chunk: int = DEFAULT_CHUNK):
        self.model = freeze(model)
        self.average = average
        self.logprob_chunk = logprob_chunk

    def logps(self, policy, input_ids, attention_mask, labels, cached, position_ids=None, seq_index=None) -> torch.Tensor:
        first = next(self.model.parameters())
        if first.device != input_ids.device:
            self.model.to(input_ids.device)
        with torch.no_grad():
            sums, counts = response_logps(self.model, input_ids, attention_mask, labels, logprob_chunk=self.logprob_chunk,
                                          position_ids=position_ids, seq_index=seq_index)
        return normalise(sums, counts, self.average)


class LoraReference:
    """The policy's own weights with its LoRA adapter disabled: the base model, no copy."""

    mode = "lora"

    def __init__(self, average: bool = False, logprob_chunk: int = DEFAULT_CHUNK):
        self.average = average
        self.logprob_chunk = logprob_chunk

    def logps(self, policy, input_ids, attention_mask, labels, cached, position_ids=None, seq_index=None) -> torch.Tensor:
        raw = getattr(policy, "module", policy)  # around DDP: no gradient, so no sync needed
        if not hasattr(raw, "disable_adapter"):
            raise TypeError("reference mode 'lora' needs a peft model (set model.lora_r > 0)")
        with torch.no_grad(), raw.disable_adapter(), eval_mode(raw):
            sums, counts = response_logps(raw, input_ids, attention_mask, labels, logprob_chunk=self.logprob_chunk,
                                          position_ids=position_ids, seq_index=seq_index)
        return normalise(sums, counts, self.average)


class PrecomputedReference:
    """Reference log-probs read from the batch (attached by the collate from the cached table)."""

    mode = "precomputed"

    def __init__(self, table: Mapping[str, torch.Tensor]):
        self.table = dict(table)

    def lookup(self, column: str, indices: Sequence[int]) -> torch.Tensor:
        """(len(indices),) cached values of `column` at these dataset indices."""
        return self.table[column][torch.as_tensor(list(indices), dtype=torch.long)]

    def logps(self, policy, input_ids, attention_mask, labels, cached, position_ids=None, seq_index=None) -> torch.Tensor:
        if cached is None:
            raise ValueError(
                "reference mode 'precomputed': the batch carries no reference log-probs "
                "(build batches with the stage's collate, which attaches them by dataset index)"
            )
        return cached.to(input_ids.device)


# --- fingerprints and the on-disk cache -------------------------------------------------------


def _hash_file(h: Any, path: Path) -> None:
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)


def fingerprint_files(path: str | os.PathLike) -> str:
    """Hex digest of a model directory: every regular file's relative name and bytes (weights,
    config, tokenizer), in sorted order; hidden files are skipped. Reads the files, never loads
    the model."""
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"reference model directory does not exist: {root}")
    h = hashlib.sha256(b"alignkit-model-files")
    for p in sorted(q for q in root.rglob("*") if q.is_file()):
        rel = p.relative_to(root).as_posix()
        if any(part.startswith(".") for part in rel.split("/")):
            continue
        h.update(rel.encode() + b"\0")
        _hash_file(h, p)
        h.update(b"\0")
    return h.hexdigest()


def fingerprint_model(model: nn.Module) -> str:
    """Hex digest of an in-memory model: its config (if any) and every tensor of its state dict
    (name, dtype, shape, bytes)."""
    h = hashlib.sha256(b"alignkit-model-state")
    config = getattr(_core(model), "config", None)
    if config is not None and hasattr(config, "to_json_string"):
        h.update(config.to_json_string(use_diff=False).encode())
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        flat = t.detach().cpu().contiguous().reshape(-1)
        h.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return h.hexdigest()


def fingerprint_sequences(columns: Mapping[str, Sequences]) -> str:
    """Hex digest of the tokenised data: each column's name and its (prompt, response) ids in
    dataset order, so a change of data, order, tokenizer or truncation changes it."""
    h = hashlib.sha256(b"alignkit-sequences")
    for name in sorted(columns):
        h.update(f"[{name}:{len(columns[name])}]".encode())
        for prompt, response in columns[name]:
            h.update(json.dumps([list(prompt), list(response)], separators=(",", ":")).encode())
    return h.hexdigest()


def cache_key(model_fp: str, data_fp: str, average: bool, precision: str) -> str:
    """The cache key: reference model + data + log-prob normalisation + compute precision."""
    norm = "mean" if average else "sum"
    text = f"v{CACHE_FORMAT}|model={model_fp}|data={data_fp}|logps={norm}|precision={precision}"
    return hashlib.sha256(text.encode()).hexdigest()


def cache_path(cache_dir: str | os.PathLike, key: str) -> Path:
    """Where the table of `key` lives."""
    return Path(cache_dir) / f"ref-logps-{key[:24]}.safetensors"


def _write_table(path: Path, table: Mapping[str, torch.Tensor], meta: Mapping[str, str]) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in table.items()}, tmp, metadata=dict(meta))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        share_tree(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_table(path: str | os.PathLike, key: str, sizes: Mapping[str, int]) -> dict[str, torch.Tensor] | None:
    """The cached table at `path` if it holds `key` with the expected column sizes, else None."""
    from safetensors import safe_open

    p = Path(path)
    if not p.is_file():
        return None
    try:
        with safe_open(str(p), framework="pt") as f:
            if (f.metadata() or {}).get("key") != key or set(f.keys()) != set(sizes):
                return None
            table = {k: f.get_tensor(k) for k in f.keys()}
    except Exception:  # a damaged file is a miss; it is rewritten atomically below
        return None
    if any(table[k].shape != (n,) for k, n in sizes.items()):
        return None
    return table


def precompute_logps(
    model: nn.Module,
    columns: Mapping[str, Sequences],
    pad_id: int,
    average: bool,
    batch_size: int = 64,
    device: torch.device | str | None = None,
    autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
    progress: bool = False,
    logprob_chunk: int = DEFAULT_CHUNK,
    share_prompt: tuple[int, int] | None = None,
) -> dict[str, torch.Tensor]:
    """One no_grad, eval-mode pass: the reference log-prob of every sequence of every column.

    Rows of all columns are sorted by length and batched `batch_size` at a time (little padding).
    Returns column -> (n,) float32 tensor in dataset order, normalised as `average` says.
    With `share_prompt` = (hidden, intermediate size) and the preference columns (chosen and
    rejected of the same prompts), each pair's prompt runs once where that is less arithmetic
    (`alignkit.data.packing.SharedPromptPairs`), `batch_size` // 2 pairs a forward.
    """
    if share_prompt is not None and _paired(columns):
        return _precompute_pairs(model, columns, pad_id, average, max(1, batch_size // 2), device, autocast,
                                 progress, logprob_chunk, share_prompt)
    rows = [(name, i, p, r) for name, seqs in columns.items() for i, (p, r) in enumerate(seqs)]
    rows.sort(key=lambda x: len(x[2]) + len(x[3]))
    table = {name: torch.zeros(len(seqs), dtype=torch.float32) for name, seqs in columns.items()}

    def collate(chunk):
        b = collate_sft([TokenizedSFT(list(p), list(r)) for _, _, p, r in chunk], pad_id)
        return dict(input_ids=b.input_ids, attention_mask=b.attention_mask, labels=b.labels)

    def store(chunk, values):
        for (name, i, _, _), v in zip(chunk, values):
            table[name][i] = v

    batches = [rows[s : s + batch_size] for s in range(0, len(rows), batch_size)]
    _score_batches(model, batches, collate, store, average, device, autocast, progress, logprob_chunk)
    return table


def _score_batches(model: nn.Module, batches: Sequence[Any], collate: Callable[[Any], dict[str, torch.Tensor]],
                   store: Callable[[Any, torch.Tensor], None], average: bool, device: Any, autocast: Any,
                   progress: bool, logprob_chunk: int) -> None:
    """The no_grad, eval-mode loop of `precompute_logps`: each batch collated to `response_logps`'
    keyword tensors, moved to `device` (None: the model's), scored, normalised as `average` says and
    handed to `store(batch, (n,) float32 values)` on the CPU."""
    from alignkit.console import Progress

    if device is None:
        device = next(model.parameters()).device
    ctx = autocast or contextlib.nullcontext
    bar = Progress(len(batches), enabled=progress, unit="reference log-prob batch")
    with torch.no_grad(), eval_mode(model):
        for batch in batches:
            rows = {k: v.to(device) for k, v in collate(batch).items()}
            with ctx():
                sums, counts = response_logps(model, **rows, logprob_chunk=logprob_chunk)
            store(batch, normalise(sums, counts, average).float().cpu())
            bar.update(1)
    bar.close()


def _paired(columns: Mapping[str, Sequences]) -> bool:
    """True for DPO's preference columns: chosen and rejected, the same prompt at every index."""
    if set(columns) != {"chosen", "rejected"} or len(columns["chosen"]) != len(columns["rejected"]):
        return False
    return all(list(c[0]) == list(r[0]) for c, r in zip(columns["chosen"], columns["rejected"]))


def _precompute_pairs(model, columns, pad_id, average, pairs_per_batch, device, autocast, progress, logprob_chunk,
                      share_prompt) -> dict[str, torch.Tensor]:
    """`precompute_logps` over pairs, each batch in the prompt-sharing layout where it is cheaper."""
    pairs = [TokenizedPair(list(c[0]), list(c[1]), list(r[1])) for c, r in zip(columns["chosen"], columns["rejected"])]
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i].prompt_ids) + len(pairs[i].chosen_ids)
                   + len(pairs[i].rejected_ids))
    table = {name: torch.zeros(len(pairs), dtype=torch.float32) for name in columns}

    def collate(idx):
        items = [pairs[i] for i in idx]
        if shared_prompt_is_cheaper(items, *share_prompt):
            b = collate_shared_prompt(items, pad_id)
            return dict(input_ids=b.input_ids, attention_mask=b.attention_mask, labels=b.labels,
                        position_ids=b.position_ids, seq_index=b.seq_index)
        b = collate_preference(items, pad_id)
        return dict(input_ids=b.input_ids, attention_mask=b.attention_mask, labels=b.labels)

    def store(idx, values):  # (2B,): chosen, then rejected
        index = torch.tensor(idx)
        table["chosen"][index], table["rejected"][index] = values[: len(idx)], values[len(idx) :]

    batches = [order[s : s + pairs_per_batch] for s in range(0, len(order), pairs_per_batch)]
    _score_batches(model, batches, collate, store, average, device, autocast, progress, logprob_chunk)
    return table


def load_or_precompute(
    cache_dir: str | os.PathLike,
    key: str,
    sizes: Mapping[str, int],
    compute: Callable[[], Mapping[str, torch.Tensor]],
    meta: Mapping[str, str] | None = None,
    write: bool = True,
) -> tuple[dict[str, torch.Tensor], bool]:
    """The cached table for `key`, or `compute()` written atomically to the cache.

    `compute` (which needs the reference model) runs only on a miss, so a run that finds the
    cache never builds or loads the model. Returns (table, hit). With `write=False` (non-main
    processes) a miss computes but does not write.
    """
    path = cache_path(cache_dir, key)
    table = read_table(path, key, sizes)
    if table is not None:
        return table, True
    table = {k: v.detach().float().cpu() for k, v in compute().items()}
    for name, n in sizes.items():
        if name not in table or table[name].shape != (n,):
            raise ValueError(f"reference table column {name!r} must have shape ({n},)")
    if write:
        _write_table(path, table, {**(meta or {}), "key": key})
    return table, False
