"""PPO, GRPO and RLOO runs for tests/test_rl_distributed.py, in one process or under torchrun.

    python tests/_rl_dist_worker.py --root DIR --tag one
    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/_rl_dist_worker.py --root DIR --tag two

DIR holds the tiny policy (DIR/sft), the prompts and the reward function module, written by the
test. Every stage runs 2 iterations into DIR/<tag>-<stage>; a stage named in `--resume` runs 1
iteration, then resumes to 2 (every rank reads the checkpoint). `--set KEY=VALUE ...` adds
overrides to every stage, `--set STAGE:KEY=VALUE` to one (grpo:train.strategy=deepspeed).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from alignkit.config import load_config  # noqa: E402
from alignkit.train import grpo, ppo, rloo  # noqa: E402

COMMON = ["reward.source=function", "reward.function=dist_rewards:count_e", "train.precision=fp32",
          "train.lr=5e-4", "rollout.max_new_tokens=6", "iterations=2"]
STAGES = {
    # minibatches of 3 and 1 rows: on 2 ranks a split of 2 + 1, then a rank with no row
    "ppo": (ppo, ["rollout_batch=4", "train.batch_size=3", "ppo_epochs=2", "value_model=separate",
                  "kl_target=1.0", "kl_horizon=10"]),
    # two passes (an old-log-prob pass), minibatches of 4 and 2, 2 micro-batches each
    "grpo": (grpo, ["prompts_per_step=2", "group_size=3", "train.batch_size=4", "updates_per_rollout=2",
                    "train.grad_accum=2"]),
    "rloo": (rloo, ["prompts_per_step=2", "group_size=2", "train.batch_size=4"]),
}
STAGES["ppo-zero"] = STAGES["ppo"]  # the same run under another strategy (--set ppo-zero:train.strategy=deepspeed)


def write_fixture(root: Path) -> None:
    """The tiny policy (root/sft), six prompts and the reward function module `dist_rewards`."""
    import json

    from alignkit.models.bpe import train_bpe_tokenizer
    from alignkit.models.load import save_model, tiny_llama

    tok = train_bpe_tokenizer(["Human: What is one plus two?\nAssistant: three . four five six seven"] * 20, vocab_size=300)
    save_model(tiny_llama("nano", tokenizer=tok, seed=0), tok, root / "sft")
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": f"Human: What is {w} plus two?\nAssistant:"}) + "\n"
                                                for w in ("one", "two", "three", "four", "five", "six")))
    (root / "dist_rewards.py").write_text("def count_e(prompts, responses):\n    return [r.count('e') / 4 for r in responses]\n")


def overrides(root: Path, stage: str, tag: str) -> list[str]:
    return [f"model.path={root / 'sft'}", f"data.path={root / 'prompts.jsonl'}", f"out={root / f'{tag}-{stage}'}",
            *COMMON, *STAGES[stage][1]]


def kill_at_save(n: int) -> None:
    """Make this process die (SIGKILL, no clean-up runs) when it starts writing its shard of the
    `n`-th sharded checkpoint: the other rank is then inside the same collective write."""
    from alignkit.train import rl_shard

    calls = [0]
    for cls in (rl_shard.Sharded, rl_shard.ZeRO):
        real = cls.save_shards

        def save_shards(self, tmp, optimizers, _real=real):
            calls[0] += 1
            if calls[0] >= n:
                os.kill(os.getpid(), signal.SIGKILL)
            return _real(self, tmp, optimizers)

        cls.save_shards = save_shards


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", required=True)
    ap.add_argument("--tag", required=True)
    ap.add_argument("--stages", default="ppo,grpo,rloo")
    ap.add_argument("--resume", default="", help="comma-separated stages that run 1 iteration, then resume to 2")
    ap.add_argument("--set", nargs="*", default=[], help="more overrides for every stage, e.g. train.strategy=fsdp2")
    ap.add_argument("--kill-at-save", type=int, default=0,
                    help="SIGKILL rank 1 as it starts writing its shard of the N-th sharded checkpoint")
    args = ap.parse_args()
    if args.kill_at_save and os.environ.get("RANK") == "1":
        kill_at_save(args.kill_at_save)
    root = Path(args.root)
    sys.path.insert(0, str(root))
    for name in args.stages.split(","):
        module, _ = STAGES[name]
        mine = [a.split(":", 1)[1] for a in args.set if a.startswith(f"{name}:")]
        args_ = [*overrides(root, name, args.tag), *(a for a in args.set if ":" not in a), *mine]
        if name in args.resume.split(","):
            module.run(load_config(module.Config, None, [*args_, "iterations=1"]))
            args_ = [*args_, "train.resume=true"]
        module.run(load_config(module.Config, None, args_))


if __name__ == "__main__":
    main()
