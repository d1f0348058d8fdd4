"""Stage 2, supervised fine-tuning: next-token loss on the response tokens only.

The brief's formula: cross-entropy with labels -100 on the prompt (and padding), so the model
learns to answer, not to repeat prompts.

    alignkit sft model.path=runs/base/model data.path=runs/world/sft.jsonl out=runs/sft
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

import torch

from alignkit.config import DataConfig, ModelConfig, TrainConfig
from alignkit.console import warn
from alignkit.data.batching import SFTBatch, bucketed_batches, collate_sft, padding_fraction
from alignkit.data.load import load_records
from alignkit.data.packing import PackedBatch, pack
from alignkit.data.tokenize import TokenizedSFT, TruncationLimits, tokenize_sft
from alignkit.losses.sft import response_mask
from alignkit.models.chunked import DEFAULT_CHUNK, sft_loss_of_model
from alignkit.train.loop import StepOutput, train


@dataclass(frozen=True)
class Config:
    """Supervised fine-tuning settings."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """`model.path`: the base model to fine-tune (required)."""
    data: DataConfig = field(default_factory=DataConfig)
    """`data.path`: SFT records in any supported format (required)."""
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=1e-3, batch_size=32, warmup_steps=10))
    """Training loop settings."""
    out: str = "runs/sft"
    """Output directory; the model is saved to OUT/final."""


def sft_step(model: torch.nn.Module, batch: SFTBatch | PackedBatch, chunk: int = DEFAULT_CHUNK) -> StepOutput:
    """Cross-entropy over response tokens; the sum and the token count go to the loop."""
    if isinstance(batch, PackedBatch):  # block-diagonal attention from the restarting positions
        loss_sum, n_tokens = sft_loss_of_model(model, batch.input_ids, None, batch.labels, chunk, batch.position_ids)
        return StepOutput(loss=loss_sum, weight=n_tokens, metrics={"ntokens": float(batch.input_ids.numel())})
    loss_sum, n_tokens = sft_loss_of_model(model, batch.input_ids, batch.attention_mask, batch.labels, chunk)
    return StepOutput(loss=loss_sum, weight=n_tokens, metrics={"ntokens": float(batch.attention_mask.sum())})


def collate_packed(items: list[TokenizedSFT]) -> PackedBatch:
    return pack([it.prompt_ids for it in items], [it.response_ids for it in items])


def run(cfg: Config) -> dict:
    from alignkit.config import ConfigError
    from alignkit.models.load import apply_lora, load_model, load_tokenizer, save_model

    if not cfg.model.path:
        raise ConfigError("config key 'model.path' is required (the base model directory)")
    if not cfg.data.path:
        raise ConfigError("config key 'data.path' is required (the SFT data file)")
    out = Path(cfg.out)
    loaded = load_records(cfg.data.path, kind="sft", on_error=cfg.data.on_error, limit=cfg.data.limit)
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.path)
    limits = TruncationLimits(max_prompt_len=cfg.data.max_prompt_len, max_len=cfg.data.max_len)
    items, trunc = tokenize_sft(tokenizer, loaded.records, limits)
    warn(trunc.warnings(limits, cfg.data.path))

    torch.manual_seed(cfg.train.seed)
    model = load_model(cfg.model.path)
    if cfg.model.lora_r > 0:
        model = apply_lora(model, cfg.model)
    pad_id = tokenizer.pad_token_id

    lengths = [len(it.prompt_ids) + len(it.response_ids) for it in items]

    def plan(epoch: int) -> list[list[int]]:
        return bucketed_batches(lengths, cfg.train.batch_size, seed=cfg.train.seed, epoch=epoch)

    result = train(
        model, functools.partial(sft_step, chunk=cfg.train.logprob_chunk), items,
        collate_packed if cfg.train.packing else (lambda b: collate_sft(b, pad_id)), plan, cfg.train, out,
        save_fn=lambda m, d: save_model(m, tokenizer, d),
        weight_fn=lambda b: float(response_mask(b.labels).sum()),
        name="sft",
    )
    return {
        "model": str(result.final_dir),
        "records": len(loaded.records),
        "skipped": len(loaded.skipped),
        "format": loaded.format,
        "truncation": trunc.report(),
        "padding_fraction": padding_fraction(lengths, plan(0)),
        "final_loss": result.metrics.get("loss"),
        "steps": result.step,
        "wall_s": result.wall_time_s,
        "peak_mem_mb": result.peak_memory_mb,
    }
