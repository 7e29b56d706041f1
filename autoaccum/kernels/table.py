"""Launch tables for multi-tensor kernels: one launch over many tensors of different sizes.

Apex's ``multi_tensor_apply`` packs tensor addresses and sizes into kernel arguments and maps
every block to a (tensor, chunk) pair. Triton takes no arrays of pointers as arguments, so the
same table lives in small int64 device tensors: per tensor its address and element count, per
program the tensor it works on and where its chunk starts. The parts that depend only on the
tensor list (sizes, chunk map, the addresses of a repeated list) are cached in the list's
:class:`~autoaccum.kernels.group.Facts`; addresses of fresh tensors are uploaded per call, from
pinned memory without waiting.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .group import Facts


@dataclass
class Layout:
    numels: torch.Tensor         # int64 [tensors]
    chunk_tensor: torch.Tensor   # int64 [programs]: which tensor a program works on
    chunk_start: torch.Tensor    # int64 [programs]: first element of its chunk
    programs: int


def upload(arrays: list[np.ndarray], device: torch.device) -> list[torch.Tensor]:
    """Host int64 arrays as device tensors, in one copy that does not wait for the device."""
    host = torch.from_numpy(np.concatenate(arrays) if len(arrays) > 1 else np.ascontiguousarray(arrays[0]))
    if device.type == "cuda":
        flat = host.pin_memory().to(device, non_blocking=True)
    else:
        flat = host.to(device, copy=True)
    out, start = [], 0
    for a in arrays:
        out.append(flat[start:start + len(a)])
        start += len(a)
    return out


def by_dtype(dtypes: list[torch.dtype]) -> list[tuple[torch.dtype, np.ndarray | None]]:
    """The tensors grouped by dtype: (dtype, indices), indices None when all share one dtype."""
    kinds = set(dtypes)
    if len(kinds) == 1:
        return [(dtypes[0], None)]
    order = {d: k for k, d in enumerate(kinds)}
    codes = np.fromiter((order[d] for d in dtypes), dtype=np.int64, count=len(dtypes))
    return [(d, np.flatnonzero(codes == k)) for d, k in order.items()]


def split(facts: Facts) -> list[tuple[torch.dtype, np.ndarray | None]]:
    """``by_dtype`` of ``facts``' tensors (one launch per group), kept with facts that are cached."""
    hit = facts.cache.get("by_dtype")
    if hit is None:
        hit = by_dtype(facts.dtypes)
        if facts.cached:
            facts.cache["by_dtype"] = hit
    return hit


def pick(a: np.ndarray, idx: np.ndarray | None) -> np.ndarray:
    return a if idx is None else a[idx]


def layout(facts: Facts, idx: np.ndarray | None, chunk: int, device: torch.device) -> tuple[Layout, torch.Tensor]:
    """The chunk map of ``facts``' tensors ``idx`` and their addresses on ``device``, cached in ``facts``."""
    key = ("layout", chunk, None if idx is None else idx.tobytes())
    hit = facts.cache.get(key)
    if hit is None:
        numels = pick(facts.numels, idx)
        per_tensor = (numels + chunk - 1) // chunk
        chunk_tensor = np.repeat(np.arange(len(numels), dtype=np.int64), per_tensor)
        firsts = np.cumsum(per_tensor) - per_tensor
        chunk_start = (np.arange(int(per_tensor.sum()), dtype=np.int64) - np.repeat(firsts, per_tensor)) * chunk
        ptrs, n, ct, cs = upload([pick(facts.ptrs, idx), numels, chunk_tensor, chunk_start], device)
        hit = (Layout(n, ct, cs, len(chunk_tensor)), ptrs)
        facts.cache[key] = hit
    return hit


def addresses(facts: Facts, idx: np.ndarray | None, device: torch.device) -> torch.Tensor:
    """``facts``' addresses ``idx`` on ``device``: cached for a repeated list, uploaded for a fresh one."""
    if not facts.cached:
        return upload([pick(facts.ptrs, idx)], device)[0]
    key = ("ptrs", None if idx is None else idx.tobytes())
    hit = facts.cache.get(key)
    if hit is None:
        hit = facts.cache[key] = upload([pick(facts.ptrs, idx)], device)[0]
    return hit
