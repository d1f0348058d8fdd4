"""Typed batches, collators and length-bucketed batching.

Legend: B is the number of examples (pairs for preference data), T the padded length.
All id tensors are int64. `labels` follows the Hugging Face convention: the token id where the
loss applies and -100 elsewhere, UNshifted (the loss shifts, see `alignkit.losses.sft`).

Padding side: training batches are right-padded; prompt batches for generation are left-padded
so every row's last prompt token sits at the same position. `alignkit.models.logprobs` passes
position ids derived from the mask, so either side gives the same log-probs.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

import torch

from alignkit.data.tokenize import TokenizedPair, TokenizedPrompt, TokenizedSFT, TokenizedUnpaired

IGNORE_INDEX = -100


def _to(batch, device):
    return replace(
        batch,
        **{
            f.name: getattr(batch, f.name).to(device)
            for f in fields(batch)
            if isinstance(getattr(batch, f.name), torch.Tensor)
        },
    )


@dataclass(frozen=True)
class SFTBatch:
    """A right-padded batch of prompt + response sequences.

    input_ids: (B, T) prompt ids, response ids, then pad ids.
    attention_mask: (B, T) 1 on real tokens, 0 on padding.
    labels: (B, T) the input id on response tokens (EOS included), -100 on prompt and padding.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    def to(self, device) -> SFTBatch:
        return _to(self, device)


@dataclass(frozen=True)
class PreferenceBatch:
    """Chosen and rejected sequences stacked into one tensor, so the policy runs one forward.

    input_ids: (2B, T) rows 0..B-1 are prompt + chosen, rows B..2B-1 prompt + rejected
        (row i and row B+i belong to pair i); right-padded.
    attention_mask: (2B, T) 1 on real tokens, 0 on padding.
    labels: (2B, T) the input id on response tokens, -100 on prompt and padding.
    margin: (B,) float preference strength, or None when no pair has one (missing ones are 0).
    soft_label: (B,) float P(chosen better), or None when no pair has one (missing ones are 1).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    margin: torch.Tensor | None = None
    soft_label: torch.Tensor | None = None

    @property
    def num_pairs(self) -> int:
        return self.input_ids.shape[0] // 2

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Split a (2B, ...) result of the stacked forward into its (B, ...) chosen and rejected halves."""
        return x[: self.num_pairs], x[self.num_pairs :]

    def to(self, device) -> PreferenceBatch:
        return _to(self, device)


@dataclass(frozen=True)
class UnpairedBatch:
    """A right-padded batch of prompt + completion with a thumbs up or down (KTO).

    input_ids, attention_mask, labels: (B, T) as in `SFTBatch`.
    desirable: (B,) bool.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    desirable: torch.Tensor

    def to(self, device) -> UnpairedBatch:
        return _to(self, device)


@dataclass(frozen=True)
class PromptBatch:
    """Prompts LEFT-padded for generation: new tokens append at column T for every row.

    input_ids: (B, T) pad ids, then prompt ids.
    attention_mask: (B, T) 0 on padding, 1 on prompt tokens.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    def to(self, device) -> PromptBatch:
        return _to(self, device)


def _padded_len(lengths: Sequence[int], pad_to_multiple_of: int | None) -> int:
    t = max(lengths)
    if pad_to_multiple_of:
        t = -(-t // pad_to_multiple_of) * pad_to_multiple_of
    return t


def _pad_rows(
    prompts: Sequence[list[int]], responses: Sequence[list[int]], pad_id: int, pad_to_multiple_of: int | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad prompt + response rows; labels keep only the response ids."""
    t = _padded_len([len(p) + len(r) for p, r in zip(prompts, responses)], pad_to_multiple_of)
    n = len(prompts)
    input_ids = torch.full((n, t), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n, t), dtype=torch.long)
    labels = torch.full((n, t), IGNORE_INDEX, dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        lp, lr = len(p), len(r)
        input_ids[i, : lp + lr] = torch.tensor(p + r, dtype=torch.long)
        attention_mask[i, : lp + lr] = 1
        labels[i, lp : lp + lr] = torch.tensor(r, dtype=torch.long)
    return input_ids, attention_mask, labels


def collate_sft(
    items: Sequence[TokenizedSFT], pad_id: int, pad_to_multiple_of: int | None = None
) -> SFTBatch:
    """Stack tokenised SFT examples into a right-padded `SFTBatch`."""
    if not items:
        raise ValueError("collate_sft got an empty batch")
    ids, mask, labels = _pad_rows(
        [x.prompt_ids for x in items], [x.response_ids for x in items], pad_id, pad_to_multiple_of
    )
    return SFTBatch(ids, mask, labels)


def _optional_floats(values: Sequence[float | None], default: float) -> torch.Tensor | None:
    if all(v is None for v in values):
        return None
    return torch.tensor([default if v is None else float(v) for v in values], dtype=torch.float32)


def collate_preference(
    items: Sequence[TokenizedPair], pad_id: int, pad_to_multiple_of: int | None = None
) -> PreferenceBatch:
    """Stack pairs into one `PreferenceBatch`: all chosen rows first, then all rejected rows."""
    if not items:
        raise ValueError("collate_preference got an empty batch")
    prompts = [x.prompt_ids for x in items] * 2
    responses = [x.chosen_ids for x in items] + [x.rejected_ids for x in items]
    ids, mask, labels = _pad_rows(prompts, responses, pad_id, pad_to_multiple_of)
    return PreferenceBatch(
        ids,
        mask,
        labels,
        margin=_optional_floats([x.margin for x in items], 0.0),
        soft_label=_optional_floats([x.soft_label for x in items], 1.0),
    )


def collate_unpaired(
    items: Sequence[TokenizedUnpaired], pad_id: int, pad_to_multiple_of: int | None = None
) -> UnpairedBatch:
    """Stack unpaired examples into a right-padded `UnpairedBatch`."""
    if not items:
        raise ValueError("collate_unpaired got an empty batch")
    ids, mask, labels = _pad_rows(
        [x.prompt_ids for x in items], [x.completion_ids for x in items], pad_id, pad_to_multiple_of
    )
    desirable = torch.tensor([bool(x.desirable) for x in items], dtype=torch.bool)
    return UnpairedBatch(ids, mask, labels, desirable)


def collate_prompts(
    items: Sequence[TokenizedPrompt], pad_id: int, pad_to_multiple_of: int | None = None
) -> PromptBatch:
    """Stack prompts into a LEFT-padded `PromptBatch` for generation."""
    if not items:
        raise ValueError("collate_prompts got an empty batch")
    t = _padded_len([len(x.prompt_ids) for x in items], pad_to_multiple_of)
    input_ids = torch.full((len(items), t), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(items), t), dtype=torch.long)
    for i, x in enumerate(items):
        n = len(x.prompt_ids)
        if n:
            input_ids[i, t - n :] = torch.tensor(x.prompt_ids, dtype=torch.long)
            attention_mask[i, t - n :] = 1
    return PromptBatch(input_ids, attention_mask)


def bucketed_batches(
    lengths: Sequence[int],
    batch_size: int,
    seed: int,
    epoch: int,
    bucket_size_multiplier: int = 50,
    shuffle: bool = True,
) -> list[list[int]]:
    """Batches of indices that group similar lengths, so little compute is spent on padding.

    Shuffle all indices (seeded by `(seed, epoch)`), cut them into buckets of
    `batch_size * bucket_size_multiplier`, sort each bucket by length, cut it into batches, and
    shuffle the order of all batches. Local sorting keeps randomness across epochs (a global
    sort would give the same batches every epoch), and shuffling batch order avoids a length
    curriculum. Every index appears exactly once; only the last batch of the last bucket can be
    short. `shuffle=False` keeps the data order: buckets in order, batches in order.

    Deterministic for a given (seed, epoch), so every data-parallel rank computes the same list.
    """
    if batch_size < 1 or bucket_size_multiplier < 1:
        raise ValueError("batch_size and bucket_size_multiplier must be >= 1")
    rng = random.Random(f"alignkit-buckets-{seed}-{epoch}")
    order = list(range(len(lengths)))
    if shuffle:
        rng.shuffle(order)
    bucket = batch_size * bucket_size_multiplier
    batches = []
    for start in range(0, len(order), bucket):
        chunk = sorted(order[start : start + bucket], key=lambda i: lengths[i], reverse=True)
        batches.extend(chunk[j : j + batch_size] for j in range(0, len(chunk), batch_size))
    if shuffle:
        rng.shuffle(batches)
    return batches


def padding_fraction(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> float:
    """Fraction of positions that are padding when each batch pads to its longest member."""
    padded = real = 0
    for b in batches:
        if not b:
            continue
        longest = max(lengths[i] for i in b)
        padded += longest * len(b)
        real += sum(lengths[i] for i in b)
    return (padded - real) / padded if padded else 0.0
