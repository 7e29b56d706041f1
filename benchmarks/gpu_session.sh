#!/usr/bin/env bash
# Everything a GPU lease should run, in one call (see /work/.library/device/METHOD.md):
#   run(command="bash benchmarks/gpu_session.sh")
# Writes logs and JSON under $OUT (default: benchmarks/results/gpu-<date>); commit them afterwards.
set -u
OUT=${OUT:-benchmarks/results/gpu-$(date -u +%Y%m%d)}
mkdir -p "$OUT"
export PYTHONPATH=$PWD
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} > "$OUT/env.txt" 2>&1
python3 -m pytest -q -m cuda tests > "$OUT/pytest-cuda.log" 2>&1; echo "pytest -m cuda: $?" >> "$OUT/env.txt"
for b in triton cuda; do
  compute-sanitizer --tool memcheck --error-exitcode 9 python3 benchmarks/sanitize_kernels.py --backend $b \
    > "$OUT/memcheck-$b.log" 2>&1; echo "memcheck $b: $?" >> "$OUT/env.txt"
done
python3 benchmarks/bench_kernels.py --jit-extension --json "$OUT/kernels.json" > "$OUT/kernels.log" 2>&1
# Soft per-model budgets (16x the CPU ones at --scale 4), judged by max_memory_reserved over real Trainer.steps.
timeout 540 python3 benchmarks/bench_probe.py --device cuda --scale 4 --json "$OUT/probe.json" > "$OUT/probe.log" 2>&1
tail -n 30 "$OUT"/kernels.log "$OUT"/probe.log; cat "$OUT/env.txt"
