#!/usr/bin/env bash
# Step 6 (about 3 min): trainer overhead against the fastest hand loop on the card, with torch's
# default AdamW (foreach: the trainer reads the step's outcome inside the step) and with
# AdamW(fused=True) (it skips on the device, so the trainer never waits; autoaccum/outcome.py).
source "$(dirname "$0")/common.sh"
if [ "$DRY_RUN" = 1 ]; then
  step trainer 120 $PY benchmarks/bench_trainer.py --device cpu --models tiny_mlp --repeat 1 --steps 3 --json "$OUT/trainer.json"
  step trainer-fused 120 $PY benchmarks/bench_trainer.py --device cpu --models tiny_mlp --repeat 1 --steps 3 --fused --json "$OUT/trainer-fused.json"
else
  step trainer 150 $PY benchmarks/bench_trainer.py --device cuda --repeat 5 --json "$OUT/trainer.json"
  step trainer-fused 150 $PY benchmarks/bench_trainer.py --device cuda --repeat 5 --fused --json "$OUT/trainer-fused.json"
fi
