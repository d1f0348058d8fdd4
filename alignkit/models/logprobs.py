"""Per-token and per-sequence log-probs of the response tokens under a causal LM.

Legend: B batch, T tokens, V vocabulary. `labels` is aligned with `input_ids` and holds -100
on prompt and padding tokens (see `alignkit.data.batching`).
"""

from __future__ import annotations

import torch

from alignkit.losses.sft import response_mask, token_logprobs


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) positions counted over real tokens only: cumsum(mask) - 1, clamped at 0.

    With left padding the first real token gets position 0, exactly as with right padding.
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def forward_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T, V) logits with position ids derived from the mask.

    Hugging Face causal LMs number positions 0..T-1 regardless of the mask, so in a
    left-padded row the first real token sits at position (number of pads). Models with
    absolute position embeddings (GPT-2, OPT) then give different log-probs outright; rotary
    models (Llama) differ by rounding, since only relative offsets enter attention, and a
    long pad run can push positions past the trained range. Passing `position_ids` makes the
    padding side and amount irrelevant for both.
    """
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
    )
    return out.logits


def per_token_logprobs(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of each label token and the response mask, both (B, T-1).

    Entry t scores token t+1; it is 0 where the mask is False (prompt, padding).
    """
    logits = forward_logits(model, input_ids, attention_mask)  # (B, T, V)
    return token_logprobs(logits, labels), response_mask(labels)


def sequence_logprobs(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    average: bool = False,
) -> torch.Tensor:
    """(B,) summed log-prob of the label tokens of each row (mean per token if `average`).

    The sum is log pi(y | x) used by DPO (Rafailov et al. 2023, Eq. 7); the average is the
    length-normalised variant (IPO / SimPO style). A row with no label tokens gives 0.
    """
    lp, mask = per_token_logprobs(model, input_ids, attention_mask, labels)
    total = lp.sum(-1)
    if average:
        return total / mask.sum(-1).clamp(min=1)
    return total
