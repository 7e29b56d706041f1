"""Argument checks shared by plan, fit, probe, estimate, the Trainer and the command line.

Every error names the argument, says what was expected and what to do, and is raised before
anything is touched. Plain-number checks need no torch (``plan.py`` uses them); the torch ones
import it when called.
"""
from __future__ import annotations

import math
import numbers
import re
from collections.abc import Callable
from typing import Any

MAX_SAMPLES = (1 << 62) - 1        # batch sizes: anything an int64 tensor dimension can hold
MAX_ACCUM_STEPS = 1 << 20          # micro-batches in one optimizer step (the plan lists every one)

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


# ---------------------------------------------------------------- plain values
def check_int(name: str, value: Any, meaning: str = "", *, minimum: int = 1, maximum: int = MAX_SAMPLES) -> int:
    """An int in ``[minimum, maximum]``: TypeError for anything else (``True`` is not an int here),
    ValueError outside the range; the message names ``name`` and the largest supported value."""
    what = f" ({meaning})" if meaning else ""
    kind = "a positive int" if minimum == 1 else f"an int >= {minimum}"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be {kind}{what}; got {value!r} of type {type(value).__name__}")
    value = int(value)
    if value < minimum:
        raise ValueError(f"{name} must be {kind}{what}; got {value}")
    if value > maximum:
        raise ValueError(f"{name}={value} is larger than the largest supported value, {maximum:,}{what}")
    return value


def check_positive_int(name: str, value: Any, meaning: str = "") -> int:
    return check_int(name, value, meaning)


def check_bool(name: str, value: Any, meaning: str = "") -> bool:
    if not isinstance(value, bool):
        what = f" ({meaning})" if meaning else ""
        raise TypeError(f"{name} must be True or False{what}; got {value!r}")
    return value


def check_choice(name: str, value: Any, choices: tuple, *, allow_none: bool = False) -> Any:
    if value is None and allow_none:
        return None
    if not isinstance(value, str) or value not in choices:
        listed = ", ".join(map(repr, choices)) + (" or None" if allow_none else "")
        raise ValueError(f"{name} must be one of {listed}; got {value!r}")
    return value


def check_positive_real(name: str, value: Any, meaning: str = "", *, allow_none: bool = False) -> float | None:
    """A positive finite real number (``True``, nan and inf are not)."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        what = f" ({meaning})" if meaning else ""
        none = " or None" if allow_none else ""
        raise ValueError(f"{name} must be a positive finite number{what}{none}; got {value!r}")
    return float(value)


def check_callable(name: str, fn: Callable | None, shape: str) -> None:
    if fn is not None and not callable(fn):
        raise TypeError(f"{name} must be callable ({shape}) or None; got {type(fn).__name__}")


def parse_bytes(value: Any, name: str = "memory_budget", *, allow_zero: bool = False) -> int:
    """``"2GiB"``, ``"512 MB"``, ``1e9`` or ``2**30`` -> bytes (binary units for *iB, decimal otherwise).
    Booleans, nan, inf, negatives and text that is not a size are errors that name ``name``."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a number of bytes or a string like '2GiB'; got {value!r}")
    if isinstance(value, numbers.Real):
        number, unit = value, ""
    elif isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", value)
        if not m or m.group(2).lower() not in _UNITS:
            raise ValueError(f"{name}={value!r} is not a size; write bytes or a string like '2GiB', "
                             f"'512MiB', '80GB'")
        number, unit = float(m.group(1)), m.group(2).lower()
    else:
        raise TypeError(f"{name} must be a number of bytes or a string like '2GiB'; got {type(value).__name__}")
    if not math.isfinite(number):
        raise ValueError(f"{name} must be a finite number of bytes; got {value!r}")
    size = int(number * _UNITS[unit]) if isinstance(number, float) or unit else int(number)
    if size < 0 or (size == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'a non-negative' if allow_zero else 'a positive'} number of bytes; "
                         f"got {value!r}")
    if size > MAX_SAMPLES:
        raise ValueError(f"{name}={value!r} is larger than the largest supported size, {MAX_SAMPLES:,} bytes")
    return size


# ---------------------------------------------------------------- torch values
def check_amp_dtype(amp_dtype: Any):
    """``None``, ``torch.float16``/``torch.bfloat16`` or their names -> the dtype."""
    import torch
    names = {"float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if amp_dtype is None:
        return None
    if isinstance(amp_dtype, str) and amp_dtype.lower() in names:
        return names[amp_dtype.lower()]
    if amp_dtype in (torch.float16, torch.bfloat16):
        return amp_dtype
    raise ValueError(f"amp_dtype must be torch.float16 (autocast + GradScaler), torch.bfloat16 "
                     f"(autocast only) or None (no autocast); got {amp_dtype!r}")


def resolve_accum_dtype(accum_dtype: Any, params):
    """``"auto"`` -> float32 when a trainable parameter is bf16/fp16, else None (autograd's ``.grad``)."""
    import torch
    if isinstance(accum_dtype, str) and accum_dtype == "auto":
        low = any(p.requires_grad and p.dtype in (torch.float16, torch.bfloat16) for p in params)
        return torch.float32 if low else None
    if accum_dtype is None or accum_dtype in (torch.float32, torch.float64):
        return accum_dtype
    raise ValueError(f"accum_dtype must be 'auto', torch.float32, torch.float64 or None; got {accum_dtype!r}")


def check_master_weights(master_weights: Any, accum) -> None:
    check_bool("master_weights", master_weights)
    if master_weights and accum is None:
        raise ValueError("master_weights=True keeps fp32 copies updated from the fp32 gradient buffer; it needs "
                         "accum_dtype=torch.float32 (or 'auto' with bf16/fp16 parameters)")


def check_device(name: str, device: Any, *, allow_meta: bool = False):
    """A device torch can run here: a ``torch.device`` or a string like ``'cuda:0'``. The meta device
    (no data) and CUDA devices this process cannot use are errors that say why."""
    import torch
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"{name} must be a torch.device or a string like 'cpu' or 'cuda:0'; got {device!r}") from None
    check_runnable(name, dev, allow_meta=allow_meta)
    return dev


def check_runnable(name: str, dev, *, allow_meta: bool = False) -> None:
    import torch
    if dev.type == "meta" and not allow_meta:
        raise ValueError(f"{name} is the meta device, which holds no data, so nothing can run there; move the "
                         f"model to a real device (model.to_empty(device='cuda') then load weights), or size a "
                         f"meta model with autoaccum.estimate")
    if dev.type == "cuda":
        if torch.version.cuda is None and torch.version.hip is None:
            raise ValueError(f"{name} is {str(dev)!r} but this torch ({torch.__version__}) is a CPU-only build; "
                             f"install a CUDA build of torch or use device='cpu'")
        if not torch.cuda.is_available():
            raise ValueError(f"{name} is {str(dev)!r} but no CUDA device is visible to this process "
                             f"(torch.cuda.is_available() is False); check CUDA_VISIBLE_DEVICES and the driver")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"{name} is {str(dev)!r} but this process sees {torch.cuda.device_count()} CUDA "
                             f"device(s); use an index below that")


def check_model(model: Any, *, allow_meta: bool = False):
    """A ``torch.nn.Module`` with data somewhere torch can run (unless ``allow_meta``)."""
    from torch import nn
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    if not allow_meta:
        for p in model.parameters():
            if p.device.type == "meta":
                check_runnable("model's parameters' device", p.device)
    return model


def check_count(value: Any, what: str) -> float:
    """What ``count_fn`` returned: a real number or a 0-d/one-element numeric tensor, finite and >= 0.
    Booleans and strings are errors: writing ``.any()`` for ``.sum()`` must not count every
    micro-batch as one item."""
    import numpy as np
    import torch
    hint = "count_fn must return the number of items, e.g. (labels != -100).sum()"
    if isinstance(value, (np.ndarray, np.generic)) and np.asarray(value).dtype.kind in "iuf":
        value = torch.from_numpy(np.asarray(value))        # numeric numpy: checked as a tensor below
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{what} returned a tensor of shape {tuple(value.shape)}; {hint} (one number)")
        if value.dtype == torch.bool or value.is_complex():
            raise TypeError(f"{what} returned a {value.dtype} tensor; {hint}, not .any() or a mask")
        if value.device.type == "meta":
            raise ValueError(f"{what} returned a tensor on the meta device, which holds no number; {hint}")
        value = value.item()
    elif isinstance(value, bool) or isinstance(value, np.bool_) or not isinstance(value, numbers.Real):
        raise TypeError(f"{what} returned {type(value).__name__} {value!r}; {hint}")
    try:
        value = float(value)
    except OverflowError:
        value = math.inf
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{what} returned {value}; {hint}: a finite number >= 0")
    return value


def check_optimizer(optimizer: Any, params: Any = None) -> None:
    """None, or an optimizer a step over micro-batches can drive (``step()`` without a closure)
    that holds some of ``params`` (the model's parameters) when they are given."""
    if optimizer is None:
        return
    if not (callable(getattr(optimizer, "step", None)) and hasattr(optimizer, "param_groups")):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer (or None); got {type(optimizer).__name__}")
    import torch
    if isinstance(getattr(optimizer, "optimizer", optimizer), torch.optim.LBFGS):
        raise ValueError("optimizer is LBFGS, whose step() needs a closure that re-evaluates the loss on the whole "
                         "batch; a step accumulated over micro-batches cannot give one: use another optimizer")
    if params is not None:
        mine = {id(p) for p in params}
        if not any(id(p) in mine for g in optimizer.param_groups for p in g["params"]):
            raise ValueError("optimizer holds none of the model's parameters; build it from "
                             "model.parameters() after moving the model to its device")


def check_step_arguments(model, amp_dtype, loss_fn, count_fn, accum_dtype, master_weights, *, allow_meta=False):
    """The checks probe and estimate share: what one training step is made of."""
    check_model(model, allow_meta=allow_meta)
    amp = check_amp_dtype(amp_dtype)
    check_callable("loss_fn", loss_fn, "loss_fn(model, micro_batch) -> scalar mean loss")
    check_callable("count_fn", count_fn, "count_fn(micro_batch) -> number of items")
    accum = resolve_accum_dtype(accum_dtype, list(model.parameters()))
    check_master_weights(master_weights, accum)
    return amp, accum
