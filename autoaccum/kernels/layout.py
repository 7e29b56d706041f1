"""Dense tensors as flat memory.

The kernels read and write flat memory. A gradient laid out like its parameter (channels_last, a
transposed weight) is not contiguous but is *dense*: some permutation of its dimensions is. Two
tensors permuted by the same order line up element for element, so they can be processed as
flat memory without a copy.
"""
from __future__ import annotations

import torch


def dense_order(t: torch.Tensor) -> list[int]:
    """The dimensions from the largest stride to the smallest (size-1 dimensions last)."""
    return sorted(range(t.dim()), key=lambda d: (t.size(d) != 1, t.stride(d)), reverse=True)


def is_dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense: some permutation of the dimensions makes ``t`` contiguous."""
    return all(s >= 0 for s in t.stride()) and t.permute(dense_order(t)).is_contiguous()


def in_memory_order(t: torch.Tensor, order: list[int] | None = None) -> torch.Tensor:
    """``t`` with its dimensions in memory order (``order``, default its own): for dense ``t`` a
    contiguous view sharing its memory."""
    if t.is_contiguous() and order is None:
        return t
    return t.permute(dense_order(t) if order is None else order)
