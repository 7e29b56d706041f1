"""Peak live tensor bytes without an allocator to ask: a dispatch mode that watches storages.

On the CPU, and under FakeTensorMode (where nothing is allocated at all), there is no
``max_memory_allocated``. This mode sees every op's outputs, counts each new storage's bytes
once while it is alive (a weak reference tells when it dies) and keeps the peak. Views and
in-place results share a storage and cost nothing, as in a real allocator.
"""
from __future__ import annotations

import weakref
from collections.abc import Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

ROUND_CUDA = 512  # the CUDA caching allocator rounds every block up to a multiple of 512 bytes


class LiveBytes(TorchDispatchMode):
    """Tracks bytes of storages created while the mode is active.

    ``baseline`` is what existed before (parameters, gradients, optimizer state); ``current``
    and ``peak`` include it. ``round_to`` models an allocator's block rounding.
    """

    def __init__(self, baseline: int = 0, round_to: int = 1):
        super().__init__()
        self.baseline = baseline
        self.round_to = round_to
        self.live = 0
        self.peak_live = 0
        self._refs: dict[int, weakref.ref] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out

    def _track(self, t: torch.Tensor) -> None:
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # tensors without storage (sparse, nested)
            return
        key = id(storage)
        ref = self._refs.get(key)
        if ref is not None and ref() is storage:
            return
        size = _rounded(storage.nbytes(), self.round_to)
        self.live += size
        self.peak_live = max(self.peak_live, self.live)
        self._refs[key] = weakref.ref(storage, lambda _, k=key, s=size: self._release(k, s))

    def _release(self, key: int, size: int) -> None:
        self.live -= size
        self._refs.pop(key, None)

    @property
    def current(self) -> int:
        return self.baseline + self.live

    @property
    def peak(self) -> int:
        return self.baseline + self.peak_live

    def reset_peak(self) -> None:
        self.peak_live = self.live


def storage_bytes(tensors: Iterable[torch.Tensor], round_to: int = 1) -> int:
    """Bytes of the distinct storages behind ``tensors`` (shared storages counted once)."""
    seen: dict[int, torch.UntypedStorage] = {}  # holding them keeps every id unique
    for t in tensors:
        if isinstance(t, torch.Tensor):
            st = t.untyped_storage()
            seen.setdefault(id(st), st)
    return sum(_rounded(st.nbytes(), round_to) for st in seen.values())


def _rounded(n: int, to: int) -> int:
    return -(-n // to) * to if to > 1 else n
