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


def in_memory_order(t: torch.Tensor, order: list[int] | None = None) -> torch.Tensor | None:
    """``t`` with its dimensions in memory order (``order``, default its own): a contiguous view
    sharing its memory (``t`` itself when contiguous), or None when ``t`` has gaps or overlaps."""
    if order is None and t.is_contiguous():
        return t
    if any(s < 0 for s in t.stride()):
        return None
    view = t.permute(dense_order(t) if order is None else order)
    return view if view.is_contiguous() else None
