"""Edges of data parallelism that the main equality tests do not reach (slow, 2 CPU ranks, gloo):

- a global batch shorter than ranks x grad_accum (the last batch of an epoch): every rank still
  runs grad_accum forward/backward passes, zero-weight copies where its share is empty, so the
  weight gathers of FSDP2 pair up across ranks and the run ends equal to one process;
- KTO's z0 is one estimate over the global batch (all-reduced), so 2 ranks equal ONE process
  running the global batch as a single micro-batch (not only one with the same micro-batches).
"""

import pytest

from tests.test_distributed import COMMON, STAGES, assert_close, ok, run
from tests.test_distributed import setup as setup  # noqa: F401  (the module's fixture)

pytestmark = pytest.mark.slow


def test_fsdp2_with_a_batch_shorter_than_ranks_times_accum(setup):  # noqa: F811
    # 64 records in batches of 7: one batch of 1 record per epoch, split over 2 ranks x 2 micro-batches
    args = [*STAGES["sft"](setup), *COMMON, "train.batch_size=7", "train.max_steps=0", "train.epochs=1"]
    one, two = setup / "short-one", setup / "short-fsdp2"
    ok(run([*args, "--out", str(one)]))
    ok(run([*args, "train.grad_accum=2", "train.strategy=fsdp2", "--out", str(two)], procs=2))
    assert_close(two, one, 1e-4)


def test_kto_two_ranks_equal_one_process_with_one_micro_batch(setup):  # noqa: F811
    args = [*STAGES["kto"](setup), *COMMON, "train.max_steps=3", "train.lr=0.01"]
    one, two = setup / "kto-one-mb", setup / "kto-ddp"
    ok(run([*args, "--out", str(one)]))
    ok(run([*args, "--out", str(two)], procs=2))
    assert_close(two, one, 1e-5)
