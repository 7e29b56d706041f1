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


class _Storage:
    """What the tracker knows of one storage: bytes it does not charge (a storage older than the
    mode that nobody seeded: its size when first seen) and bytes it charges now."""

    __slots__ = ("ref", "free", "charged")

    def __init__(self, ref: weakref.ref, free: int, charged: int):
        self.ref, self.free, self.charged = ref, free, charged


class LiveBytes(TorchDispatchMode):
    """Tracks the bytes of live storages: the ``existing`` ones it is seeded with, and each one an
    op creates while the mode is active. A storage that grows later (``out=`` into a smaller
    tensor, ``resize_``) is charged its growth.

    ``extra_bytes`` is a constant added to every reading (a workspace the allocator would hold);
    ``round_to`` models an allocator's block rounding.
    """

    def __init__(self, existing: Iterable[torch.Tensor] = (), *, extra_bytes: int = 0, round_to: int = 1):
        super().__init__()
        self.extra_bytes = extra_bytes
        self.round_to = round_to
        self.live = 0
        self.peak_live = 0
        self._known: dict[int, _Storage] = {}
        for t in existing:
            storage = _storage(t) if isinstance(t, torch.Tensor) else None
            if storage is not None:
                self._admit(storage, free=False)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func._schema.is_mutable:      # in place or out=: an older storage it grows is charged the growth
            for t in _tensors((args, kwargs)):
                storage = _storage(t)
                if storage is not None and self._entry(storage) is None:
                    self._admit(storage, free=True)
        out = func(*args, **kwargs)
        inputs = None
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = _storage(t)
            if storage is None:
                continue
            known = self._entry(storage)
            if known is not None:
                self._charge(known, storage)      # in place, a view, or out=: free unless it grew
                continue
            if inputs is None:
                inputs = {id(s) for s in map(_storage, _tensors((args, kwargs))) if s is not None}
            self._admit(storage, free=id(storage) in inputs)   # an alias of older memory costs nothing
        return out

    def exclude(self, tensors: Iterable[torch.Tensor]) -> None:
        """Stop counting the storages behind ``tensors`` (memory that lives outside what is measured,
        like the host batch); ops that alias them stay free."""
        for t in tensors:
            storage = _storage(t) if isinstance(t, torch.Tensor) else None
            if storage is None:
                continue
            known = self._entry(storage) or self._admit(storage, free=True)
            self.live -= known.charged
            known.free, known.charged = self._size(storage), 0

    def _entry(self, storage: torch.UntypedStorage) -> _Storage | None:
        known = self._known.get(id(storage))
        return known if known is not None and known.ref() is storage else None

    def _admit(self, storage: torch.UntypedStorage, free: bool) -> _Storage:
        key = id(storage)
        known = _Storage(None, self._size(storage) if free else 0, 0)
        known.ref = weakref.ref(storage, lambda _, k=key, e=known: self._release(k, e))
        self._known[key] = known
        self._charge(known, storage)
        return known

    def _charge(self, known: _Storage, storage: torch.UntypedStorage) -> None:
        charged = max(self._size(storage) - known.free, 0)
        if charged != known.charged:
            self.live += charged - known.charged
            known.charged = charged
            self.peak_live = max(self.peak_live, self.live)

    def _release(self, key: int, known: _Storage) -> None:
        self.live -= known.charged
        if self._known.get(key) is known:     # the address may already hold a newer storage
            del self._known[key]

    def _size(self, storage: torch.UntypedStorage) -> int:
        return _rounded(storage.nbytes(), self.round_to)

    @property
    def current(self) -> int:
        return self.extra_bytes + self.live

    @property
    def peak(self) -> int:
        return self.extra_bytes + self.peak_live

    def reset_peak(self) -> None:
        self.peak_live = self.live


def _storage(t: torch.Tensor) -> torch.UntypedStorage | None:
    try:
        return t.untyped_storage()
    except (RuntimeError, NotImplementedError):  # tensors without storage (sparse, nested)
        return None


def _tensors(tree) -> list[torch.Tensor]:
    return [t for t in tree_leaves(tree) if isinstance(t, torch.Tensor)]


def _rounded(n: int, to: int) -> int:
    return -(-n // to) * to if to > 1 else n
