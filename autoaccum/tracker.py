"""Peak live tensor bytes without an allocator to ask: a dispatch mode that watches storages.

On the CPU, and under FakeTensorMode (where nothing is allocated at all), there is no
``max_memory_allocated``. This mode sees every op's outputs and keeps the peak of the bytes of
the storages alive. It is seeded with the storages that exist before it (parameters,
gradients, optimizer state): they are counted once, from the start, and leave the count when
they die. An op's output costs nothing when its storage is already known or is the storage
of one of the op's inputs (in-place ops, views, ``detach``, an optimizer's in-place update of a
parameter), as in a real allocator; only a storage the op created is new memory.
"""
from __future__ import annotations

import weakref
from collections.abc import Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

ROUND_CUDA = 512  # the CUDA caching allocator rounds every block up to a multiple of 512 bytes


class LiveBytes(TorchDispatchMode):
    """Tracks the bytes of live storages: the ``existing`` ones it is seeded with, and each one an
    op creates while the mode is active.

    ``extra_bytes`` is a constant added to every reading (a workspace the allocator would hold);
    ``round_to`` models an allocator's block rounding.
    """

    def __init__(self, existing: Iterable[torch.Tensor] = (), *, extra_bytes: int = 0, round_to: int = 1):
        super().__init__()
        self.extra_bytes = extra_bytes
        self.round_to = round_to
        self.live = 0
        self.peak_live = 0
        self._refs: dict[int, weakref.ref] = {}
        self._foreign: dict[int, weakref.ref] = {}   # storages older than the mode that nobody seeded
        for t in existing:
            if isinstance(t, torch.Tensor):
                self._count(t)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = None
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = _storage(t)
            if storage is None or self._known(storage):
                continue
            if inputs is None:
                inputs = {id(s) for s in map(_storage, _tensors((args, kwargs))) if s is not None}
            if id(storage) in inputs:
                self._remember_foreign(storage)   # an alias of memory that existed before: free
            else:
                self._count(t)
        return out

    def exclude(self, tensors: Iterable[torch.Tensor]) -> None:
        """Stop counting the storages behind ``tensors`` (memory that lives outside what is measured,
        like the host batch); ops that alias them stay free."""
        for t in tensors:
            storage = _storage(t) if isinstance(t, torch.Tensor) else None
            if storage is None:
                continue
            ref = self._refs.pop(id(storage), None)
            if ref is not None and ref() is storage:
                self.live -= _rounded(storage.nbytes(), self.round_to)
            self._remember_foreign(storage)

    def _known(self, storage: torch.UntypedStorage) -> bool:
        for table in (self._refs, self._foreign):
            ref = table.get(id(storage))
            if ref is not None and ref() is storage:
                return True
        return False

    def _count(self, t: torch.Tensor) -> None:
        storage = _storage(t)
        if storage is None or self._known(storage):
            return
        key = id(storage)
        size = _rounded(storage.nbytes(), self.round_to)
        self.live += size
        self.peak_live = max(self.peak_live, self.live)
        self._refs[key] = weakref.ref(storage, lambda _, k=key, s=size: self._release(k, s))

    def _remember_foreign(self, storage: torch.UntypedStorage) -> None:
        key = id(storage)
        self._foreign[key] = weakref.ref(storage, lambda _, k=key: self._foreign.pop(k, None))

    def _release(self, key: int, size: int) -> None:
        self.live -= size
        self._refs.pop(key, None)

    @property
    def current(self) -> int:
        return self.extra_bytes + self.live

    @property
    def peak(self) -> int:
        return self.extra_bytes + self.peak_live

    def reset_peak(self) -> None:
        self.peak_live = self.live


def storage_bytes(tensors: Iterable[torch.Tensor], round_to: int = 1) -> int:
    """Bytes of the distinct storages behind ``tensors`` (shared storages counted once)."""
    seen: dict[int, torch.UntypedStorage] = {}  # holding them keeps every id unique
    for t in tensors:
        if isinstance(t, torch.Tensor):
            st = _storage(t)
            if st is not None:
                seen.setdefault(id(st), st)
    return sum(_rounded(st.nbytes(), round_to) for st in seen.values())


def _storage(t: torch.Tensor) -> torch.UntypedStorage | None:
    try:
        return t.untyped_storage()
    except (RuntimeError, NotImplementedError):  # tensors without storage (sparse, nested)
        return None


def _tensors(tree) -> list[torch.Tensor]:
    return [t for t in tree_leaves(tree) if isinstance(t, torch.Tensor)]


def _rounded(n: int, to: int) -> int:
    return -(-n // to) * to if to > 1 else n
