#!/usr/bin/env bash
# Step 3 (about 5 min): compute-sanitizer memcheck over both GPU backends on odd sizes.
source "$(dirname "$0")/common.sh"
if [ "$DRY_RUN" = 1 ] || ! command -v compute-sanitizer > /dev/null; then
  echo "sanitize: skipped (dry run or no compute-sanitizer)" | tee -a "$OUT/env.txt"
  exit 0
fi
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$(mktemp -d)}
rc=0
for b in triton cuda; do
  step "memcheck-$b" 270 compute-sanitizer --tool memcheck --error-exitcode 9 \
    $PY benchmarks/sanitize_kernels.py --backend $b || rc=1
done
exit $rc
