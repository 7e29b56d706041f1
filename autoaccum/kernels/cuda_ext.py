"""The optional CUDA C++ extension (``csrc/``): import it if it was built, else say why not.

``setup.py`` builds ``autoaccum._C`` when a CUDA toolkit and a CUDA build of torch are present.
On a GPU machine without a prebuilt extension, ``load(jit=True)`` (or ``AUTOACCUM_CUDA_JIT=1``)
compiles the same sources with ``torch.utils.cpp_extension.load``. Nothing here fails: callers
ask ``available()`` and fall back to Triton.
"""
from __future__ import annotations

import os
from pathlib import Path

_module = None
_reason = "not loaded yet"
_import_failed = False   # the prebuilt module is looked for once: a failed import costs ~50 µs per call
_jit_failed = False      # and a failed JIT build is not retried on every kernel call
SOURCES = ["bindings.cpp", "accumulate_kernel.cu", "finalize_kernel.cu"]


def csrc_dir() -> Path:
    """``csrc/`` in a source checkout (an installed wheel carries the built module instead)."""
    return Path(__file__).resolve().parents[2] / "csrc"


def load(jit: bool | None = None):
    """The extension module, or None (see ``reason()``)."""
    global _module, _reason, _import_failed, _jit_failed
    if _module is not None:
        return _module
    if jit is None:
        jit = os.environ.get("AUTOACCUM_CUDA_JIT") == "1"
    if _import_failed and not jit:
        return None
    try:
        from autoaccum import _C  # built by setup.py
        _module, _reason = _C, "prebuilt autoaccum._C"
        return _module
    except ImportError as e:
        _import_failed = True
        _reason = f"autoaccum._C is not built ({e})"
    if not jit or _jit_failed:
        return None
    import torch
    if not torch.cuda.is_available() or torch.version.cuda is None:
        _reason = "JIT build needs a CUDA build of torch and a GPU"
        return None
    try:
        from torch.utils.cpp_extension import load as build
        src = csrc_dir()
        _module = build(name="autoaccum_C", sources=[str(src / s) for s in SOURCES],
                        extra_cuda_cflags=["-O3"], verbose=False)
        _reason = "JIT-built from csrc/"
    except Exception as e:  # a failed build must not break training: Triton takes over
        _reason = f"JIT build failed: {type(e).__name__}: {e}"
        _module, _jit_failed = None, True
    return _module


def loaded():
    """The module if it is already loaded, else None; never tries to load it (cheap per call)."""
    return _module


def available() -> bool:
    return load() is not None


def reason() -> str:
    load()
    return _reason
