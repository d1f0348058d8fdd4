"""A tiny training run for tests/test_loop.py, runnable alone or under torchrun.

    python tests/_ddp_worker.py --out DIR [--accum 2] [--kill-at 5] [--resume]
    python -m torch.distributed.run --nproc_per_node 2 tests/_ddp_worker.py --out DIR

The model is a per-token next-token predictor (no attention), so padding never changes a loss.
Sequences have different lengths, so micro-batches cover different numbers of tokens: the
loss is a sum over tokens and the weight a token count, which is what the loop must normalise.
The final weights land in DIR/final/model.safetensors (the loop's default export).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from alignkit.config import TrainConfig  # noqa: E402
from alignkit.train.loop import StepOutput, train  # noqa: E402

VOCAB = 11


@dataclass(frozen=True)
class Batch:
    """input_ids, labels, attention_mask: (B, T); labels -100 on padding."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor


class TinyLM(nn.Module):
    def __init__(self, dropout: float = 0.0):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 8)
        self.hidden = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.drop = nn.Dropout(dropout)
        self.out = nn.Linear(8, VOCAB)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.drop(torch.tanh(self.hidden(self.emb(ids))))  # (B, T, 8)
        return self.out(self.norm(h))  # (B, T, V)


def make_model(dropout: float = 0.0) -> TinyLM:
    torch.manual_seed(0)
    return TinyLM(dropout)


def make_data(n: int = 20) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(2, 10, (n,), generator=g).tolist()
    return [torch.randint(0, VOCAB, (k,), generator=g).tolist() for k in lengths]


def collate(items: list[list[int]]) -> Batch:
    width = max(len(x) for x in items)
    ids = torch.zeros(len(items), width, dtype=torch.long)
    mask = torch.zeros(len(items), width, dtype=torch.long)
    for i, x in enumerate(items):
        ids[i, : len(x)] = torch.tensor(x)
        mask[i, : len(x)] = 1
    labels = ids.roll(-1, dims=1).masked_fill(mask.roll(-1, dims=1) == 0, -100)
    labels[:, -1] = -100
    return Batch(ids, labels, mask)


def step(model: nn.Module, batch: Batch) -> StepOutput:
    logits = model(batch.input_ids)  # (B, T, V)
    valid = batch.labels != -100  # (B, T)
    losses = nn.functional.cross_entropy(logits.transpose(1, 2), batch.labels, reduction="none")  # (B, T)
    n = valid.sum()
    acc = ((logits.argmax(-1) == batch.labels) & valid).sum() / n
    return StepOutput(loss=losses.sum(), weight=n, metrics={"accuracy": float(acc)})


def make_plan(n: int, batch_size: int):
    def plan(epoch: int) -> list[list[int]]:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(100 + epoch)).tolist()
        return [order[i : i + batch_size] for i in range(0, n, batch_size)]

    return plan


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--items", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--accum", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--max-steps", type=int, default=0)
    ap.add_argument("--save-every", type=int, default=0)
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--kill-at", type=int, default=0, help="SIGKILL this process after step N is logged")
    ap.add_argument("--resume", action="store_true")
    args = ap.parse_args(argv)

    cfg = TrainConfig(
        lr=1e-2,
        weight_decay=0.1,
        warmup_steps=2,
        batch_size=args.batch,
        grad_accum=args.accum,
        epochs=args.epochs,
        max_steps=args.max_steps,
        max_grad_norm=1.0,
        precision="fp32",
        save_every=args.save_every,
        keep_checkpoints=2,
        log_every=1,
        resume=args.resume,
        progress=False,
        tensorboard=False,
    )

    def on_log(n: int, metrics: dict) -> None:
        if n == args.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    data = make_data(args.items)
    train(
        make_model(args.dropout),
        step,
        data,
        collate,
        make_plan(len(data), args.batch),
        cfg,
        args.out,
        on_log=on_log,
    )


if __name__ == "__main__":
    main()
