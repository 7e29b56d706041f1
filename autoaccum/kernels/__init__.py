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

import contextlib
import functools
import math
import os
from collections.abc import Sequence

import numpy as np
import torch

from . import cuda_ext, group, reference, table
from .group import forget
from .reference import clip_scale

__all__ = ["accumulate_", "finalize_", "backend_for", "clip_scale", "forget", "BACKENDS"]

BACKENDS = ("cuda", "triton", "torch")
_FAST_SET = frozenset((torch.float32, torch.float16, torch.bfloat16))
_GRAD_SET = _FAST_SET | {torch.float64}
_ACC_SET = frozenset((torch.float32, torch.float64))
_F32_SET = frozenset((torch.float32,))
_F64_SET = frozenset((torch.float64,))
_STRIDED = {torch.strided}
_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}   # csrc/launchers.h GradDType
_F32_MAX = torch.finfo(torch.float32).max


def backend_for(tensors: Sequence[torch.Tensor], backend: str | None = None, *, fast_ok: bool = True) -> str:
    """Which implementation runs for ``tensors``: an explicit choice, else extension > Triton > torch."""
    return _choose(tensors[0].device if tensors else torch.device("cpu"), backend, fast_ok)


def accumulate_(accs: Sequence[torch.Tensor], grads: Sequence[torch.Tensor | None], weight: float, *,
                assign: bool = False, backend: str | None = None) -> None:
    """Fold ``weight * grads[i]`` into ``accs[i]`` (or overwrite with it when ``assign``)."""
    w = _check_weight(weight)
    if not isinstance(accs, (list, tuple)) or not isinstance(grads, (list, tuple)):
        raise TypeError("accs and grads must be lists (or tuples) of tensors")
    if len(accs) != len(grads):
        raise ValueError(f"accs and grads must pair up; got {len(accs)} accumulators and {len(grads)} gradients")
    acc = None
    check_accs = lambda ts: _check_tensors(ts, "accs", None, grads)   # noqa: E731 - the whole list's
    g_dtypes = _plain(grads, backend) if accs else None
    if g_dtypes:                                   # the torch path needs no launch facts for the gradients
        acc = group.facts_of(accs, check=check_accs)
        if _fit_for_torch(acc, accs, grads, g_dtypes):
            _check_weight_range(acc, w, weight)
            reference.accumulate_(accs, grads, w, assign)
            return
    g_key = None
    grad = group.recall(grads)                     # a cached list holds no None
    if grad is None and accs and _native_ok(backend):   # fresh gradients: the extension checks them itself
        acc = group.facts_of(accs, check=check_accs)
        if _accumulate_native(acc, accs, grads, w, weight, assign, backend):
            return
    if grad is None:
        g_key = group.key_of(grads)
        grad = group.cached(g_key, grads)
    where = None                                   # positions in the caller's lists, for messages
    if grad is None and group.NONE_ID in g_key:
        where = [i for i, k in enumerate(g_key) if k != group.NONE_ID]
        accs, grads, g_key, acc = [accs[i] for i in where], [grads[i] for i in where], None, None
    if not accs:
        return
    if acc is None:                                # (made above for the whole list: kept unless None was dropped)
        acc = group.facts_of(accs, check=lambda ts: _check_tensors(ts, "accs", where, grads))
    if grad is None:
        grad = group.facts_of(grads, g_key, check=lambda ts: _check_tensors(ts, "grads", where, accs))
    _check_pairs(acc, grad, accs, grads, where)
    _check_weight_range(acc, w, weight)
    fast_ok = acc.device is not None and acc.dtype_set == _F32_SET and grad.dtype_set <= _FAST_SET
    chosen = _choose(acc.device if acc.device is not None else accs[0].device, backend, fast_ok)
    if chosen == "torch":
        reference.accumulate_(accs, grads, w, assign)
        return
    if not (acc.contiguous and grad.contiguous) and grad.orders != acc.orders:
        # a gradient laid out unlike its accumulator: copy it into the accumulator's layout
        grads = [g if go == ao else torch.empty_like(a, dtype=g.dtype).copy_(g)
                 for a, g, ao, go in zip(accs, grads, acc.orders, grad.orders)]
        grad = group.facts_of(grads)
    _check_plain_memory(acc, accs, "accs", where)
    _check_plain_memory(grad, grads, "grads", where)
    if chosen == "triton":
        from . import accumulate as tri
        tri.accumulate_(acc, grad, w, assign, acc.device)
    else:
        with _cuda(acc.device) as (mod, stream):
            for dtype, idx in table.split(grad):
                mod.accumulate(_host(acc, "ptrs", idx), _host(grad, "ptrs", idx), _host(acc, "numels", idx),
                               _CODES[dtype], w, bool(assign), stream)


def finalize_(grads: Sequence[torch.Tensor | None], inv_scale: float | torch.Tensor = 1.0,
              max_norm: float | None = None, *, apply: bool = True, backend: str | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Norm and inf/nan flag of ``inv_scale * grads`` in one read; then scale (and clip) in one write."""
    if not isinstance(grads, (list, tuple)):
        raise TypeError("grads must be a list (or tuple) of tensors")
    if max_norm is not None and (isinstance(max_norm, bool) or not isinstance(max_norm, (int, float))
                                 or not math.isfinite(max_norm) or max_norm <= 0):
        raise ValueError(f"max_norm must be a positive finite number or None; got {max_norm!r}")
    if grads and _plain(grads, backend):           # the torch path needs no launch facts, cached or not
        _check_once(group.key_of(grads))
        return _finalize_torch(grads, inv_scale, max_norm, apply)
    key = None
    facts = group.recall(grads)                    # a cached list holds no None
    if facts is None:
        key = group.key_of(grads)
        facts = group.cached(key, grads)
    if facts is None or "distinct" not in facts.cache:   # (accumulate_'s gradients may repeat a tensor)
        _check_once(key if key is not None else group.key_of(grads))
        if facts is not None:
            facts.cache["distinct"] = True
    where = None
    if facts is None and group.NONE_ID in key:
        where = [i for i, k in enumerate(key) if k != group.NONE_ID]
        grads, key = [grads[i] for i in where], None
        if grads and _plain(grads, backend):       # the same, for what the None entries leave
            return _finalize_torch(grads, inv_scale, max_norm, apply)
    if not grads:
        _check_inv_scale(inv_scale)
        zero = torch.zeros((), dtype=torch.float32)
        return zero, zero.clone()
    if facts is None:
        facts = group.facts_of(grads, key, check=lambda ts: _check_tensors(ts, "grads", where))
    _check_grad_dtypes(facts, where)
    if facts.device is None:
        raise ValueError(f"grads are on several devices ({sorted(map(str, facts.devices))}); "
                         f"finalize one device at a time")
    device = facts.device
    _check_inv_scale(inv_scale)
    fast_ok = facts.dtype_set <= _FAST_SET and facts.dense_failure() is None
    chosen = _choose(device, backend, fast_ok)
    if chosen == "torch":
        return reference.finalize_(list(grads), inv_scale, max_norm, apply)
    _check_plain_memory(facts, grads, "grads", where)
    inv = _inv_tensor(inv_scale, device, torch.float32)
    if chosen == "triton":
        from . import finalize as tri
        norm, found, _ = tri.finalize_(facts, inv, max_norm, apply, device)
        return norm, found
    parts = table.split(facts)
    result = torch.empty(3, dtype=torch.float32, device=device)
    with _cuda(device) as (mod, stream):
        mod.finalize([_host(facts, "ptrs", idx) for _, idx in parts],
                     [_host(facts, "numels", idx) for _, idx in parts], [_CODES[d] for d, _ in parts], inv,
                     -1.0 if max_norm is None else float(max_norm), bool(apply), result, stream)
    return result[0], result[1]


def _finalize_torch(grads: Sequence[torch.Tensor], inv_scale, max_norm: float | None, apply: bool):
    _check_inv_scale(inv_scale)
    return reference.finalize_(list(grads), inv_scale, max_norm, apply)


def _plain(grads: Sequence[torch.Tensor], backend: str | None) -> frozenset | None:
    """Will ``grads`` take the torch path, and are they fit for it (strided tensors of gradient dtypes
    on one device)? Then their dtypes, and no facts are made: on the CPU, fresh gradients every step would
    pay for them (about 1 µs per tensor) only to be told to use torch. Anything unusual (None)
    goes the long way, whose checks name the culprit."""
    choice = backend or os.environ.get("AUTOACCUM_BACKEND") or None
    first = grads[0]
    if not isinstance(first, torch.Tensor) or not (choice == "torch" or (choice is None and not first.is_cuda)):
        return None
    if not all(issubclass(t, torch.Tensor) for t in set(map(type, grads))):
        return None
    dtypes = frozenset(map(group.DTYPE, grads))
    if (dtypes <= _GRAD_SET and (all(map(group.IS_CPU, grads)) if first.is_cpu
                                 else len(set(map(group.DEVICE, grads))) == 1)
            and set(map(group.LAYOUT, grads)) == _STRIDED):   # sparse, mkldnn: the long way rejects them
        return dtypes
    return None


def _native_ok(backend: str | None) -> bool:
    """The extension is loaded, has ``accumulate_lists``, and no other backend is asked for."""
    return (hasattr(cuda_ext.loaded(), "accumulate_lists")
            and (backend or os.environ.get("AUTOACCUM_BACKEND") or "cuda") == "cuda")


def _accumulate_native(acc: group.Facts, accs: list, grads: list, w: float, weight, assign: bool,
                       backend: str | None) -> bool:
    """The extension's ``accumulate_lists``: no facts for the gradients, which autograd makes anew
    every micro-batch (about 0.5 µs per tensor in Python). For accumulators that ``_check_pairs``
    would pass and the CUDA kernels write as flat memory; None gradients are skipped there too.
    False (nothing written) sends the call the long way, whose checks name the culprit or handle
    the case (a layout to copy)."""
    if not (acc.device is not None and acc.dtype_set == _F32_SET and acc.contiguous and acc.overlap(accs) is None
            and _choose(acc.device, backend, True) == "cuda"):
        return False
    _check_weight_range(acc, w, weight)
    with _cuda(acc.device) as (mod, stream):
        return mod.accumulate_lists(accs, grads, _host(acc, "numels", None), w, bool(assign), stream) < 0


def _fit_for_torch(acc: group.Facts, accs: list, grads: list, g_dtypes: frozenset) -> bool:
    """What ``_check_pairs`` asks of a pair of lists, for gradients ``_plain`` passed (``g_dtypes``
    theirs), at C speed and without their facts: fresh gradients every micro-batch would pay
    about 0.4 µs per tensor for facts the torch path does not use. False sends the call the long
    way, whose checks name the culprit."""
    return (acc.device is not None and acc.dtype_set <= _ACC_SET and acc.dense_failure() is None
            and acc.overlap(accs) is None and grads[0].device == acc.device
            and (acc.dtype_set == _F64_SET or torch.float64 not in g_dtypes)
            and list(map(group.SHAPE, grads)) == acc.shapes)


# ---------------------------------------------------------------- checks: before anything is written
def _check_weight(weight) -> float:
    if isinstance(weight, torch.Tensor):
        if weight.numel() != 1:
            raise ValueError(f"weight must be one number; got a tensor of shape {tuple(weight.shape)}")
        weight = weight.item()
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
        raise ValueError(f"weight must be a finite number (the micro-batch's share of the items); got {weight!r}")
    return float(weight)


def _check_weight_range(acc: group.Facts, w: float, weight) -> None:
    if abs(w) > _F32_MAX and torch.float32 in acc.dtype_set:
        raise ValueError(f"weight {weight!r} is beyond float32's range, which the float32 accumulators are in; "
                         f"the weight is a micro-batch's share of the items (at most 1 in the trainer)")


def _at(where: list[int] | None, i: int) -> int:
    """Position ``i`` of the list without its None entries, as a position in the caller's list."""
    return i if where is None else where[i]


def _check_tensors(ts: list, name: str, where: list[int] | None, other: list | None = None) -> None:
    """Every entry a strided tensor: one pass over the distinct types and one over the layouts, a
    loop only to name the culprit."""
    if all(issubclass(t, torch.Tensor) for t in set(map(type, ts))):
        if set(map(group.LAYOUT, ts)) <= _STRIDED:
            return
        i = next(i for i, t in enumerate(ts) if t.layout != torch.strided)
        raise TypeError(f"{name}[{_at(where, i)}] is a {ts[i].layout} tensor; the kernels take dense (strided) "
                        f"tensors: pass t.to_dense() (a sparse gradient, e.g. from Embedding(sparse=True), "
                        f"cannot be accumulated into a dense buffer in place)")
    i = next(i for i, t in enumerate(ts) if not isinstance(t, torch.Tensor))
    k = _at(where, i)
    if other is None:
        raise TypeError(f"{name}[{k}] must be a tensor or None; got {type(ts[i]).__name__}")
    a, g = (ts[i], other[i]) if name == "accs" else (other[i], ts[i])
    raise TypeError(f"accs[{k}] and grads[{k}] must be tensors; got {type(a).__name__} and {type(g).__name__}")


def _check_pairs(acc: group.Facts, grad: group.Facts, accs: list, grads: list, where: list[int] | None) -> None:
    """Accumulators float32/float64, dense and apart; gradients of a dtype they can take, same shape and
    device. A pair of cached lists is checked once."""
    if acc.cache.get("checked with") is grad:
        return
    if not acc.dtype_set <= _ACC_SET:
        bad = acc.first(_ACC_SET.__contains__)
        raise TypeError(f"accs[{_at(where, bad)}] is {acc.dtypes[bad]}; accumulators must be float32 (or float64)")
    _check_grad_dtypes(grad, where)
    if torch.float64 in grad.dtype_set and acc.dtype_set != {torch.float64}:
        for i, (a, g) in enumerate(zip(acc.dtypes, grad.dtypes)):
            if g == torch.float64 and a != torch.float64:
                k = _at(where, i)
                raise TypeError(f"grads[{k}] is float64 but accs[{k}] is float32, which would round it; "
                                f"accumulate float64 gradients into float64")
    if acc.shapes != grad.shapes:
        i = next(i for i, (a, g) in enumerate(zip(acc.shapes, grad.shapes)) if a != g)
        k = _at(where, i)
        raise ValueError(f"accs[{k}] has shape {tuple(acc.shapes[i])} but grads[{k}] has {tuple(grad.shapes[i])}")
    if acc.device is None or grad.devices != acc.devices:
        for i, (a, g) in enumerate(zip(accs, grads)):
            if a.device != g.device:
                k = _at(where, i)
                raise ValueError(f"accs[{k}] is on {a.device} but grads[{k}] is on {g.device}")
    bad = acc.dense_failure()
    if bad is not None:
        raise ValueError(f"accs[{_at(where, bad)}] has gaps or overlaps in memory (strides {accs[bad].stride()}); "
                         f"accumulators are written as flat memory: use views of a contiguous buffer")
    pair = acc.overlap(accs)
    if pair is not None:
        raise ValueError(f"accs[{_at(where, pair[0])}] and accs[{_at(where, pair[1])}] overlap in memory; every "
                         f"accumulator needs its own memory")
    if acc.cached and grad.cached:
        acc.cache["checked with"] = grad


def _check_plain_memory(facts: group.Facts, tensors: list, name: str, where: list[int] | None) -> None:
    """What the kernels read and write is plain memory at the tensors' addresses: not a tensor without
    data (fake, zero: address 0) or a lazily negated view (its memory holds -t). The torch path takes
    both. Checked once for a cached list."""
    if facts.cache.get("plain memory"):
        return
    bad = np.flatnonzero((facts.ptrs == 0) & (facts.numels > 0))
    i = int(bad[0]) if bad.size else next((i for i, t in enumerate(tensors) if t.is_neg()), None)
    if i is not None:
        raise TypeError(f"{name}[{_at(where, i)}] is not plain memory (a fake or zero tensor, or a lazily negated "
                        f"view): the fused kernels read and write memory directly; pass a materialised tensor "
                        f"(t.clone()), or backend='torch'")
    if facts.cached:
        facts.cache["plain memory"] = True


def _check_once(key: tuple[int, ...]) -> None:
    """No tensor listed twice in ``finalize_`` (its identity key): it would count twice in the norm
    and be scaled twice, and the GPU kernels would scale it from two blocks at once."""
    if len(set(key)) == len(key):
        return
    ids = [k for k in key if k != group.NONE_ID]   # None may repeat
    if len(set(ids)) == len(ids):
        return
    seen: dict[int, int] = {}
    for i, k in enumerate(key):
        if k != group.NONE_ID and k in seen:
            raise ValueError(f"grads[{seen[k]}] and grads[{i}] are the same tensor; finalize_ scales every listed "
                             f"tensor in place, so it would count twice in the norm and be scaled twice: list "
                             f"each gradient once")
        seen.setdefault(k, i)


def _check_grad_dtypes(grad: group.Facts, where: list[int] | None) -> None:
    if not grad.dtype_set <= _GRAD_SET:
        bad = grad.first(_GRAD_SET.__contains__)
        raise TypeError(f"grads[{_at(where, bad)}] is {grad.dtypes[bad]}; gradients must be bfloat16, float16, "
                        f"float32 or float64")


def _check_inv_scale(inv_scale) -> None:
    if isinstance(inv_scale, torch.Tensor):
        if inv_scale.numel() != 1:
            raise ValueError(f"inv_scale must be one number; got a tensor of shape {tuple(inv_scale.shape)}")
        return
    if isinstance(inv_scale, bool) or not isinstance(inv_scale, (int, float)) or not inv_scale > 0 \
            or not math.isfinite(inv_scale):
        raise ValueError(f"inv_scale must be a positive finite number (1 / loss scale); got {inv_scale!r}")


_INV: dict = {}


def _inv_tensor(inv_scale, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``inv_scale`` as a one-element device tensor. A number is made with ``torch.full`` (a fill
    launched with the value as an argument; ``torch.tensor(value, device=cuda)`` would copy it from
    pageable host memory and wait for the device) once per (value, device, dtype, stream): kernels
    only read it, and on the stream that filled it (another stream would need to wait for the fill,
    and the allocator would not know the tensor is in use there)."""
    if isinstance(inv_scale, torch.Tensor):
        return inv_scale.to(device=device, dtype=dtype).reshape(1)
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (float(inv_scale), device, dtype, stream)
    hit = _INV.get(key)
    if hit is None:
        if len(_INV) >= 64:
            _INV.clear()
        hit = _INV[key] = torch.full((1,), float(inv_scale), dtype=dtype, device=device)
    return hit


# ---------------------------------------------------------------- launching
def _choose(device: torch.device, backend: str | None, fast_ok: bool) -> str:
    choice = backend or os.environ.get("AUTOACCUM_BACKEND") or None
    if choice is not None:
        return _forced(choice, fast_ok)
    if not fast_ok or device.type != "cuda":
        return "torch"
    if cuda_ext.available():
        return "cuda"
    return "triton" if _triton_ok() else "torch"


def _forced(choice: str, fast_ok: bool) -> str:
    if choice not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} (or None for automatic); got {choice!r}")
    if choice == "cuda" and not cuda_ext.available():
        raise RuntimeError(f"backend='cuda' was asked for, but the CUDA extension is unavailable: "
                           f"{cuda_ext.reason()}")
    if choice == "triton" and not _triton_ok():
        raise RuntimeError("backend='triton' was asked for, but triton cannot be imported")
    return choice if fast_ok or choice == "torch" else "torch"


def _host(facts: group.Facts, what: str, idx) -> torch.Tensor:
    """``facts.ptrs`` or ``facts.numels`` (the ``idx`` part) as a CPU int64 tensor for the extension."""
    key = ("host", what, None if idx is None else idx.tobytes())
    hit = facts.cache.get(key)
    if hit is None:
        hit = torch.from_numpy(table.pick(getattr(facts, what), idx))
        if facts.cached:
            facts.cache[key] = hit
    return hit


@contextlib.contextmanager
def _cuda(device: torch.device):
    """Within: ``device`` is the current device (the binding launches there), and this yields the
    extension and that device's current stream; after: the caller's current device as it was."""
    with torch.cuda.device(device):
        yield cuda_ext.load(), torch.cuda.current_stream(device).cuda_stream


@functools.cache
def _triton_ok() -> bool:
    try:
        import triton  # noqa: F401
        return True
    except ImportError:
        return False
