"""Gradient finalize in Triton: norm + inf/nan check in one read pass, the scale in one write pass.

Stage 1 (one program per chunk) reads the gradients once and writes per-chunk partials: the
largest finite magnitude ``m`` and ``s = sum((|g| / m)^2)`` (rescaled as the chunk is read, as
LAPACK's nrm2 does, so neither huge values overflow nor tiny ones underflow), and a non-finite
flag. Stage 2 (a single program, fixed order: deterministic, no atomics) combines them in float64
into the norm of the unscaled gradients, the found-inf flag and the factor
``inv_scale * min(1, max_norm / (norm + 1e-6))``. Stage 3 multiplies the gradients by that factor
in place, and writes nothing when a value is non-finite or the factor is exactly 1.

Bytes per fp32 element: 4 (stage 1) + 8 (stage 3) against PyTorch's 20 for ``GradScaler.unscale_``
+ ``clip_grad_norm_``; with the factor folded into a fused optimizer, 4.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import table
from .accumulate import BLOCK, CHUNK, ITERS, NUM_WARPS, TL_DTYPES
from .group import Facts
from .reference import CLIP_EPS

REDUCE_BLOCK = 1024


@triton.jit
def _partials_kernel(grad_ptrs, numels, chunk_tensor, chunk_start, part_max, part_ssq, part_bad, offset,
                     GRAD_DTYPE: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    pid = tl.program_id(0)
    t = tl.load(chunk_tensor + pid)
    start = tl.load(chunk_start + pid)
    n = tl.load(numels + t)
    grad = tl.load(grad_ptrs + t).to(tl.pointer_type(GRAD_DTYPE))
    run_max = tl.zeros((), dtype=tl.float32)
    run_ssq = tl.zeros((), dtype=tl.float32)
    bad = tl.zeros((), dtype=tl.int32)
    for i in tl.static_range(ITERS):
        offs = start + i * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        g = tl.abs(tl.load(grad + offs, mask=mask, other=0.0).to(tl.float32))
        finite = g < float("inf")           # false for inf and nan
        bad = tl.maximum(bad, tl.max(tl.where(finite, 0, 1), axis=0))
        g = tl.where(finite, g, 0.0)
        new_max = tl.maximum(run_max, tl.max(g, axis=0))
        inv = tl.where(new_max > 0, 1.0 / new_max, 0.0)
        r = g * inv
        shrink = run_max * inv
        run_ssq = run_ssq * shrink * shrink + tl.sum(r * r, axis=0)
        run_max = new_max
    tl.store(part_max + offset + pid, run_max)
    tl.store(part_ssq + offset + pid, run_ssq)
    tl.store(part_bad + offset + pid, bad)


@triton.jit
def _combine_kernel(part_max, part_ssq, part_bad, count, inv_scale_ptr, out, max_norm, eps,
                    HAS_MAX_NORM: tl.constexpr, BLOCK: tl.constexpr):
    total = tl.zeros((), dtype=tl.float64)
    bad = tl.zeros((), dtype=tl.int32)
    for start in range(0, count, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < count
        m = tl.load(part_max + offs, mask=mask, other=0.0).to(tl.float64)
        s = tl.load(part_ssq + offs, mask=mask, other=0.0).to(tl.float64)
        total += tl.sum(m * m * s, axis=0)
        bad = tl.maximum(bad, tl.max(tl.load(part_bad + offs, mask=mask, other=0), axis=0))
    inv_scale = tl.load(inv_scale_ptr).to(tl.float64)
    norm = tl.sqrt(total) * inv_scale
    norm = tl.where(bad > 0, float("inf"), norm)    # a non-finite gradient has no finite norm
    scale = inv_scale
    if HAS_MAX_NORM:
        coef = max_norm / (norm + eps)
        scale = scale * tl.minimum(coef, 1.0)
    tl.store(out + 0, norm.to(tl.float32))
    tl.store(out + 1, bad.to(tl.float32))
    tl.store(out + 2, scale.to(tl.float32))


@triton.jit
def _scale_kernel(grad_ptrs, numels, chunk_tensor, chunk_start, result,
                  GRAD_DTYPE: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    found_inf = tl.load(result + 1)
    scale = tl.load(result + 2)
    if (found_inf == 0) & (scale != 1.0):
        pid = tl.program_id(0)
        t = tl.load(chunk_tensor + pid)
        start = tl.load(chunk_start + pid)
        n = tl.load(numels + t)
        grad = tl.load(grad_ptrs + t).to(tl.pointer_type(GRAD_DTYPE))
        for i in tl.static_range(ITERS):
            offs = start + i * BLOCK + tl.arange(0, BLOCK)
            mask = offs < n
            g = tl.load(grad + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(grad + offs, (g * scale).to(GRAD_DTYPE), mask=mask)


def finalize_(grads: Facts, inv_scale: torch.Tensor, max_norm: float | None, apply: bool, device: torch.device
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns 0-dim views of one float32 result tensor: (norm, found_inf, scale). ``inv_scale`` is a
    one-element float32 tensor on ``device``; ``grads`` hold the (dense) gradients' addresses and sizes."""
    parts = [(dtype, *table.layout(grads, idx, CHUNK, device)) for dtype, idx in table.split(grads)]
    count = max(sum(lay.programs for _, lay, _ in parts), 1)
    work = torch.empty(3 + 3 * count, dtype=torch.float32, device=device)   # one allocation for every output
    result, part_max, part_ssq = work[:3], work[3:3 + count], work[3 + count:3 + 2 * count]
    part_bad = work[3 + 2 * count:].view(torch.int32)
    offset = 0
    for dtype, lay, ptrs in parts:
        if lay.programs:
            _partials_kernel[(lay.programs,)](ptrs, lay.numels, lay.chunk_tensor, lay.chunk_start, part_max,
                                              part_ssq, part_bad, offset, GRAD_DTYPE=TL_DTYPES[dtype],
                                              BLOCK=BLOCK, ITERS=ITERS, num_warps=NUM_WARPS)
        offset += lay.programs
    _combine_kernel[(1,)](part_max, part_ssq, part_bad, offset, inv_scale, result,
                          float(max_norm) if max_norm is not None else 0.0, CLIP_EPS,
                          HAS_MAX_NORM=max_norm is not None, BLOCK=REDUCE_BLOCK, num_warps=NUM_WARPS)
    if apply:
        for dtype, lay, ptrs in parts:
            if lay.programs:
                _scale_kernel[(lay.programs,)](ptrs, lay.numels, lay.chunk_tensor, lay.chunk_start, result,
                                               GRAD_DTYPE=TL_DTYPES[dtype], BLOCK=BLOCK, ITERS=ITERS,
                                               num_warps=NUM_WARPS)
    return result[0], result[1], result[2]
