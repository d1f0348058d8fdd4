"""CAI revise and label on 2 torchrun ranks (gloo) write the files one process writes.

5 prompts split 2 + 3 over the ranks (an uneven share); revise samples the first answer and the
critiques (temperature > 0, so every row's seed matters) for 2 rounds; label samples two answers
per prompt and asks the feedback model 2 principles in both orders about the kept pairs, whose
split differs from the prompts'. The revised SFT file, the chains, the AI-labelled pairs and their
evidence must be identical, order included; rank 0 alone writes. Also by hand: the shares.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from alignkit.train.distributed import Dist, share

WORKER = Path(__file__).resolve().parent / "_cai_dist_worker.py"
PROMPTS = ["Human: How do I pick a lock?\nAssistant:", "Human: Tell me a joke about cats.\nAssistant:",
           "Human: What is two plus two?\nAssistant:", "Human: Write an insult for my boss.\nAssistant:",
           "Human: How do plants grow?\nAssistant:"]


def test_shares_cover_the_items_in_order():
    """share(n) gives contiguous slices, sizes differing by at most one, a rank possibly none."""
    assert [share(5, Dist(r, 2)) for r in (0, 1)] == [(0, 2), (2, 5)]
    assert [share(2, Dist(r, 3)) for r in (0, 1, 2)] == [(0, 0), (0, 1), (1, 2)]
    assert share(7, Dist()) == (0, 7)


@pytest.mark.slow
def test_two_ranks_write_the_one_process_files(tmp_path):
    from alignkit.models.bpe import train_bpe_tokenizer
    from alignkit.models.load import save_model, tiny_llama

    tok = train_bpe_tokenizer([p + " Sure, here is how. I cannot help with that." for p in PROMPTS] * 10, vocab_size=300)
    save_model(tiny_llama("nano", tokenizer=tok, seed=0), tok, tmp_path / "model")
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(WORKER.parents[1])}
    for tag, launcher in (("one", []), ("two", ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"])):
        done = subprocess.run([sys.executable, *launcher, str(WORKER), str(tmp_path), tag], env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    for stage, files in (("revise", ("sft.jsonl", "chains.jsonl")), ("label", ("preferences.jsonl", "labels.jsonl"))):
        for name in files:
            one = (tmp_path / f"one-{stage}" / name).read_text()
            assert (tmp_path / f"two-{stage}" / name).read_text() == one, (stage, name)
        # no temporary files of a second writer
        assert sorted(p.name for p in (tmp_path / f"two-{stage}").iterdir()) == sorted([*files, "summary.json"])
    chains = [json.loads(x) for x in (tmp_path / "one-revise" / "chains.jsonl").read_text().splitlines()]
    assert [c["prompt"] for c in chains] == PROMPTS
    assert len({c["response"] for c in chains}) > 1  # sampled answers, not one greedy string
    labels = [json.loads(x) for x in (tmp_path / "one-label" / "labels.jsonl").read_text().splitlines()]
    assert len(labels) >= 3 and all(len(x["principles"]) == 2 for x in labels)  # kept pairs on both ranks
