#!/usr/bin/env bash
# Step 0 (one device call: bounds add up to 9.3 min; about 3 on an H200): what the next card must
# answer first, most important first, so that a lease cut short still has it. The CUDA extension
# (launch plan rewritten since the last card) built and run through every GPU test, including the
# trainer's deferred outcome under CUDA's sync-debug mode; the trainer against the hand loop with
# torch's default and with fused AdamW; the kernels at 100M and 1B elements, 1 and 1,000 tensors;
# the probe's trials beside the ruler's peaks. Eight files, the most a call returns: env.txt, six
# logs, and results.jsonl (every JSON a step wrote, one per line, rewritten after each step).
source "$(dirname "$0")/common.sh"
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$(mktemp -d)}
JSON=$(mktemp -d)
rc=0
collect() {
  $PY - "$JSON" "$OUT/results.jsonl" <<'PYEOF'
import json, pathlib, sys
rows = [json.dumps({"file": p.name, "data": json.loads(p.read_text())}) for p in sorted(pathlib.Path(sys.argv[1]).glob("*.json"))]
pathlib.Path(sys.argv[2]).write_text("".join(r + "\n" for r in rows))
PYEOF
}
if [ "$DRY_RUN" = 1 ]; then
  echo "build: skipped (dry run)" | tee -a "$OUT/env.txt"
  step gpu-tests 110 $PY -m pytest -q -m cuda tests/test_kernels.py tests/test_outcome.py || rc=1
  step trainer 55 $PY benchmarks/bench_trainer.py --device cpu --models tiny_mlp --repeat 1 --steps 3 --json "$JSON/trainer.json" || rc=1
  collect
  step trainer-fused 55 $PY benchmarks/bench_trainer.py --device cpu --models tiny_mlp --repeat 1 --steps 3 --fused --json "$JSON/trainer-fused.json" || rc=1
  collect
  step kernels 110 $PY benchmarks/bench_kernels.py --dry-run --json "$JSON/kernels.json" || rc=1
  collect
  echo "probe-diag: skipped (dry run)" | tee -a "$OUT/env.txt"
else
  step build 110 $PY -c "import sys; from autoaccum.kernels import cuda_ext; m = cuda_ext.load(jit=True); print(cuda_ext.reason()); sys.exit(0 if m else 3)" || rc=1
  export AUTOACCUM_CUDA_JIT=1
  step gpu-tests 110 $PY -m pytest -q -m cuda tests || rc=1
  models=tiny_mlp,mlp,mlp_clip,tiny_gpt,many_tensors
  step trainer 55 $PY benchmarks/bench_trainer.py --device cuda --models $models --repeat 5 --json "$JSON/trainer.json" || rc=1
  collect
  step trainer-fused 55 $PY benchmarks/bench_trainer.py --device cuda --models $models --repeat 5 --fused --json "$JSON/trainer-fused.json" || rc=1
  collect
  step kernels 110 $PY benchmarks/bench_kernels.py --totals 1e8,1e9 --counts 1,1000 --json "$JSON/kernels.json" || rc=1
  collect
  step probe-diag 60 $PY benchmarks/gpu/probe_diag.py || rc=1
fi
rm -rf "$JSON"
exit $rc
