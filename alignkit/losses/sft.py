"""Supervised fine-tuning loss: next-token cross-entropy on the response tokens only.

Legend: B batch, T tokens, V vocabulary. `labels` holds the token id where the loss applies and
`ignore_index` (-100) on prompt and padding tokens, aligned with `input_ids` (not shifted).
"""

from __future__ import annotations

import torch


def response_mask(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """(B, T-1) bool: True where the shifted label `labels[:, 1:]` is a token to score."""
    return labels[:, 1:] != ignore_index


def token_logprobs(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100, chunk_rows: int = 1024
) -> torch.Tensor:
    """Log-probability of each label token under the logits of the position before it.

    logits: (B, T, V), labels: (B, T). Returns (B, T-1) float32 with
        out[b, t] = log softmax(logits[b, t])[labels[b, t+1]]   (0 where the label is ignored)
    computed as the gathered logit minus logsumexp over the vocabulary, at the N scored
    positions only: prompt and padding rows (often most of a batch) cost nothing, and the
    backward writes one (N, V) gradient instead of several (B, T, V) ones. Memory: the full
    (B, T, V) float32 log-softmax is never built; the scored rows are copied once, (N, V) in
    the logits' dtype, and logsumexp upcasts `chunk_rows` of them at a time (bf16 logits: autograd
    keeps the float32 chunks, N x V in all, for the backward).
    """
    targets = labels[:, 1:]  # (B, T-1)
    mask = targets != ignore_index
    b, t = mask.nonzero(as_tuple=True)  # (N,) each
    rows = logits[b, t]  # (N, V): position t scores token t+1
    picked = rows.gather(-1, targets[b, t].unsqueeze(-1)).squeeze(-1).float()  # (N,)
    lse = [torch.logsumexp(c.float(), dim=-1) for c in rows.split(chunk_rows)]  # row chunks of (N,)
    scored = picked - torch.cat(lse) if lse else picked
    out = torch.zeros(mask.shape, dtype=torch.float32, device=logits.device)
    return out.index_put((b, t), scored)  # (B, T-1)


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
