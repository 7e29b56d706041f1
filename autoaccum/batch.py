"""Split, tile and move a nested batch along dim 0.

A batch is a tensor, or a tuple/list/namedtuple/mapping nesting tensors (numpy arrays are
accepted as leaves too); every tensor holds one row per sample. ``None`` leaves are copied
into every part. Anything else cannot be divided between samples and is rejected with the
path of the offending leaf, before anything runs.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

_Leaf = torch.Tensor | np.ndarray


def batch_size(batch: Any, *, name: str = "batch") -> int:
    """Number of samples in ``batch``: the common dim 0 of its tensors.

    Raises ``ValueError`` when tensors disagree on dim 0 or there is no sample, and ``TypeError``
    for leaves that cannot be split; the message names the leaf (e.g. ``batch['labels']``).
    """
    flat = _flat(batch)
    if flat:                       # the common batch: one check per tensor, no paths built
        n = flat[0].shape[0] if flat[0].dim() else 0
        if n and all(t.dim() and t.shape[0] == n for t in flat):
            return n
    sizes: list[tuple[str, int]] = []       # the long way: it names the leaf at fault

    def visit(leaf: _Leaf, path: str) -> None:
        sizes.append((path, leaf.shape[0]))

    _walk(batch, name, visit)
    if not sizes:
        raise ValueError(f"{name} holds no tensors, so there are no samples to train on; pass a "
                         f"tensor or a tuple/list/dict of tensors with one row per sample")
    first_path, n = sizes[0]
    for path, m in sizes[1:]:
        if m != n:
            raise ValueError(
                f"{name} tensors disagree on dim 0: {first_path} has {n} rows but {path} has {m}; "
                f"every tensor in a batch must have one row per sample")
    if n == 0:
        raise ValueError(f"{name} is empty ({first_path} has 0 rows); skip empty batches before "
                         f"calling step()")
    return n


def describe(batch: Any, *, name: str = "batch") -> list[tuple[str, tuple[int, ...], str]]:
    """``(path, per-sample shape, dtype)`` of every leaf: what a batch looks like, minus its length."""
    leaves: list[tuple[str, tuple[int, ...], str]] = []
    _walk(batch, name, lambda leaf, path: leaves.append((path, tuple(leaf.shape[1:]), str(leaf.dtype))))
    return leaves


def leaves(batch: Any) -> list[torch.Tensor]:
    """The tensor leaves of ``batch`` (numpy leaves are not tensors and are left out)."""
    found: list[torch.Tensor] = []
    _walk(batch, "batch", lambda leaf, path: found.append(leaf) if isinstance(leaf, torch.Tensor) else None)
    return found


def split(batch: Any, sizes: list[int]) -> list[Any]:
    """Cut ``batch`` into consecutive parts of ``sizes`` rows; tensors become views, not copies.

    Each leaf is cut once (``torch.split``: one call for all parts), then the parts are put back
    into the batch's containers."""
    n = batch_size(batch)
    if sum(sizes) != n or any(s <= 0 for s in sizes):
        raise ValueError(f"sizes {sizes} must be positive and sum to the batch's {n} samples")
    if isinstance(batch, torch.Tensor):
        return list(batch.split_with_sizes(sizes))
    flat = _flat(batch)
    if flat is not None:              # the common flat batches: no container rebuilt leaf by leaf
        columns = zip(*(v.split_with_sizes(sizes) for v in flat))
        if type(batch) is dict:
            return [dict(zip(batch.keys(), row)) for row in columns]
        return [type(batch)(row) for row in columns]
    bounds = np.cumsum(sizes)[:-1]
    pieces = map_leaves(batch, lambda leaf: _Cut(leaf.split(sizes) if isinstance(leaf, torch.Tensor)
                                                 else np.split(leaf, bounds)))
    return [map_leaves(pieces, lambda cut, k=k: cut.parts[k], leaf_types=(_Cut,)) for k in range(len(sizes))]


class _Cut:
    """A leaf's parts, standing in for the leaf while the containers are rebuilt per part."""
    __slots__ = ("parts",)

    def __init__(self, parts):
        self.parts = parts


def tile(batch: Any, n: int) -> Any:
    """A batch of exactly ``n`` samples: the first ``n`` rows, or the rows repeated cyclically."""
    have = batch_size(batch)
    if n <= have:
        return _slice(batch, 0, n)
    reps = -(-n // have)

    def grow(leaf: _Leaf) -> _Leaf:
        if isinstance(leaf, torch.Tensor):
            return leaf.repeat(reps, *([1] * (leaf.dim() - 1)))[:n]
        return np.concatenate([leaf] * reps, axis=0)[:n]

    return map_leaves(batch, grow)


def to_device(batch: Any, device: torch.device, *, non_blocking: bool = True) -> Any:
    """Move every tensor leaf to ``device`` (numpy leaves become tensors there)."""
    def move(leaf: _Leaf) -> torch.Tensor:
        if isinstance(leaf, np.ndarray):
            leaf = torch.from_numpy(leaf)
        if leaf.device == device:
            return leaf
        return leaf.to(device, non_blocking=non_blocking)

    return map_leaves(batch, move)


def on_device(batch: Any, device: torch.device) -> bool:
    """Is every leaf already a tensor on ``device``? Then :func:`to_device` would change nothing."""
    flat = _flat(batch)
    if flat is not None:
        return all(t.device == device for t in flat)
    found = [True]

    def visit(leaf: _Leaf, path: str) -> None:
        if not isinstance(leaf, torch.Tensor) or leaf.device != device:
            found[0] = False

    _walk(batch, "batch", visit)
    return found[0]


def _flat(batch: Any) -> list[torch.Tensor] | None:
    """The tensors of a tensor, or of a plain tuple/list/dict holding only tensors; else None."""
    if isinstance(batch, torch.Tensor):
        return [batch]
    kind = type(batch)
    if kind is tuple or kind is list or kind is dict:
        values = list(batch.values()) if kind is dict else batch
        if all(isinstance(v, torch.Tensor) for v in values):
            return list(values)
    return None


def _slice(batch: Any, start: int, stop: int) -> Any:
    return map_leaves(batch, lambda leaf: leaf[start:stop])


def map_leaves(batch: Any, fn: Callable[[_Leaf], Any], *, leaf_types: tuple = ()) -> Any:
    """Rebuild ``batch`` (same container types) with ``fn`` applied to every tensor/array leaf
    (and to every object of ``leaf_types``, checked first)."""
    if batch is None:
        return None
    if isinstance(batch, (torch.Tensor, np.ndarray)) or (leaf_types and type(batch) in leaf_types):
        return fn(batch)
    if isinstance(batch, Mapping):
        items = {k: map_leaves(v, fn, leaf_types=leaf_types) for k, v in batch.items()}
        try:
            return type(batch)(items)
        except Exception:  # mapping types whose constructor takes other arguments
            return items
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(map_leaves(v, fn, leaf_types=leaf_types) for v in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(map_leaves(v, fn, leaf_types=leaf_types) for v in batch)
    _walk(batch, "batch", lambda leaf, path: None)  # raises the TypeError that names the leaf
    raise AssertionError(f"unhandled batch element {type(batch).__name__}")  # pragma: no cover


def _walk(batch: Any, path: str, visit: Callable[[_Leaf, str], None]) -> None:
    if batch is None:
        return
    if isinstance(batch, (torch.Tensor, np.ndarray)):
        if batch.ndim == 0:
            raise TypeError(f"{path} is a 0-dim {type(batch).__name__}, which has no dim 0 to split "
                            f"between samples; give it one row per sample or move it out of the batch")
        if isinstance(batch, np.ndarray) and batch.dtype.kind not in "biufc":
            raise TypeError(f"{path} is a numpy array of {batch.dtype} ({batch.dtype.kind!r} kind), which torch "
                            f"cannot hold; tokenize or encode it into numbers first, or pass it through "
                            f"loss_fn instead of the batch")
        visit(batch, path)
        return
    if isinstance(batch, Mapping):
        for k, v in batch.items():
            _walk(v, f"{path}[{k!r}]", visit)
        return
    if isinstance(batch, (tuple, list)):
        for i, v in enumerate(batch):
            _walk(v, f"{path}[{i}]", visit)
        return
    raise TypeError(
        f"{path} is a {type(batch).__name__} ({_short_repr(batch)}), which cannot be split between "
        f"micro-batches; a batch may hold tensors (or numpy arrays) with one row per sample, nested in "
        f"tuples, lists or dicts, and None; turn per-sample data into a tensor, or pass constants "
        f"through loss_fn instead of the batch")


def _short_repr(x: Any) -> str:
    r = repr(x)
    return r if len(r) <= 40 else r[:37] + "..."
