"""The torch definitions of what every kernel must compute; also the path on CPUs and other devices.

``accumulate_``: ``acc = weight * float(g)`` (assign) or ``acc += weight * float(g)``, per pair,
  ``None`` gradients skipped.
``finalize_``: the 2-norm of the unscaled gradients ``inv_scale * g`` (inf when any element is
  inf/nan) and whether any element is inf/nan; then, unless something is non-finite, ``g *= inv_scale * min(1, max_norm / (norm + 1e-6))``
  (the clip coefficient of ``torch.nn.utils.clip_grad_norm_``).
"""
from __future__ import annotations

import math
from collections import defaultdict

import torch

from .group import DEVICE, DTYPE, IS_CPU

CLIP_EPS = 1e-6  # clip_grad_norm_'s epsilon
# A square below fp32's smallest normal (2**-126) loses digits or is flushed to zero, so an fp32
# sum of squares over n elements may miss up to n * 2**-126. That is below 2**-24 of the total
# whenever total**2 >= n_total * UNDERFLOW_BOUND: then nothing is read again. Only gradients
# that are tiny as a whole (a few nano-units at a billion elements) have their small tensors
# re-read in float64; a fixed per-tensor threshold re-read every layer of a deep network with
# vanishing gradients, every step.
UNDERFLOW_BOUND = 2.0 ** -102
SURELY_CLEAR = UNDERFLOW_BOUND * 2.0 ** 63    # a sum of squares this large needs no check (any numel)
DOT_FROM = 1 << 16     # fp32 tensors this large are squared by BLAS's dot


def accumulate_(accs: list[torch.Tensor], grads: list[torch.Tensor], weight: float, assign: bool) -> None:
    groups: dict = defaultdict(lambda: ([], []))
    for a, g in zip(accs, grads):
        a_list, g_list = groups[(a.device, a.dtype, g.dtype)]
        a_list.append(a)
        g_list.append(g if g.shape == a.shape else g.reshape(a.shape))
    for a_list, g_list in groups.values():   # one dtype pair per group: same-dtype groups take foreach's fast path
        if assign:
            torch._foreach_copy_(a_list, g_list)      # exact widening cast, then one rounding in mul
            torch._foreach_mul_(a_list, factor(weight, a_list[0].dtype))
        else:   # a narrower gradient is widened exactly inside the op: bitwise g.to(acc) then add_
            torch._foreach_add_(a_list, g_list, alpha=weight)


def norm_and_flag(grads: list[torch.Tensor], inv_scale) -> tuple[torch.Tensor, torch.Tensor]:
    """(2-norm of ``inv_scale * g`` as float64, found_inf as float32 0/1), both 0-dim.

    One read: per-tensor sums of squares with fp32 accumulation, combined in float64 (float64
    tensors accumulate in float64): BLAS's ``dot`` for large fp32 tensors, ``_foreach_norm`` for
    the rest. A tensor whose fp32 sum overflowed (inf) is read again in float64 (a real inf/nan
    stays inf/nan); so is one that may have lost digits to underflow, when that could show in the
    total (``UNDERFLOW_BOUND``). Relative error against a float64 reference: 4e-8 at 10M and
    7e-7 at 100M elements (``clip_grad_norm_``: 2e-7 and 6e-6; benchmarks/bench_reference.py).
    On the CPU the per-tensor norms are combined in Python floats (every op is synchronous there,
    and a dozen tiny tensor ops would cost more than a small model's norms); elsewhere on the
    device, with one host read for the rescue check.
    """
    device = grads[0].device
    if device.type == "cpu":
        norm = host_norm(grads, inv_scale)
        found = not math.isfinite(norm)
        return (torch.tensor(math.inf if found else norm, dtype=torch.float64),
                torch.tensor(1.0 if found else 0.0, dtype=torch.float32))
    return device_norm_and_flag(grads, inv_scale, device)


def device_norm_and_flag(grads: list[torch.Tensor], inv_scale, device: torch.device
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`norm_and_flag` combined on the device (any device; the CPU takes :func:`host_norm`)."""
    norms, ordered = [], []
    for dtype, large, rest in _norm_groups(grads):
        if large:
            squares = torch.stack([torch.dot(v, v) for v in (g.view(-1) for g in large)])
            norms.append(squares.to(device=device, dtype=torch.float64).sqrt())
        if rest:
            norms.append(torch.stack(_foreach_norm(rest, dtype)).to(device=device, dtype=torch.float64))
        ordered += large + rest
    per_tensor = torch.cat(norms)
    bound = UNDERFLOW_BOUND * sum(g.numel() for g in ordered if g.dtype != torch.float64)
    checks = torch.stack([(~torch.isfinite(per_tensor)).any(), per_tensor.square().sum() < bound])
    overflowed, tiny = checks.tolist()                         # the one host read
    if overflowed or tiny:
        values = per_tensor.tolist()
        for i in _rescued(values, ordered):
            per_tensor[i] = torch.linalg.vector_norm(ordered[i], dtype=torch.float64)
    norm = torch.linalg.vector_norm(per_tensor) * _as_tensor(inv_scale, device, torch.float64)
    found_inf = (~torch.isfinite(norm)).to(torch.float32)
    return torch.where(found_inf > 0, float("inf"), norm), found_inf


def host_norm(grads: list[torch.Tensor], inv_scale) -> float:
    """``norm_and_flag``'s norm as a Python float (inf or nan when a value is non-finite), for CPU tensors."""
    values: list[float] = []
    ordered: list[torch.Tensor] = []
    for dtype, large, rest in _norm_groups(grads):
        if large:
            squares = torch.stack([torch.dot(v, v) for v in (g.view(-1) for g in large)]).tolist()
            values += [math.sqrt(x) if x >= 0 else x for x in squares]   # nan stays nan
        if rest:
            values += [n.item() for n in _foreach_norm(rest, dtype)]   # on the CPU: cheaper than a stack
        ordered += large + rest
    total = math.fsum(v * v for v in values)
    if not SURELY_CLEAR <= total < math.inf:     # inf, nan, or small enough that underflow could matter
        for i in _rescued(values, ordered):
            values[i] = torch.linalg.vector_norm(ordered[i], dtype=torch.float64).item()
        total = math.fsum(v * v for v in values)
    return math.sqrt(total) * _as_float(inv_scale)


def _rescued(norms: list[float], grads: list[torch.Tensor]) -> list[int]:
    """Which fp32-accumulated norms to read again in float64: every non-finite one (an overflowed
    square, or a real inf/nan, which stays), and - when the whole sum of squares is small enough
    for underflow to matter - every one of a tensor that could have lost digits."""
    low = [i for i, g in enumerate(grads) if g.dtype != torch.float64]
    redo = [i for i in low if not math.isfinite(norms[i])]
    finite = [norms[i] for i in low if math.isfinite(norms[i])]
    if math.fsum(v * v for v in finite) < UNDERFLOW_BOUND * sum(grads[i].numel() for i in low):
        redo += [i for i in low if math.isfinite(norms[i]) and norms[i] ** 2 < UNDERFLOW_BOUND * grads[i].numel()]
    return redo


def _norm_groups(grads: list[torch.Tensor]):
    """Per dtype: (dtype, fp32 tensors large enough for BLAS's dot, the rest). BLAS keeps several
    partial sums: 10x less rounding than one running sum, as fast."""
    for (_, dtype), gs in _by_dtype(grads).items():
        large = [g for g in gs if g.numel() >= DOT_FROM and g.is_contiguous()] if dtype == torch.float32 else []
        if large:
            chosen = {id(g) for g in large}
            gs = [g for g in gs if id(g) not in chosen]
        yield dtype, large, gs


def _foreach_norm(gs: list[torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
    return torch._foreach_norm(gs, 2, dtype=torch.float64 if dtype == torch.float64 else torch.float32)


def clip_scale(norm: torch.Tensor, inv_scale, max_norm: float | None) -> torch.Tensor:
    """The factor applied to the (scaled) gradients: ``inv_scale * clip_coef`` (float64)."""
    scale = _as_tensor(inv_scale, norm.device, torch.float64)
    if max_norm is not None:
        scale = scale * torch.clamp(max_norm / (norm + CLIP_EPS), max=1.0)
    return scale


def finalize_(grads: list[torch.Tensor], inv_scale, max_norm: float | None, apply: bool
              ) -> tuple[torch.Tensor, torch.Tensor]:
    if grads[0].is_cpu:       # in Python floats: the factor is a number, no tensor ops make it
        norm = host_norm(grads, inv_scale)
        found = not math.isfinite(norm)
        if apply and not found:
            inv = _as_float(inv_scale)
            scale = inv if max_norm is None else inv * min(1.0, max_norm / (norm + CLIP_EPS))
            if scale != 1.0:                  # nothing clipped or unscaled: no write
                for (_, dtype), gs in _by_dtype(grads).items():
                    torch._foreach_mul_(gs, factor(scale, dtype))
        return (torch.scalar_tensor(math.inf if found else norm, dtype=torch.float32),
                torch.scalar_tensor(1.0 if found else 0.0, dtype=torch.float32))
    norm, found_inf = norm_and_flag(grads, inv_scale)
    if apply:
        scale = torch.where(found_inf > 0, 1.0, clip_scale(norm, inv_scale, max_norm))
        for (device, dtype), gs in _by_dtype(grads).items():   # off the CPU a factor tensor is read in
            torch._foreach_mul_(gs, scale.to(device=device, dtype=dtype))   # the list's dtype anyway
    return norm.to(torch.float32), found_inf


def _by_dtype(grads: list[torch.Tensor]) -> dict:
    first = grads[0]
    if len(set(map(DTYPE, grads))) == 1 and (all(map(IS_CPU, grads)) if first.is_cpu
                                               else len(set(map(DEVICE, grads))) == 1):   # the usual case
        return {(first.device, first.dtype): grads}
    groups: dict = defaultdict(list)
    for g in grads:
        groups[(g.device, g.dtype)].append(g)
    return groups


def factor(x: float, dtype: torch.dtype) -> torch.Tensor:
    """``x`` as the 0-dim CPU tensor ``_foreach_mul_`` should multiply CPU tensors of ``dtype`` by:
    float64 for float64 tensors, else float32 (the precision ``t.mul_(x)`` computes bf16/fp16 in on
    the CPU, and the kernels' factor). Each element then comes out as ``t.mul_(x)`` makes it. Given
    the Python number, PyTorch's CPU foreach rounds it to bf16/fp16 first (a 2**-9 error in the
    factor for bf16) and runs an op per tensor, where a tensor runs one kernel (1,000 small fp32
    tensors: 1.3 ms -> 0.34). On CUDA a list of accumulators (float32/float64) reads it as a number."""
    return torch.tensor(x, dtype=torch.float64 if dtype == torch.float64 else torch.float32)


def _as_float(x) -> float:
    return float(x.item() if isinstance(x, torch.Tensor) else x)


def _as_tensor(x, device, dtype) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.to(device=device, dtype=dtype).reshape(())
    return torch.full((), float(x), device=device, dtype=dtype)   # a fill, not a blocking host-to-device copy
