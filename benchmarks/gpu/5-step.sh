#!/usr/bin/env bash
# Step 5 (at most about 8 min: --max-seconds 480, bound 9): training-step throughput of a GPT-2-small
# sized model, bf16, batch 256, at autoaccum's micro-batch against an exhaustive sweep and the
# Accelerate/Lightning choices.
source "$(dirname "$0")/common.sh"
if [ "$DRY_RUN" = 1 ]; then
  step step 300 $PY benchmarks/bench_step.py --dry-run --json "$OUT/step.json"
else
  step step 540 $PY benchmarks/bench_step.py --device cuda --json "$OUT/step.json"
fi
