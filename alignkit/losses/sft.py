"""Supervised fine-tuning loss: next-token cross-entropy on the response tokens only.

Legend: B batch, T tokens, V vocabulary. `labels` holds the token id where the loss applies and
`ignore_index` (-100) on prompt and padding tokens, aligned with `input_ids` (not shifted).
"""

from __future__ import annotations

import torch


def response_mask(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """(B, T-1) bool: True where the shifted label `labels[:, 1:]` is a token to score."""
    return labels[:, 1:] != ignore_index


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Log-probability of each label token under the logits of the position before it.

    logits: (B, T, V), labels: (B, T). Returns (B, T-1) with
        out[b, t] = log softmax(logits[b, t])[labels[b, t+1]]   (0 where the label is ignored)
    computed as the gathered logit minus logsumexp over the vocabulary. Memory: the full
    (B, T, V) float32 log-softmax is never built; logsumexp runs one row at a time, so the extra
    forward memory is one (T, V) float32 slice (bf16 logits are upcast row by row).
    """
    logits = logits[:, :-1]  # (B, T-1, V)
    targets = labels[:, 1:]  # (B, T-1)
    mask = targets != ignore_index
    safe = targets.masked_fill(~mask, 0)
    picked = torch.gather(logits, -1, safe.unsqueeze(-1)).squeeze(-1).float()  # (B, T-1)
    lse = torch.stack([torch.logsumexp(row.float(), dim=-1) for row in logits])  # (B, T-1)
    return torch.where(mask, picked - lse, torch.zeros_like(picked))


def sft_loss(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy over response tokens, and the number of those tokens.

    The brief's SFT objective: "Only compute loss on response tokens (ignore prompt)",
        loss = F.cross_entropy(logits.view(-1, V), labels.view(-1), ignore_index=-100)
    with prompt and padding labels set to -100. As in every causal LM, position t predicts
    token t+1, so here logits[:, :-1] are scored against labels[:, 1:]:
        loss_sum = - sum_{b,t: labels[b,t+1] != -100} log softmax(logits[b,t])[labels[b,t+1]]

    logits: (B, T, V), labels: (B, T).
    Returns (loss_sum: scalar float32, n_tokens: scalar int64). The caller divides: summing
    both over micro-batches (and ranks) before dividing makes gradient accumulation give the
    same mean per token as one large batch, which a per-micro-batch mean does not.
    """
    lp = token_logprobs(logits, labels, ignore_index)  # (B, T-1)
    return -lp.sum(), response_mask(labels, ignore_index).sum()
