#!/usr/bin/env bash
# Step 1 (about 5 min): kernel benchmark first, so a lease always yields numbers.
source "$(dirname "$0")/common.sh"
if [ "$DRY_RUN" = 1 ]; then
  step kernels 120 $PY benchmarks/bench_kernels.py --dry-run --json "$OUT/kernels.json"
else
  step kernels 540 $PY benchmarks/bench_kernels.py --json "$OUT/kernels.json"
fi
