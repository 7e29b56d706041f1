"""Installs autoaccum; builds the optional CUDA extension (csrc/) only when it can.

The extension needs a CUDA toolkit and a CUDA build of torch at build time, so build it with
``pip install --no-build-isolation .`` in an environment that has both (build isolation would
hide your torch). ``AUTOACCUM_CUDA_EXT=0`` skips it, ``=1`` makes a failed build an error.
Without it the Triton kernels (on CUDA) or the torch path (elsewhere) run; nothing is lost but speed.
"""
import os
import sys

from setuptools import setup


def _extension():
    wanted = os.environ.get("AUTOACCUM_CUDA_EXT", "auto")
    if wanted == "0":
        return None, "AUTOACCUM_CUDA_EXT=0"
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return None, "torch is not importable at build time (pip install --no-build-isolation to use yours)"
    if torch.version.cuda is None:
        return None, f"torch {torch.__version__} is a CPU build"
    if CUDA_HOME is None:
        return None, "no CUDA toolkit found (set CUDA_HOME)"
    sources = ["csrc/bindings.cpp", "csrc/accumulate_kernel.cu", "csrc/finalize_kernel.cu"]
    ext = CUDAExtension("autoaccum._C", sources,
                        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]})
    return (ext, BuildExtension), None


built, why_not = _extension()
if built is None:
    if os.environ.get("AUTOACCUM_CUDA_EXT") == "1":
        sys.exit(f"autoaccum: AUTOACCUM_CUDA_EXT=1 but the CUDA extension cannot be built: {why_not}")
    print(f"autoaccum: installing pure Python (no CUDA extension: {why_not})", file=sys.stderr)
    setup()
else:
    ext, build_ext = built
    setup(ext_modules=[ext], cmdclass={"build_ext": build_ext})
