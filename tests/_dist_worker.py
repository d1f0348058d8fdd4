"""`alignkit` under torchrun, with a test hook: `--kill-at N` SIGKILLs rank 1 when its step
function is called for the (N+1)-th time, i.e. in the middle of optimizer step N+1 with one
micro-batch per step (as a crashed node would die); the launcher then stops the other ranks.
`--report-offload` prints, on rank 0 after FSDP2 shards the model, how many of its sharded
parameters FSDP2 keeps in host memory (`FSDPParam.offload_to_cpu`).

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/_dist_worker.py \\
        --kill-at 3 sft model.path=... train.strategy=fsdp2
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from alignkit import cli  # noqa: E402
from alignkit.train import loop  # noqa: E402


def report_offload() -> None:
    from alignkit.train import strategy

    real_prepare = strategy.FSDP2.prepare

    def prepare(self, model, params, build):
        out = real_prepare(self, model, params, build)
        flags = [fp.offload_to_cpu for m in model.modules() if hasattr(m, "_get_fsdp_state")
                 for g in [m._get_fsdp_state()._fsdp_param_group] if g is not None for fp in g.fsdp_params]
        if os.environ.get("RANK") == "0":
            print(f"alignkit-test: offloaded {sum(flags)} of {len(flags)} sharded parameters", file=sys.stderr)
        return out

    strategy.FSDP2.prepare = prepare


def main(argv: list[str]) -> int:
    if argv and argv[0] == "--report-offload":
        report_offload()
        argv = argv[1:]
    if argv and argv[0] == "--kill-at":
        kill_at = int(argv[1])
        argv = argv[2:]
        real_train = loop.train

        def train(*args, **kwargs):
            if os.environ.get("RANK") == "1":
                orig_step = args[1]

                def step(model, batch, _n=[0]):  # noqa: B006 (a call counter)
                    _n[0] += 1
                    if _n[0] > kill_at:
                        os.kill(os.getpid(), signal.SIGKILL)
                    return orig_step(model, batch)

                args = (args[0], step, *args[2:])
            return real_train(*args, **kwargs)

        for module in ("sft", "dpo", "reward", "pretrain"):
            mod = __import__(f"alignkit.train.{module}", fromlist=["train"])
            mod.train = train
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
