"""The independent ruler for sizing claims: peak memory of the real ``Trainer.step`` in steady state.

It shares no code with ``autoaccum.tracker`` or the probe's trials. A probe answer is judged by
what training itself does with it: ``autoaccum.fit(..., micro_batch=m)`` on a fresh model, one
warm-up step (so optimizer state exists), then one measured step of ``k >= 2`` micro-batches.

* On the CPU the measured step runs under :class:`StorageCensus`, a dispatch mode of its own:
  storages are keyed on ``untyped_storage()._cdata``; everything that exists before the step
  (parameters, buffers, gradients, optimizer state, every tensor the trainer holds) is seeded;
  an op's output whose storage is one of the op's inputs' (in-place, views) or is already known
  costs nothing; dead storages are found by polling weak references before every op.
* On CUDA it is ``torch.cuda.max_memory_reserved`` over the measured step, after ``empty_cache``.

``true_maximum`` bisects over ``m`` for the largest micro-batch whose measured step stays within
the budget: the number a probe answer is divided by.
"""
from __future__ import annotations

import gc
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class StorageCensus(TorchDispatchMode):
    """Peak bytes of live storages: the seeded ones, every storage an op creates, and what any
    storage grows by after it was first seen (``out=`` into a smaller tensor, ``resize_``)."""

    def __init__(self, existing: Iterable[torch.Tensor] = ()):
        super().__init__()
        # _cdata -> [bytes not counted (pre-existing and unseeded: its size when first seen),
        #            bytes counted, weak reference]
        self._seen: dict[int, list] = {}
        self.bytes = 0
        for t in existing:
            st = _storage_of(t)
            if st is not None and st._cdata not in self._seen:
                self._seen[st._cdata] = [0, st.nbytes(), weakref.ref(st)]
                self.bytes += st.nbytes()
        self.peak = self.bytes

    def _sweep(self) -> None:
        for key in [k for k, entry in self._seen.items() if entry[2]() is None]:
            self.bytes -= self._seen.pop(key)[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self._sweep()
        before = {}
        for t in tree_leaves((args, kwargs)):
            st = _storage_of(t)
            if st is not None:
                before[st._cdata] = st.nbytes()
        out = func(*args, **kwargs)
        for t in tree_leaves(out):
            st = _storage_of(t)
            if st is None:
                continue
            key, now = st._cdata, st.nbytes()
            entry = self._seen.get(key)
            if entry is None:    # new memory, unless it is an input's storage nobody counted yet
                entry = self._seen[key] = [before.get(key, 0), 0, weakref.ref(st)]
            counted = max(now - entry[0], 0)
            self.bytes += counted - entry[1]
            entry[1] = counted
        self.peak = max(self.peak, self.bytes)
        return out


def _storage_of(t) -> torch.UntypedStorage | None:
    if not isinstance(t, torch.Tensor):
        return None
    try:
        return t.untyped_storage()
    except (RuntimeError, NotImplementedError):
        return None


def held_tensors(*roots: Any, depth: int = 4) -> list[torch.Tensor]:
    """Every tensor reachable from ``roots`` through attributes, lists, tuples and dicts (``.grad``
    included): what a trainer, a model and an optimizer hold between steps."""
    found: dict[int, torch.Tensor] = {}
    seen: set[int] = set()

    def walk(obj: Any, level: int) -> None:
        if id(obj) in seen or level > depth:
            return
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            found[id(obj)] = obj
            if obj.grad is not None:
                found[id(obj.grad)] = obj.grad
            return
        if isinstance(obj, torch.nn.Module):
            for t in list(obj.parameters()) + list(obj.buffers()):
                walk(t, level)
            return
        if isinstance(obj, torch.optim.Optimizer):
            for group in obj.param_groups:
                for p in group["params"]:
                    walk(p, level)
            for state in obj.state.values():
                walk(state, level)
            return
        if isinstance(obj, dict):
            for v in list(obj.values()):
                walk(v, level + 1)
        elif isinstance(obj, (list, tuple, set)):
            for v in list(obj):
                walk(v, level + 1)
        elif hasattr(obj, "__dict__") and not isinstance(obj, type) and type(obj).__module__.startswith("autoaccum"):
            for v in list(vars(obj).values()):
                walk(v, level + 1)

    for r in roots:
        walk(r, 0)
    return list(found.values())


@dataclass
class Setup:
    """How to build one training run from scratch: the benchmark's model zoo provides these."""

    build: Callable[[], tuple[torch.nn.Module, Callable]]   # () -> (model, make_optimizer(params))
    batch: Callable[[int], Any]                             # n -> a batch of n samples (same every call)
    loss_fn: Callable | None
    count_fn: Callable | None = None
    amp_dtype: torch.dtype | None = None
    batchnorm: str | None = "micro"      # what a user who silenced the BatchNorm warning would pass


def step_peak(setup: Setup, micro_batch: int, device: torch.device, accum_steps: int = 2) -> int:
    """Peak bytes of one steady-state ``Trainer.step`` of ``accum_steps`` micro-batches of ``micro_batch``."""
    import autoaccum
    torch.manual_seed(0)
    model, make_opt = setup.build()
    model = model.to(device)
    opt = make_opt(model.parameters())
    trainer = autoaccum.fit(model, target_batch=accum_steps * micro_batch, optimizer=opt, loss_fn=setup.loss_fn,
                            count_fn=setup.count_fn, amp_dtype=setup.amp_dtype, micro_batch=micro_batch,
                            batchnorm=setup.batchnorm if _has_batchnorm(model) else None,
                            probe_cache=False, oom_retry=False)
    batch = setup.batch(accum_steps * micro_batch)
    try:
        trainer.step(batch)                              # warm-up: optimizer state now exists
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            trainer.step(batch)
            torch.cuda.synchronize(device)
            return torch.cuda.max_memory_reserved(device)
        gc.collect()
        census = StorageCensus(held_tensors(trainer, model, opt))
        with census:
            trainer.step(batch)
        return census.peak
    finally:
        trainer.close()
        del trainer, model, opt, batch
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _has_batchnorm(model: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


def fits(setup: Setup, micro_batch: int, device: torch.device, budget: int) -> tuple[bool, int | None]:
    """Does a real step at ``micro_batch`` stay within ``budget``? (and its peak; None after an OOM)"""
    try:
        peak = step_peak(setup, micro_batch, device)
    except torch.OutOfMemoryError:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return False, None
    return peak <= budget, peak


def true_maximum(setup: Setup, device: torch.device, budget: int, cap: int = 1 << 14,
                 hint: int | None = None) -> tuple[int, dict[int, int | None]]:
    """The largest micro-batch whose real step fits ``budget``: gallop (from ``hint``), then bisect."""
    peaks: dict[int, int | None] = {}

    def ok(n: int) -> bool:
        good, peaks[n] = fits(setup, n, device, budget)
        return good

    lo, hi = 0, cap + 1
    n = max(1, min(hint or 1, cap))
    if ok(n):
        lo = n
        step = max(1, n // 16)
        while lo < cap:
            m = min(cap, lo + step)
            if not ok(m):
                hi = m
                break
            lo, step = m, step * 2
    else:
        hi = n
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid
    return lo, peaks
