"""Padding-free packing: a micro-batch's sequences concatenated into one row.

Legend: S sequences, B preference pairs, N packed tokens (the sum of their lengths). Each sequence keeps its own
positions 0..len-1; with `attention_mask=None` and such position ids, transformers' mask builder
(`find_packed_sequence_indices`) makes attention block-diagonal, so no token sees another
sequence and the result equals the padded batch's within float32 rounding, with no pad tokens
computed at all.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from alignkit.data.batching import IGNORE_INDEX, _optional_floats
from alignkit.data.tokenize import TokenizedPair
from alignkit.models.chunked import segment_sums


@dataclass(frozen=True)
class PackedBatch:
    """S sequences in one row.

    input_ids: (1, N) the sequences' prompt + response ids back to back.
    position_ids: (1, N) 0..len-1 restarting at each sequence.
    labels: (1, N) response ids, IGNORE_INDEX on prompts and on every sequence's first token
        (so the last token of one sequence never scores the first of the next).
    seq_index: (N,) which sequence each token belongs to.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor
    seq_index: torch.Tensor

    @property
    def num_sequences(self) -> int:
        return int(self.seq_index[-1]) + 1 if len(self.seq_index) else 0


def pack(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]]) -> PackedBatch:
    """Pack (prompt, response) token lists into one `PackedBatch`, in order."""
    if not prompts:
        raise ValueError("pack got an empty batch")
    ids, pos, labels, seq = [], [], [], []
    for s, (p, r) in enumerate(zip(prompts, responses)):
        n = len(p) + len(r)
        ids += list(p) + list(r)
        pos += range(n)
        lab = [IGNORE_INDEX] * len(p) + list(r)
        lab[0] = IGNORE_INDEX
        labels += lab
        seq += [s] * n
    as_row = lambda x: torch.tensor(x, dtype=torch.long).unsqueeze(0)  # noqa: E731
    return PackedBatch(as_row(ids), as_row(pos), as_row(labels), torch.tensor(seq, dtype=torch.long))


def per_sequence_sums(token_values: torch.Tensor, keep: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
    """(S,) sums of per-token values (N_scored,) over each sequence's scored tokens.

    keep: (1, N) bool, True at positions t whose next token t+1 is a label (row-major order of
    `token_values`); position t belongs to sequence seq_index[t + 1] (same as seq_index[t]).
    """
    seq = batch.seq_index[keep[0]]  # (N_scored,)
    return segment_sums(token_values, seq, batch.num_sequences)


@dataclass(frozen=True)
class PackedPairs:
    """A preference micro-batch packed: the 2B sequences prompt + chosen_0 .. chosen_{B-1},
    then prompt + rejected_0 .. rejected_{B-1} (the order of `PreferenceBatch`'s rows) in one row.

    packed: the `PackedBatch` of those S = 2B sequences.
    margin, soft_label: (B,) float, or None, as in `PreferenceBatch`.
    """

    packed: PackedBatch
    margin: torch.Tensor | None = None
    soft_label: torch.Tensor | None = None

    @property
    def num_pairs(self) -> int:
        return self.packed.num_sequences // 2

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Split a (2B, ...) per-sequence result into its (B, ...) chosen and rejected halves."""
        return x[: self.num_pairs], x[self.num_pairs :]


def pack_preference(items: Sequence[TokenizedPair]) -> PackedPairs:
    """Pack preference pairs padding-free: chosen sequences first, then rejected ones."""
    if not items:
        raise ValueError("pack_preference got an empty batch")
    prompts = [x.prompt_ids for x in items] * 2
    responses = [x.chosen_ids for x in items] + [x.rejected_ids for x in items]
    return PackedPairs(
        pack(prompts, responses),
        margin=_optional_floats([x.margin for x in items], 0.0),
        soft_label=_optional_floats([x.soft_label for x in items], 1.0),
    )


@dataclass(frozen=True)
class PackedUnpaired:
    """Unpaired (KTO) examples packed: prompt + completion of each, in order, in one row.

    packed: the `PackedBatch` of the S examples.
    desirable: (S,) bool thumbs up / down, as in `UnpairedBatch`.
    """

    packed: PackedBatch
    desirable: torch.Tensor


# --- shared prompts: a pair's prompt runs once ------------------------------------------------
PREFIX, PAD_BRANCH = 0, -1


@dataclass(frozen=True)
class SharedPromptPairs:
    """B preference pairs, one row each, the prompt computed once for both responses.

    Row b holds prompt_b[:-1] (the shared prefix, positions 0..P-2), then the chosen branch
    prompt_b[-1] + chosen_b, then the rejected branch prompt_b[-1] + rejected_b, each branch's
    positions continuing from the prefix (P-1, P, ...), then padding. The last prompt token is
    repeated in each branch because it predicts the first response token of each. A tree
    attention mask lets a token see the prefix and the earlier tokens of its own branch only,
    so every token has exactly the context (and position) it has in the two-row layout of
    `PreferenceBatch`: the log-probs are those numbers within float32 rounding, with P - 1 fewer
    tokens per pair through every layer.

    input_ids: (B, L) the rows, right-padded with pad ids.
    attention_mask: (B, 1, L, L) bool, True where query t may attend to key s (pad queries see
        themselves, so no softmax row is empty).
    position_ids: (B, L) as above; 0 on padding.
    labels: (B, L) response ids, IGNORE_INDEX on prompt tokens, branch starts and padding.
    seq_index: (B * L,) the sequence a position's prediction belongs to (row-major): b for the
        chosen branch, B + b for the rejected one, 2B - 1 elsewhere (never scored).
    last_index: (2B,) row-major index into (B * L) of each sequence's last token (chosen b, then
        rejected b: `PreferenceBatch`'s row order), where a reward model reads its score.
    tokens: real (non-pad) tokens in the batch.
    margin, soft_label: (B,) float, or None, as in `PreferenceBatch`.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor
    seq_index: torch.Tensor
    last_index: torch.Tensor
    tokens: int
    margin: torch.Tensor | None = None
    soft_label: torch.Tensor | None = None

    @property
    def num_pairs(self) -> int:
        return self.input_ids.shape[0]

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Split a (2B, ...) per-sequence result into its (B, ...) chosen and rejected halves."""
        return x[: self.num_pairs], x[self.num_pairs :]


def shared_prompt_length(item: TokenizedPair) -> int:
    """Tokens of a pair's `SharedPromptPairs` row (before padding)."""
    p = len(item.prompt_ids)
    return p + (1 if p else 0) + len(item.chosen_ids) + len(item.rejected_ids)


def shared_prompt_is_cheaper(items: Sequence[TokenizedPair], hidden: int, intermediate: int) -> bool:
    """Whether the decoder does less arithmetic on the `SharedPromptPairs` rows of `items` than on
    their two-row `PreferenceBatch`, per layer and in units of 4 H flops:

        tokens * (4 H + 3 I) / 2   (q, k, v, o projections and the gated MLP, forward)
        + attention scores          (q k and attention-weighted v, 4 H flops each)

    counting every (query, key) entry of the shared rows' L x L squares (a custom mask is dense)
    and half of the two-row T x T squares (causal kernels skip the upper half). Short rows save
    P - 1 tokens per pair; at thousands of tokens per row the larger square costs more than that.
    """
    lin = (4 * hidden + 3 * intermediate) / 2
    two_t = max(len(x.prompt_ids) + max(len(x.chosen_ids), len(x.rejected_ids)) for x in items)
    shared_l = max(shared_prompt_length(x) for x in items)
    two = 2 * len(items) * (two_t * lin + two_t * two_t / 2)
    shared = len(items) * (shared_l * lin + shared_l * shared_l)
    return shared < two


def collate_shared_prompt(items: Sequence[TokenizedPair], pad_id: int) -> SharedPromptPairs:
    """Pairs into `SharedPromptPairs` (see there): one row per pair, the prompt prefix once."""
    if not items:
        raise ValueError("collate_shared_prompt got an empty batch")
    n, length = len(items), max(shared_prompt_length(x) for x in items)
    ids, pos, labels, branch, seq = [], [], [], [], []
    last = [0] * (2 * n)
    for b, x in enumerate(items):
        s = max(len(x.prompt_ids) - 1, 0)
        row, lab, pos_row = list(x.prompt_ids[:s]), [IGNORE_INDEX] * s, list(range(s))
        br, sq = [PREFIX] * s, [2 * n - 1] * s
        for k, response in enumerate((x.chosen_ids, x.rejected_ids)):
            tail = list(x.prompt_ids[s:]) + list(response)
            row += tail
            lab += [IGNORE_INDEX] * (len(tail) - len(response)) + list(response)
            if tail:  # a branch start is never scored: nothing before it predicts it
                lab[len(row) - len(tail)] = IGNORE_INDEX
            pos_row += range(s, s + len(tail))
            br += [k + 1] * len(tail)
            sq += [b + k * n] * len(tail)
            last[b + k * n] = b * length + max(len(row) - 1, 0)  # an empty branch: the prefix's last token
        pad = length - len(row)
        ids.append(row + [pad_id] * pad)
        labels.append(lab + [IGNORE_INDEX] * pad)
        pos.append(pos_row + [0] * pad)
        branch.append(br + [PAD_BRANCH] * pad)
        seq.append(sq + [2 * n - 1] * pad)
    as_long = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
    ids, pos, labels, branch, seq = map(as_long, (ids, pos, labels, branch, seq))
    q, k = branch.unsqueeze(2), branch.unsqueeze(1)  # (B, L, 1), (B, 1, L)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    mask = causal & ((k == PREFIX) | (k == q)) & (k != PAD_BRANCH)
    mask |= torch.eye(length, dtype=torch.bool)  # pad queries: themselves only
    return SharedPromptPairs(
        ids, mask.unsqueeze(1), pos, labels, seq.reshape(-1), as_long(last), int((branch != PAD_BRANCH).sum()),
        margin=_optional_floats([x.margin for x in items], 0.0),
        soft_label=_optional_floats([x.soft_label for x in items], 1.0),
    )
