# Sourced by every GPU step: where results go, the environment record, and the dry-run switch.
#   OUT       where the step writes (a device call's $OUT; default benchmarks/results/gpu-<date>)
#   DRY_RUN=1 run the step on the CPU at toy size, to check the script (CI does this)
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
OUT=${OUT:-benchmarks/results/gpu-$(date -u +%Y%m%d)}
DRY_RUN=${DRY_RUN:-0}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
if [ ! -s "$OUT/env.txt" ]; then
  {
    date -u +%Y-%m-%dT%H:%M:%SZ
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
    $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" 2>&1
  } > "$OUT/env.txt"
fi
# step NAME SECONDS COMMAND...: run one bounded command, log it, record its exit status.
step() {
  local name=$1 seconds=$2
  shift 2
  echo "\$ $*" > "$OUT/$name.log"
  timeout --kill-after=10 "$seconds" "$@" >> "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name: exit $rc$([ $rc = 124 ] && echo " (timed out after ${seconds}s)")" | tee -a "$OUT/env.txt"
  tail -n 25 "$OUT/$name.log"
  return $rc
}
