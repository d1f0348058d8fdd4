"""Per-rank peak memory of PPO on Ray with the KL reference on the trainer ranks vs in its own actor.

    python benchmarks/bench_ray_reference.py                     # ~19M-parameter Llama, 2 ranks
    python benchmarks/bench_ray_reference.py --hidden 256 --layers 4

Run from the repository root (Ray installed: pip install -e '.[ray]'). One freshly initialised
Llama (`--hidden`, `--layers`; a 300-token BPE vocabulary, so the blocks are most of the
parameters) saved once; `alignkit ppo --launcher ray` runs the same `--iterations` twice on a
local cluster, 2 trainer actors each, the reward function in its reward actor both times:

  local:  every trainer rank loads the frozen reference next to its policy (the default);
  actor:  `ray.reference_actor=true`, one more actor holds the reference and answers the ranks'
          reference log-prob passes; the ranks load none.

Figures: each rank's peak RSS over its `train` call (alignkit.memory.PeakMemory: sampled every
20 ms, the whole process, libraries included), as the launcher reports it in the result's
`ray.peak_mem_mb_per_rank`; `saved_mb` per rank is local minus actor, to set against `model_mb`
(the reference's fp32 weights). The runs also report their final weights' largest difference
(the two placements compute the same update). Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _fixture(root: Path, hidden: int, layers: int) -> int:
    from transformers import LlamaConfig, LlamaForCausalLM

    from alignkit.models.bpe import train_bpe_tokenizer
    from alignkit.models.load import save_model

    tok = train_bpe_tokenizer(["Human: What is one plus two?\nAssistant: three . four five six seven"] * 20, vocab_size=300)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=8,
                         intermediate_size=int(hidden * 2.75), max_position_embeddings=512, tie_word_embeddings=True,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    import torch

    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    save_model(model, tok, root / "sft")
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": f"Human: What is {w} plus two?\nAssistant:"}) + "\n"
                                                for w in ("one", "two", "three", "four", "five", "six")))
    (root / "bench_rewards.py").write_text("def count_e(prompts, responses):\n    return [r.count('e') / 4 for r in responses]\n")
    return sum(p.numel() for p in model.parameters())


def _run(root: Path, tag: str, iterations: int, actor: bool) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(root)])}
    cmd = [sys.executable, "-m", "alignkit.cli", "ppo", "--launcher", "ray", f"model.path={root / 'sft'}",
           f"data.path={root / 'prompts.jsonl'}", f"out={root / tag}", "reward.source=function",
           "reward.function=bench_rewards:count_e", "train.precision=fp32", "train.lr=5e-4", "rollout.max_new_tokens=8",
           f"iterations={iterations}", "rollout_batch=4", "train.batch_size=4", "ppo_epochs=1", "value_model=shared",
           "ray.workers=2", "ray.num_cpus=0.5", "ray.reward_actor=true", "ray.reward_num_cpus=0.5",
           f"ray.reference_actor={str(actor).lower()}", "ray.reference_num_cpus=0.5", "ray.object_store_mb=100"]
    done = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{tag} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout[done.stdout.index("\n{"):])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--iterations", type=int, default=2)
    args = ap.parse_args()
    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        n = _fixture(root, args.hidden, args.layers)
        local = _run(root, "local", args.iterations, actor=False)
        actor = _run(root, "actor", args.iterations, actor=True)
        wa, wb = (load_file(root / t / "final" / "model.safetensors") for t in ("local", "actor"))
        diff = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    lp, ap_ = local["ray"]["peak_mem_mb_per_rank"], actor["ray"]["peak_mem_mb_per_rank"]
    for name, r in (("local", local), ("actor", actor)):
        print(f"{name:>6}: peak RSS per rank {[round(x) for x in r['ray']['peak_mem_mb_per_rank']]} MB, "
              f"reference rows served by an actor {r['ray']['reference_actor_rows']}", file=sys.stderr)
    print(json.dumps({
        "params_m": round(n / 1e6, 2), "model_mb": round(n * 4 / 2**20, 1),
        "local_peak_mb_per_rank": [round(x, 1) for x in lp], "actor_peak_mb_per_rank": [round(x, 1) for x in ap_],
        "saved_mb_per_rank": [round(a - b, 1) for a, b in zip(lp, ap_)],
        "reference_actor_rows": actor["ray"]["reference_actor_rows"], "max_weight_diff": diff,
    }))


if __name__ == "__main__":
    main()
