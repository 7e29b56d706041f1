#!/usr/bin/env bash
# Step 2 (about 6 min): build the CUDA extension with a time bound, then the GPU tests on compiled
# kernels (conftest sets TRITON_INTERPRET only where there is no GPU). The build goes to a fresh
# folder, so a build killed in an earlier lease cannot leave torch's lock file in the way.
source "$(dirname "$0")/common.sh"
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$(mktemp -d)}
if [ "$DRY_RUN" = 1 ]; then
  step gpu-tests 300 $PY -m pytest -q -m cuda tests/test_kernels.py tests/test_fit.py
else
  step build 300 $PY -c "import sys; from autoaccum.kernels import cuda_ext; m = cuda_ext.load(jit=True); print(cuda_ext.reason()); sys.exit(0 if m else 3)"
  export AUTOACCUM_CUDA_JIT=1
  step gpu-tests 270 $PY -m pytest -q -m cuda tests
fi
