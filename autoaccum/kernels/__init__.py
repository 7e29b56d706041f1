"""Fused gradient kernels, each behind one dispatch point.

``accumulate_(accs, grads, weight, *, assign=False)``
    ``acc = weight * float(g)`` (assign) or ``acc += weight * float(g)`` for every pair, in one
    launch per gradient dtype. Gradients bf16/fp16/fp32, accumulators fp32 (fp64 accumulators
    and gradients take the torch path). ``None`` gradients are skipped.
``finalize_(grads, inv_scale, max_norm=None, *, apply=True) -> (total_norm, found_inf)``
    Norm of the unscaled gradients ``inv_scale * g`` and an inf/nan flag in one read pass, then
    (``apply``) ``g *= inv_scale * clip_coef`` in one write pass, skipped when a value is
    non-finite. Both results are 0-dim float32 device tensors: nothing waits for the host.

Dispatch: the CUDA extension when built, Triton on CUDA, else the torch reference
(``reference.py``: the CPU and every other device). ``backend=`` or the environment variable
``AUTOACCUM_BACKEND`` (``cuda``, ``triton``, ``torch``) forces one; forcing ``triton`` on CPU
tensors runs Triton's interpreter when ``TRITON_INTERPRET=1`` (that is how CI tests the kernels).
"""
from __future__ import annotations

import math
import os
from collections.abc import Sequence

import torch

from . import cuda_ext, reference
from .layout import dense_order, in_memory_order
from .reference import clip_scale

__all__ = ["accumulate_", "finalize_", "backend_for", "clip_scale", "BACKENDS"]

BACKENDS = ("cuda", "triton", "torch")
_FAST_GRAD_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_GRAD_DTYPES = _FAST_GRAD_DTYPES + (torch.float64,)


def backend_for(tensors: Sequence[torch.Tensor], backend: str | None = None, *, fast_ok: bool = True) -> str:
    """Which implementation runs for ``tensors``: an explicit choice, else extension > Triton > torch."""
    choice = backend or os.environ.get("AUTOACCUM_BACKEND") or None
    if choice is not None:
        if choice not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS} (or None for automatic); got {choice!r}")
        if choice == "cuda" and not cuda_ext.available():
            raise RuntimeError(f"backend='cuda' was asked for, but the CUDA extension is unavailable: "
                               f"{cuda_ext.reason()}")
        if choice == "triton" and not _triton_ok():
            raise RuntimeError("backend='triton' was asked for, but triton cannot be imported")
        return choice if fast_ok or choice == "torch" else "torch"
    if not fast_ok or not tensors or tensors[0].device.type != "cuda":
        return "torch"
    if cuda_ext.available():
        return "cuda"
    return "triton" if _triton_ok() else "torch"


def accumulate_(accs: Sequence[torch.Tensor], grads: Sequence[torch.Tensor | None], weight: float, *,
                assign: bool = False, backend: str | None = None) -> None:
    """Fold ``weight * grads[i]`` into ``accs[i]`` (or overwrite with it when ``assign``)."""
    w = _check_weight(weight)
    pairs = _check_pairs(accs, grads)
    if not pairs:
        return
    a_list = [a for a, _ in pairs]
    g_list = [g for _, g in pairs]
    fast_ok = all(a.dtype == torch.float32 for a in a_list) and all(g.dtype in _FAST_GRAD_DTYPES for g in g_list)
    chosen = backend_for(a_list, backend, fast_ok=fast_ok)
    if chosen == "torch":
        reference.accumulate_(a_list, g_list, w, assign)
    elif chosen == "triton":
        from . import accumulate as tri
        tri.accumulate_(a_list, g_list, w, assign)
    else:
        device = a_list[0].device
        with torch.cuda.device(device):   # the binding launches on the current device
            cuda_ext.load().accumulate(a_list, g_list, w, bool(assign), torch.cuda.current_stream(device).cuda_stream)


def finalize_(grads: Sequence[torch.Tensor | None], inv_scale: float | torch.Tensor = 1.0,
              max_norm: float | None = None, *, apply: bool = True, backend: str | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Norm and inf/nan flag of ``inv_scale * grads`` in one read; then scale (and clip) in one write."""
    gs = [_flat_or_self(g) for g in _check_grads(grads) if g is not None]
    if max_norm is not None and (isinstance(max_norm, bool) or not isinstance(max_norm, (int, float))
                                 or not math.isfinite(max_norm) or max_norm <= 0):
        raise ValueError(f"max_norm must be a positive finite number or None; got {max_norm!r}")
    if not gs:
        zero = torch.zeros((), dtype=torch.float32)
        return zero, zero.clone()
    device = gs[0].device
    inv = _check_inv_scale(inv_scale, device)
    fast_ok = all(g.dtype in _FAST_GRAD_DTYPES and g.is_contiguous() for g in gs)
    chosen = backend_for(gs, backend, fast_ok=fast_ok)
    if chosen == "torch":
        return reference.finalize_(gs, inv, max_norm, apply)
    if chosen == "triton":
        from . import finalize as tri
        norm, found, _ = tri.finalize_(gs, inv.to(torch.float32).reshape(1), max_norm, apply)
        return norm, found
    result = torch.empty(3, dtype=torch.float32, device=device)
    with torch.cuda.device(device):       # the binding launches on the current device
        cuda_ext.load().finalize(gs, inv.to(torch.float32).reshape(1), -1.0 if max_norm is None else float(max_norm),
                                 bool(apply), result, torch.cuda.current_stream(device).cuda_stream)
    return result[0], result[1]


# ---------------------------------------------------------------- checks: before anything is written
def _check_weight(weight) -> float:
    if isinstance(weight, torch.Tensor):
        if weight.numel() != 1:
            raise ValueError(f"weight must be one number; got a tensor of shape {tuple(weight.shape)}")
        weight = weight.item()
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
        raise ValueError(f"weight must be a finite number (the micro-batch's share of the items); got {weight!r}")
    return float(weight)


def _check_pairs(accs, grads) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if not isinstance(accs, (list, tuple)) or not isinstance(grads, (list, tuple)):
        raise TypeError("accs and grads must be lists (or tuples) of tensors")
    if len(accs) != len(grads):
        raise ValueError(f"accs and grads must pair up; got {len(accs)} accumulators and {len(grads)} gradients")
    pairs = []
    for i, (a, g) in enumerate(zip(accs, grads)):
        if g is None:
            continue
        if not isinstance(a, torch.Tensor) or not isinstance(g, torch.Tensor):
            raise TypeError(f"accs[{i}] and grads[{i}] must be tensors; got {type(a).__name__} and "
                            f"{type(g).__name__}")
        if a.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"accs[{i}] is {a.dtype}; accumulators must be float32 (or float64)")
        if g.dtype not in _GRAD_DTYPES:
            raise TypeError(f"grads[{i}] is {g.dtype}; gradients must be bfloat16, float16, float32 or float64")
        if g.dtype == torch.float64 and a.dtype != torch.float64:
            raise TypeError(f"grads[{i}] is float64 but accs[{i}] is float32, which would round it; "
                            f"accumulate float64 gradients into float64")
        if a.shape != g.shape:
            raise ValueError(f"accs[{i}] has shape {tuple(a.shape)} but grads[{i}] has {tuple(g.shape)}")
        if a.device != g.device:
            raise ValueError(f"accs[{i}] is on {a.device} but grads[{i}] is on {g.device}")
        if not a.is_contiguous():
            order = dense_order(a)          # e.g. channels_last: both sides in the accumulator's memory order
            flat = in_memory_order(a, order)
            if flat is None:
                raise ValueError(f"accs[{i}] has gaps or overlaps in memory (strides {a.stride()}); accumulators "
                                 f"are written as flat memory: use views of a contiguous buffer")
            a, g = flat, g.permute(order)
        if not g.is_contiguous():
            g = g.contiguous()  # a copy: correct, but it costs one extra read and write
        pairs.append((a, g))
    _check_no_overlap([a for a, _ in pairs])
    return pairs


def _flat_or_self(g: torch.Tensor) -> torch.Tensor:
    """A dense gradient in its memory order (a contiguous view the fast kernels can take), else itself."""
    view = in_memory_order(g)
    return g if view is None else view


def _check_grads(grads) -> list[torch.Tensor | None]:
    if not isinstance(grads, (list, tuple)):
        raise TypeError("grads must be a list (or tuple) of tensors")
    devices = set()
    for i, g in enumerate(grads):
        if g is None:
            continue
        if not isinstance(g, torch.Tensor):
            raise TypeError(f"grads[{i}] must be a tensor or None; got {type(g).__name__}")
        if g.dtype not in _GRAD_DTYPES:
            raise TypeError(f"grads[{i}] is {g.dtype}; gradients must be bfloat16, float16, float32 or float64")
        devices.add(g.device)
    if len(devices) > 1:
        raise ValueError(f"grads are on several devices ({sorted(map(str, devices))}); finalize one device at a time")
    return list(grads)


def _check_inv_scale(inv_scale, device) -> torch.Tensor:
    if isinstance(inv_scale, torch.Tensor):
        if inv_scale.numel() != 1:
            raise ValueError(f"inv_scale must be one number; got a tensor of shape {tuple(inv_scale.shape)}")
        return inv_scale.to(device).reshape(())
    if isinstance(inv_scale, bool) or not isinstance(inv_scale, (int, float)) or not inv_scale > 0 \
            or not math.isfinite(inv_scale):
        raise ValueError(f"inv_scale must be a positive finite number (1 / loss scale); got {inv_scale!r}")
    # torch.full launches a fill with the value as an argument; torch.tensor(value, device=cuda) would
    # copy it from pageable host memory, which waits for the device on every step.
    return torch.full((), float(inv_scale), dtype=torch.float64, device=device)


def _check_no_overlap(accs: list[torch.Tensor]) -> None:
    """Two accumulators sharing memory would race (and double-count); reject them."""
    by_storage: dict[int, list[tuple[int, int, int]]] = {}
    keep = []  # holding the storages keeps their ids unique while we compare
    for i, a in enumerate(accs):
        if a.numel() == 0:
            continue
        st = a.untyped_storage()
        keep.append(st)
        start = a.storage_offset() * a.element_size()
        by_storage.setdefault(id(st), []).append((start, start + a.numel() * a.element_size(), i))
    for spans in by_storage.values():
        spans.sort()
        for (_, end0, i), (start1, _, j) in zip(spans, spans[1:]):
            if start1 < end0:
                raise ValueError(f"accs[{i}] and accs[{j}] overlap in memory; every accumulator needs its own memory")


def _triton_ok() -> bool:
    try:
        import triton  # noqa: F401
        return True
    except ImportError:
        return False
