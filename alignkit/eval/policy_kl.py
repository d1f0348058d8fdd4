"""KL(policy || reference) of a trained model, estimated on prompts by sampling from the policy.

KL(pi || ref) = E_{y ~ pi}[log pi(y|x) - log ref(y|x)]: the sequence-level k1 estimator averaged
over samples at temperature 1 (an unbiased estimate; single samples can be negative).
"""

from __future__ import annotations

import torch

from alignkit.data.batching import collate_sft
from alignkit.data.tokenize import TokenizedSFT, encode_prompt
from alignkit.models.generate import HFGenerator, SamplingParams
from alignkit.models.logprobs import sequence_logprobs


@torch.no_grad()
def sequence_kl(
    policy, reference, tokenizer, prompts: list[str], max_new_tokens: int = 32, seed: int = 0, batch_size: int = 64
) -> float:
    """Mean over prompts of sum_t [log pi(y_t) - log ref(y_t)] for y sampled from the policy."""
    prompt_ids = [encode_prompt(tokenizer, p, None)[0] for p in prompts]
    gen = HFGenerator(policy, tokenizer, batch_size=batch_size)
    responses = gen.generate(prompt_ids, SamplingParams(max_new_tokens=max_new_tokens, temperature=1.0, seed=seed))
    items = [TokenizedSFT(list(p), list(r)) for p, r in zip(prompt_ids, responses) if len(r) > 0]
    if not items:
        return 0.0
    total = 0.0
    pad = tokenizer.pad_token_id
    for i in range(0, len(items), batch_size):
        batch = collate_sft(items[i : i + batch_size], pad)
        args = (batch.input_ids, batch.attention_mask, batch.labels)
        total += float((sequence_logprobs(policy, *args) - sequence_logprobs(reference, *args)).sum())
    return total / len(items)
