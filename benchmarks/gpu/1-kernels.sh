#!/usr/bin/env bash
# Step 1 (about 6 min): host time per kernel call (seconds), then the kernel benchmark, so a lease
# always yields numbers.
source "$(dirname "$0")/common.sh"
if [ "$DRY_RUN" = 1 ]; then
  step host 90 $PY benchmarks/bench_host.py --calls 20 --counts 10 1000 --json "$OUT/host.json"
  step kernels 120 $PY benchmarks/bench_kernels.py --dry-run --json "$OUT/kernels.json"
else
  step host 70 $PY benchmarks/bench_host.py --device cuda --json "$OUT/host.json"
  step kernels 500 $PY benchmarks/bench_kernels.py --json "$OUT/kernels.json"
fi
