"""Argument checks shared by fit, probe and estimate: each error names the argument and the fix."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

_AMP_NAMES = {"float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
              "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def check_amp_dtype(amp_dtype: Any) -> torch.dtype | None:
    """``None``, ``torch.float16``/``torch.bfloat16`` or their names -> the dtype."""
    if amp_dtype is None:
        return None
    if isinstance(amp_dtype, str) and amp_dtype.lower() in _AMP_NAMES:
        return _AMP_NAMES[amp_dtype.lower()]
    if amp_dtype in (torch.float16, torch.bfloat16):
        return amp_dtype
    raise ValueError(f"amp_dtype must be torch.float16 (autocast + GradScaler), torch.bfloat16 "
                     f"(autocast only) or None (no autocast); got {amp_dtype!r}")


def check_callable(name: str, fn: Callable | None, shape: str) -> None:
    if fn is not None and not callable(fn):
        raise TypeError(f"{name} must be callable ({shape}) or None; got {type(fn).__name__}")
