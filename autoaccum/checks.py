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


_LOW_PRECISION = (torch.float16, torch.bfloat16)


def resolve_accum_dtype(accum_dtype: Any, params) -> torch.dtype | None:
    """``"auto"`` -> float32 when a trainable parameter is bf16/fp16, else None (autograd's ``.grad``)."""
    if isinstance(accum_dtype, str) and accum_dtype == "auto":
        low = any(p.requires_grad and p.dtype in _LOW_PRECISION for p in params)
        return torch.float32 if low else None
    if accum_dtype is None or accum_dtype in (torch.float32, torch.float64):
        return accum_dtype
    raise ValueError(f"accum_dtype must be 'auto', torch.float32, torch.float64 or None; got {accum_dtype!r}")


def check_step_arguments(model, amp_dtype, loss_fn, count_fn, accum_dtype, master_weights):
    """The checks probe and estimate share: what one training step is made of."""
    from torch import nn
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    amp = check_amp_dtype(amp_dtype)
    check_callable("loss_fn", loss_fn, "loss_fn(model, micro_batch) -> scalar mean loss")
    check_callable("count_fn", count_fn, "count_fn(micro_batch) -> number of items")
    accum = resolve_accum_dtype(accum_dtype, list(model.parameters()))
    check_master_weights(master_weights, accum)
    return amp, accum


def check_master_weights(master_weights: Any, accum: torch.dtype | None) -> None:
    if not isinstance(master_weights, bool):
        raise TypeError(f"master_weights must be True or False; got {master_weights!r}")
    if master_weights and accum is None:
        raise ValueError("master_weights=True keeps fp32 copies updated from the fp32 gradient buffer; it needs "
                         "accum_dtype=torch.float32 (or 'auto' with bf16/fp16 parameters)")
