#!/usr/bin/env bash
# PPO seeds of two settings of the reference-likelihood feature side by side, one process per run and
# one thread each (10 processes: meant for a machine with >= 10 free cores), then each setting's
# summary over the seeds (docs/reward.md, "PMI against a content-free prompt").
#
#   scripts/ref_logprob_seeds.sh DEMO OUT [SEEDS]      # e.g. /tmp/fulldemo /tmp/pmi5 0,1,2,3,4
#
# OUT/preset: the demo's preset (pipeline.PPO_RM: reward.ref_logprob_coef=6, the plain mean log-prob);
# OUT/pmi_c1: the same with reward.ref_logprob_coef=1 reward.ref_logprob_baseline=empty_prompt.
# Logs: OUT/<setting>/s<seed>.log; summaries: OUT/<setting>/summary.log (the last line is JSON).
# EXTRA="iterations=2" appends overrides to both (a smoke test); SERIAL=1 runs one process at a time.
set -euo pipefail
demo=${1:?demo folder}; out=${2:?output folder}; seeds=${3:-0,1,2,3,4}
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
declare -A settings=(
  [preset]="eval_every=0"
  [pmi_c1]="eval_every=0 reward.ref_logprob_coef=1 reward.ref_logprob_baseline=empty_prompt"
)
pids=()
status=0
for name in "${!settings[@]}"; do
  mkdir -p "$out/$name"
  for s in ${seeds//,/ }; do
    # shellcheck disable=SC2086
    python scripts/monitor_seeds.py --demo "$demo" --judge "$demo/reward_2/final" --out "$out/$name" --seeds "$s" \
      --runs preset --set ${settings[$name]} ${EXTRA:-} > "$out/$name/s$s.log" 2>&1 &
    if [[ -n "${SERIAL:-}" ]]; then wait "$!" || status=1; else pids+=($!); fi
  done
done
for p in "${pids[@]}"; do wait "$p" || status=1; done
for name in "${!settings[@]}"; do
  python scripts/monitor_seeds.py --demo "$demo" --judge "$demo/reward_2/final" --out "$out/$name" --seeds "$seeds" \
    --runs preset --analyse > "$out/$name/summary.log" 2>&1 || status=1
  echo "== $name"; grep -E "^\| preset|^preset:|per category" "$out/$name/summary.log" || true
done
exit $status
