"""What the fused kernels need to know about a tensor list, worked out once per list.

A training loop hands the kernels the same tensors step after step (the gradient buffer's
views), and looking at a list costs Python time per tensor: about 1.5 µs each with per-tensor
checks, 1.5 ms at 1,000 tensors, as long as the bf16 accumulate kernel takes to move 1,000
tensors of 1M elements on an H100. A :class:`Facts` holds what was learned (dtypes, shapes,
device, memory order, addresses, element counts, overlaps) and the launch tables built from it,
and :func:`facts_of` finds it again by the tensors' identities.

Why identity is enough: a cached entry holds a weak reference to every tensor, whose callback
drops the entry when any of them is freed, so an id cannot be reused by another tensor while the
entry lives. It holds no tensor itself (nothing is kept alive). What identity cannot see is a
live tensor given new memory: FSDP-style ``untyped_storage().resize_()``, ``set_()``, ``.data =``.
On every hit one tensor per storage (the first of each) is checked against the address it had,
which catches storage reallocation at the cost of one ``data_ptr()`` per storage (one for a
gradient buffer's views). Where the CUDA extension is loaded, the identity and the address of
every tensor are checked in one C++ pass instead (``same_tensors`` in ``csrc/bindings.cpp``; at
1,000 tensors about 60 µs of Python become about 2 µs). Not noticed: a tensor whose shape or
strides change in place while its storage stays (``t_()``, ``unsqueeze_()``, a shrinking
``resize_()``, ``set_()`` into the same storage), and, without the extension, a view other than
the first of a shared storage re-pointed elsewhere (``.data =``, ``set_()``). autoaccum never
does either to the tensors it passes, and :func:`forget` drops every entry for code that does.

An entry is made on the second sighting of a list, so fresh lists (new gradients every
micro-batch) cost one identity hash and one weak reference. A sighting counts only while its
first tensor lives: freed gradients' ids are soon reused by the next micro-batch's, and taking
that for a repeat made an entry (a weak reference per tensor) for every other fresh list.
"""
from __future__ import annotations

import operator
import weakref
from collections import OrderedDict

import numpy as np
import torch

from . import cuda_ext
from .layout import dense_order, in_memory_order

MAX_ENTRIES = 64
DTYPE = operator.attrgetter("dtype")
SHAPE = operator.attrgetter("shape")
DEVICE = operator.attrgetter("device")
IS_CPU = operator.attrgetter("is_cpu")
LAYOUT = operator.attrgetter("layout")
NONE_ID = id(None)

_entries: OrderedDict[tuple[int, ...], "Facts"] = OrderedDict()
_seen: OrderedDict[tuple[int, ...], weakref.ref] = OrderedDict()   # key -> its first tensor
_by_ends: dict[tuple[int, int, int], "Facts"] = {}   # (length, id of first, id of last) -> a cached entry
SAME, OTHER, MOVED = 0, 1, 2                          # what same_tensors finds (csrc/bindings.cpp Sameness)


class Facts:
    """Everything about ``tensors`` that holds while they live and keep their memory.

    ``orders[i]`` is None for a contiguous tensor, else the permutation of its dimensions that
    makes it contiguous (a dense layout such as channels_last), or ``False`` when no permutation
    does (gaps or overlaps). ``ptrs`` are the addresses of the tensors' first elements in memory
    order; ``cache`` holds what operations derive from these facts (launch tables).
    """

    __slots__ = ("n", "dtypes", "dtype_set", "shapes", "devices", "device", "orders", "contiguous", "numels", "ptrs",
                 "_anchors", "_at", "_overlap", "cache", "_refs", "_ident", "_key", "__weakref__")

    def __init__(self, tensors: list[torch.Tensor]):
        self.n = len(tensors)
        self.dtypes = list(map(DTYPE, tensors))
        self.dtype_set = frozenset(self.dtypes)
        self.shapes = list(map(SHAPE, tensors))
        self.devices = set(map(DEVICE, tensors))
        self.device = next(iter(self.devices)) if len(self.devices) == 1 else None
        contiguous = list(map(torch.Tensor.is_contiguous, tensors))
        self.contiguous = all(contiguous)
        self.orders = [None if c else _memory_order(t) for t, c in zip(tensors, contiguous)]
        self.numels = np.fromiter(map(torch.Tensor.numel, tensors), dtype=np.int64, count=self.n)
        self.ptrs = np.fromiter(map(torch.Tensor.data_ptr, tensors), dtype=np.int64, count=self.n)
        if not self.contiguous:   # a dense tensor's first element in memory order: its lowest address
            for i, order in enumerate(self.orders):
                if order:
                    self.ptrs[i] = tensors[i].permute(order).data_ptr()
        self._anchors: list[tuple[int, int]] = []   # filled when the facts are cached
        self._at = np.empty(0, dtype=np.int64)
        self._overlap: tuple[int, int] | None | bool = False   # False: not looked at yet
        self.cache: dict = {}
        self._refs: list = []
        self._ident: tuple[torch.Tensor, torch.Tensor] | None = None   # (ids, data_ptrs) while cached
        self._key: tuple[int, ...] = ()

    @property
    def cached(self) -> bool:
        """Whether these facts are kept for the next call with the same tensors."""
        return bool(self._refs)

    def first(self, predicate) -> int | None:
        """The index of the first tensor whose dtype fails ``predicate`` (None: all pass)."""
        for i, d in enumerate(self.dtypes):
            if not predicate(d):
                return i
        return None

    def dense_failure(self) -> int | None:
        """The first tensor with gaps or overlaps in memory (not dense in any order)."""
        if self.contiguous:
            return None
        return next((i for i, o in enumerate(self.orders) if o is False), None)

    def overlap(self, tensors: list[torch.Tensor]) -> tuple[int, int] | None:
        """Two tensors whose memory overlaps (they would race and double-count as accumulators)."""
        if self._overlap is False:
            sizes = np.fromiter((d.itemsize for d in self.dtypes), dtype=np.int64, count=self.n)
            storages = [t.untyped_storage().data_ptr() if n else 0 for t, n in zip(tensors, self.numels)]
            spans = sorted((s, p, p + n * z, i) for i, (s, p, n, z)
                           in enumerate(zip(storages, self.ptrs.tolist(), self.numels.tolist(), sizes.tolist())) if n)
            self._overlap = None
            for (s0, _, end0, i), (s1, start1, _, j) in zip(spans, spans[1:]):
                if s0 == s1 and start1 < end0:
                    self._overlap = (i, j)
                    break
        return self._overlap

    def intact(self, tensors: list[torch.Tensor]) -> bool:
        """The first tensor of every storage still sits where it did (no storage was reallocated)."""
        if len(self._anchors) == self.n:   # every tensor its own storage: compare all addresses at C speed
            return np.array_equal(np.fromiter(map(torch.Tensor.data_ptr, tensors), np.int64, self.n), self._at)
        return all(tensors[i].data_ptr() == p for i, p in self._anchors)


def key_of(tensors) -> tuple[int, ...]:
    """The identity key of a list (a None in it shows as ``NONE_ID``)."""
    return tuple(map(id, tensors))


def recall(tensors) -> Facts | None:
    """The cached facts of exactly ``tensors`` found by one C++ check of every tensor's identity and
    address, when the CUDA extension is loaded; None otherwise (then look them up by :func:`key_of`
    with :func:`cached`). A hint keyed on the list's length and ends finds the candidate."""
    same = _same_tensors()
    if same is None or not tensors:
        return None
    hit = _by_ends.get((len(tensors), id(tensors[0]), id(tensors[-1])))   # _ends of their key
    if hit is None or hit._ident is None:
        return None
    found = same(tensors, *hit._ident)
    if found == SAME:
        return hit
    if found == MOVED:                  # the very tensors, but memory moved under them: stale
        _drop(hit._key)
    return None


def cached(key: tuple[int, ...], tensors: list) -> Facts | None:
    """The cached facts of ``tensors`` (``key`` their :func:`key_of`) if their memory is where it was."""
    hit = _entries.get(key)
    if hit is None:
        return None
    if not _in_place(hit, tensors):
        _drop(key)
        return None
    if hit._ident is not None:   # recall() finds it next time
        _by_ends[_ends(key)] = hit
    return hit


def _in_place(hit: Facts, tensors: list) -> bool:
    """Every tensor's data is where it was: the C++ check (every address) where the extension is
    loaded, else one address per storage (``Facts.intact``)."""
    same = _same_tensors()
    if same is not None and hit._ident is not None:
        found = same(tensors, *hit._ident)
        if found != OTHER:              # OTHER: a list subclass, which the C++ check does not read
            return found == SAME
    return hit.intact(tensors)


def facts_of(tensors: list[torch.Tensor], key: tuple[int, ...] | None = None, check=None) -> Facts:
    """The facts about ``tensors`` (a list of tensors, no None; ``key`` its :func:`key_of`), cached by
    identity when seen twice. ``check(tensors)`` runs before facts are made, not on a cache hit."""
    if key is None:
        hit = recall(tensors)
        if hit is not None:
            return hit
        key = key_of(tensors)
    hit = cached(key, tensors)
    if hit is not None:
        return hit
    if check is not None:
        check(tensors)
    facts = Facts(tensors)
    first = _seen.get(key)
    if first is not None and first() is tensors[0]:
        _remember(key, facts, tensors)
    else:        # a first sighting; or the ids of freed tensors, reused by fresh ones: not a repeat
        try:
            _seen[key] = weakref.ref(tensors[0])
        except TypeError:      # a tensor type without weak references: never cached
            return facts
        if len(_seen) > MAX_ENTRIES:
            _seen.popitem(last=False)
    return facts


def forget() -> None:
    """Drop every cached entry (after re-pointing tensors in place with ``set_`` or ``.data =``)."""
    for facts in _entries.values():
        facts._ident = None
    _entries.clear()
    _seen.clear()
    _by_ends.clear()


def _same_tensors():
    """The extension's ``same_tensors`` if the extension is loaded (never loads it: that is
    dispatch's decision, and a failed import must not be retried on every call)."""
    return getattr(cuda_ext.loaded(), "same_tensors", None)


def _ends(key: tuple[int, ...]) -> tuple[int, int, int]:
    """Where :func:`recall` looks a list up: its length and the ids at its two ends."""
    return len(key), key[0], key[-1]


def _drop(key: tuple[int, ...]) -> None:
    """Forget one entry. Clearing ``_ident`` first keeps :func:`recall` from vouching for it."""
    facts = _entries.pop(key, None)
    if facts is not None:
        facts._ident = None
        if _by_ends.get(_ends(key)) is facts:
            del _by_ends[_ends(key)]


def _remember(key: tuple[int, ...], facts: Facts, tensors: list[torch.Tensor]) -> None:
    def drop(_ref, key=key):   # a tensor of the list is being freed: its id may be reused after this
        _drop(key)

    try:
        facts._refs = [weakref.ref(t, drop) for t in tensors]
    except TypeError:          # a tensor type without weak references: never cached
        return
    facts._anchors = _anchors(tensors, facts.numels)
    facts._at = np.array([p for _, p in facts._anchors], dtype=np.int64)
    facts._ident = (torch.from_numpy(np.array(key, dtype=np.int64)),   # CPU whatever the default device
                    torch.from_numpy(np.fromiter(map(torch.Tensor.data_ptr, tensors), np.int64, facts.n)))
    facts._key = key
    _entries[key] = facts
    _by_ends[_ends(key)] = facts
    _seen.pop(key, None)
    if len(_entries) > MAX_ENTRIES:   # first in, first out: a hit costs no reordering
        _drop(next(iter(_entries)))


def _memory_order(t: torch.Tensor) -> list[int] | bool:
    """The permutation that makes a non-contiguous ``t`` contiguous, or False (gaps or overlaps)."""
    order = dense_order(t)
    return order if in_memory_order(t, order) is not None else False


def _anchors(tensors: list[torch.Tensor], numels: np.ndarray) -> list[tuple[int, int]]:
    """(index, address) of the first non-empty tensor of each storage."""
    anchors, storages = [], set()
    for i, t in enumerate(tensors):
        if not numels[i]:
            continue
        s = t.untyped_storage().data_ptr()
        if s not in storages:
            storages.add(s)
            anchors.append((i, t.data_ptr()))
    return anchors
