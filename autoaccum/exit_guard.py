"""Let the process group's worker threads drop autoaccum's tensors before the interpreter exits.

A tensor that C++ code holds keeps its Python object alive, and whoever drops the last C++
reference must take the GIL to release that object (c10's intrusive_ptr, "PyObject
preservation"). gloo runs a collective on a worker thread and drops the work, with its tensors,
just after completing it: the caller's ``wait()`` has already returned. When the script ends in
that gap, the worker reaches for the GIL while the interpreter finalises and the process aborts
with "terminate called without an active exception" after training succeeded
(pytorch/pytorch#190489; 6 of 28 runs of examples/torchrun_demo.py on a 2-core machine, torch 2.13).

autoaccum hands every collective's tensor to :func:`track` first (a tensor of its own, which no
caller holds views of); at exit it waits, with the GIL released, until the workers have let go
of them (at most :data:`EXIT_WAIT_S`), then sleeps :data:`HANDOFF_S` more: a worker that has
just dropped its count still has to take the GIL to release the Python object. Collectives that
DDP or FSDP2 issue themselves (DDP's bucket all-reduce under ``sync="overlap"``) are out of reach.
"""
from __future__ import annotations

import atexit
import threading
import time
import weakref

import torch

EXIT_WAIT_S = 2.0    # bounded: a collective a dead peer never completes must not hold the exit
HANDOFF_S = 0.02     # after the counts drop: a worker between its decrement and its GIL
_KEEP = 1024         # entries remembered at most (each is a weak reference and an int)

_lock = threading.Lock()
_pending: list[tuple[weakref.ref, int]] = []
_tracked_any = False


def track(t: torch.Tensor) -> torch.Tensor:
    """Remember ``t`` and its C++ use count right before it goes into a collective."""
    global _tracked_any
    if not hasattr(t, "_use_count"):   # a torch without it: nothing to compare against
        return t
    entry = (weakref.ref(t), t._use_count())
    with _lock:
        if not _tracked_any:
            atexit.register(wait_for_release)
            _tracked_any = True
        # Forget the dead, and this tensor's earlier entries that are released. Not other live
        # tensors' entries: another thread's tensor may be between its track() and its collective,
        # its count not yet raised, and forgetting it would reopen the exit race for it.
        _pending[:] = [e for e in _pending if _live_other(e, t)][-(_KEEP - 1):]
        _pending.append(entry)
    return t


def _live_other(entry: tuple[weakref.ref, int], t: torch.Tensor) -> bool:
    held = entry[0]()
    return held is not None and (held is not t or not _released(entry))


def _released(entry: tuple[weakref.ref, int]) -> bool:
    t = entry[0]()
    return t is None or t._use_count() <= entry[1]


def wait_for_release(timeout_s: float | None = None) -> bool:
    """Sleep until every tracked tensor is back to its use count before the collective (the
    worker thread dropped its work) or ``timeout_s`` (default :data:`EXIT_WAIT_S`) passes, then
    :data:`HANDOFF_S` more if anything was ever tracked; True if all were released."""
    deadline = time.monotonic() + (EXIT_WAIT_S if timeout_s is None else timeout_s)
    while True:
        with _lock:
            _pending[:] = [e for e in _pending if not _released(e)]
            left = len(_pending)
        if not left or time.monotonic() >= deadline:
            break
        time.sleep(0.001)
    if _tracked_any:
        time.sleep(HANDOFF_S)
    return not left
