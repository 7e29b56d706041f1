"""Launch tables for multi-tensor kernels: one launch over many tensors of different sizes.

Apex's ``multi_tensor_apply`` packs tensor addresses and sizes into kernel arguments and maps
every block to a (tensor, chunk) pair. Triton takes no arrays of pointers as arguments, so the
same table lives in a small int64 device tensor: per tensor its addresses and element count,
per program the tensor it works on and where its chunk starts. Tables are cached by addresses
and sizes (the caching allocator hands autograd the same addresses step after step), so a
repeated call costs no host-to-device copy.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

_CACHE: OrderedDict = OrderedDict()
_CACHE_SIZE = 32


@dataclass
class Table:
    ptrs: list[torch.Tensor]     # one int64 tensor of addresses per operand list
    numels: torch.Tensor         # int64 [tensors]
    chunk_tensor: torch.Tensor   # int64 [programs]: which tensor a program works on
    chunk_start: torch.Tensor    # int64 [programs]: first element of its chunk
    programs: int


def build(operands: list[list[torch.Tensor]], chunk: int) -> Table:
    """A table over tensors ``operands[k][i]`` (same numel for every k), chunks of ``chunk`` elements."""
    first = operands[0]
    device = first[0].device
    numels = np.fromiter((t.numel() for t in first), dtype=np.int64, count=len(first))
    addresses = [np.fromiter((t.data_ptr() for t in ts), dtype=np.int64, count=len(ts)) for ts in operands]
    key = (device, chunk, numels.tobytes(), *(a.tobytes() for a in addresses))
    hit = _CACHE.get(key)
    if hit is not None:
        _CACHE.move_to_end(key)
        return hit
    per_tensor = (numels + chunk - 1) // chunk
    chunk_tensor = np.repeat(np.arange(len(first), dtype=np.int64), per_tensor)
    firsts = np.cumsum(per_tensor) - per_tensor
    chunk_start = (np.arange(int(per_tensor.sum()), dtype=np.int64) - np.repeat(firsts, per_tensor)) * chunk
    host = torch.from_numpy(np.concatenate([*addresses, numels, chunk_tensor, chunk_start]))
    if device.type == "cuda":
        host = host.pin_memory()
    flat = host.to(device, non_blocking=True)
    n = len(first)
    ptrs = [flat[k * n:(k + 1) * n] for k in range(len(operands))]
    rest = flat[len(operands) * n:]
    programs = len(chunk_tensor)
    table = Table(ptrs=ptrs, numels=rest[:n], chunk_tensor=rest[n:n + programs],
                  chunk_start=rest[n + programs:], programs=programs)
    _CACHE[key] = table
    if len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return table
