#!/usr/bin/env bash
# Step 4 (about 6 min): the probe benchmark judged by the ruler (max_memory_reserved over real
# Trainer.steps), with soft per-model budgets 16x the CPU ones (--scale 4).
source "$(dirname "$0")/common.sh"
if [ "$DRY_RUN" = 1 ]; then
  step probe 300 $PY benchmarks/bench_probe.py --device cpu --quick --models gpt_padded --json "$OUT/probe.json"
else
  step probe 540 $PY benchmarks/bench_probe.py --device cuda --scale 4 --json "$OUT/probe.json"
fi
