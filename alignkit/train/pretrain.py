"""Stage 1, pre-training: a BPE tokenizer and a causal LM trained from scratch on a text corpus.

Real users start from their own base model and skip this stage; the built-in world uses it to
make a base model that only continues text.

    alignkit pretrain corpus=runs/world/pretrain.jsonl out=runs/base
"""

from __future__ import annotations

import functools
import gzip
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from alignkit.config import ModelConfig, TrainConfig, required
from alignkit.data.batching import SFTBatch
from alignkit.losses.sft import response_mask
from alignkit.models.chunked import DEFAULT_CHUNK, sft_loss_of_model
from alignkit.train.loop import StepOutput, train


@dataclass(frozen=True)
class Config:
    """Pre-training settings."""

    corpus: str = required()
    """A .jsonl(.gz) file of {"text": ...} documents, or a plain .txt file (one document per line)."""
    out: str = "runs/pretrain"
    """Output directory; the model is saved to OUT/final."""
    vocab_size: int = 2048
    """Vocabulary size of the BPE tokenizer trained on the corpus."""
    seq_len: int = 128
    """Length of the packed training blocks (documents joined with EOS)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """`model.tokenizer` reuses an existing tokenizer instead of training one."""
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=3e-3, batch_size=32, warmup_steps=20))
    """Training loop settings."""


def read_corpus(path: str | Path) -> list[str]:
    """Documents of a corpus file; errors name the file and line."""
    from alignkit.data.load import DataError

    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: corpus file not found")
    opener = gzip.open if p.suffix == ".gz" else open
    docs = []
    with opener(p, "rt", encoding="utf-8") as f:
        if ".jsonl" in p.name:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{p}:{i}: invalid JSON ({e.msg})") from None
                if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                    raise DataError(f"{p}:{i}: expected an object with a string field 'text'")
                docs.append(obj["text"])
        else:
            docs = [line.rstrip("\n") for line in f if line.strip()]
    if not docs:
        raise DataError(f"{p}: the corpus is empty")
    return docs


def pack(docs: list[list[int]], eos_id: int, seq_len: int) -> list[torch.Tensor]:
    """Join documents with EOS and cut the stream into blocks of seq_len tokens (tail dropped)."""
    stream: list[int] = []
    for ids in docs:
        stream.extend(ids)
        stream.append(eos_id)
    n = len(stream) // seq_len
    t = torch.tensor(stream[: n * seq_len], dtype=torch.long)
    return list(t.view(n, seq_len))


def collate_blocks(blocks: list[torch.Tensor]) -> SFTBatch:
    ids = torch.stack(blocks)  # (B, T)
    return SFTBatch(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids.clone())


def lm_step(model: torch.nn.Module, batch: SFTBatch, chunk: int = DEFAULT_CHUNK) -> StepOutput:
    """Next-token loss over every labelled token; returns the sum and the token count."""
    loss_sum, n_tokens = sft_loss_of_model(model, batch.input_ids, batch.attention_mask, batch.labels, chunk)
    return StepOutput(loss=loss_sum, weight=n_tokens, metrics={"ntokens": float(batch.attention_mask.sum())})


def shuffled_plan(n: int, batch_size: int, seed: int):
    """epoch -> global batches of indices, a seeded permutation per epoch."""

    def plan(epoch: int) -> list[list[int]]:
        order = list(range(n))
        random.Random(seed * 100003 + epoch).shuffle(order)
        return [order[i : i + batch_size] for i in range(0, n, batch_size)]

    return plan


def run(cfg: Config) -> dict:
    from alignkit.models.bpe import train_bpe_tokenizer
    from alignkit.models.load import build_model, load_tokenizer, save_model

    out = Path(cfg.out)
    docs = read_corpus(cfg.corpus)
    if cfg.model.tokenizer:
        tokenizer = load_tokenizer(cfg.model.tokenizer)
    else:
        tokenizer = train_bpe_tokenizer(docs, vocab_size=cfg.vocab_size)
    encoded = tokenizer(docs, add_special_tokens=False)["input_ids"]
    blocks = pack(encoded, tokenizer.eos_token_id, cfg.seq_len)
    if not blocks:
        raise ValueError(f"{cfg.corpus}: corpus has fewer than seq_len={cfg.seq_len} tokens")
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, tokenizer)
    result = train(
        model,
        functools.partial(lm_step, chunk=cfg.train.logprob_chunk),
        blocks,
        collate_blocks,
        shuffled_plan(len(blocks), cfg.train.batch_size, cfg.train.seed),
        cfg.train,
        out,
        save_fn=lambda m, d: save_model(m, tokenizer, d),
        weight_fn=lambda b: float(response_mask(b.labels).sum()),
        name="pretrain",
    )
    return {
        "model": str(result.final_dir),
        "documents": len(docs),
        "tokens": sum(len(e) + 1 for e in encoded),
        "blocks": len(blocks),
        "final_loss": result.metrics.get("loss"),
        "steps": result.step,
        "wall_s": result.wall_time_s,
        "peak_mem_mb": result.peak_memory_mb,
    }
