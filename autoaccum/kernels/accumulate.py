"""Fused gradient accumulation in Triton: ``acc (+)= weight * float(g)`` over many tensors in one launch.

Bytes per element: assign reads the gradient and writes the accumulator (2 + 4 = 6 for bf16);
accumulate also reads the accumulator (2 + 4 + 4 = 10). One program handles one chunk of one
tensor, found through the launch table (see ``table.py``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import table
from .group import Facts

BLOCK = 1024
ITERS = 8
CHUNK = BLOCK * ITERS
NUM_WARPS = 4

TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@triton.jit
def _accumulate_kernel(acc_ptrs, grad_ptrs, numels, chunk_tensor, chunk_start, weight,
                       GRAD_DTYPE: tl.constexpr, ASSIGN: tl.constexpr, BLOCK: tl.constexpr,
                       ITERS: tl.constexpr):
    pid = tl.program_id(0)
    t = tl.load(chunk_tensor + pid)
    start = tl.load(chunk_start + pid)
    n = tl.load(numels + t)
    acc = tl.load(acc_ptrs + t).to(tl.pointer_type(tl.float32))
    grad = tl.load(grad_ptrs + t).to(tl.pointer_type(GRAD_DTYPE))
    for i in tl.static_range(ITERS):
        offs = start + i * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        g = tl.load(grad + offs, mask=mask, other=0.0).to(tl.float32)
        if ASSIGN:
            out = weight * g
        else:
            out = tl.load(acc + offs, mask=mask, other=0.0) + weight * g
        tl.store(acc + offs, out, mask=mask)


def accumulate_(acc: Facts, grad: Facts, weight: float, assign: bool, device: torch.device) -> None:
    """One launch per gradient dtype; the pairs were checked (fp32 accumulators, gradients laid out
    like them) and ``acc``/``grad`` hold their addresses and sizes."""
    for dtype, idx in table.split(grad):
        lay, acc_ptrs = table.layout(acc, idx, CHUNK, device)
        if lay.programs == 0:
            continue
        _accumulate_kernel[(lay.programs,)](
            acc_ptrs, table.addresses(grad, idx, device), lay.numels, lay.chunk_tensor, lay.chunk_start,
            float(weight), GRAD_DTYPE=TL_DTYPES[dtype], ASSIGN=bool(assign), BLOCK=BLOCK, ITERS=ITERS,
            num_warps=NUM_WARPS)

