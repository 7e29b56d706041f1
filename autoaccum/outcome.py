"""A step's outcome read late, so that the host never waits for the device inside a step.

Whether a step is skipped (a non-finite loss or gradient) is known on the device. Reading it on
the host before the optimizer step drains the device's queue every step: the host's own work
between steps (the next batch's split, counting, the random-stream snapshot, the launches) then
runs while the device idles. On an H200, MLPs with 4.7 ms steps ran 1.16-1.19x the time of a
hand loop that never reads anything.

torch's fused Adam, AdamW and SGD take ``found_inf`` and skip the whole update on the device, so
the trainer can step them without knowing. The loss, the norm and the flag go to pinned host
memory in one copy that does not wait (:class:`DeviceOutcome`). What the eager path does on the
host only for a step that stood (count it, step the scheduler) waits for the outcome. It is read
when somebody asks (the step's :class:`~autoaccum.StepStats`, ``trainer.steps``, a checkpoint)
or, at the latest, at the next step's update, before its optimizer step reads the learning rate.
By then the copy is long done, while the device still works through the next step's backward.
The scheduler steps in the same order relative to the optimizer's steps as on the eager path,
only later in wall time.

Here: the test that an optimizer skips on the device (:func:`skips_on_device`, :class:`StateWatch`,
:func:`has_step_hooks`), the copy (:class:`DeviceOutcome`), the step's :class:`StepStats`, whose
late fields wait for it, and :class:`PendingStep`, which completes the step when it is read.
"""
from __future__ import annotations

import inspect
import math
import threading
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch.optim import optimizer as torch_optimizer

if TYPE_CHECKING:
    from .trainer import Trainer

_FUSED_KINDS = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD)


def skips_on_device(optimizer) -> bool:
    """Does ``optimizer`` skip a whole update on the device when given ``found_inf``, and nothing
    else? torch's own fused Adam, AdamW and SGD do. Other optimizers that claim GradScaler support
    may follow an older protocol and ignore it; a subclass that overrides ``step`` (an EMA beside
    the update) would do its own work in a step the eager path does not step."""
    kind = next((k for k in _FUSED_KINDS if isinstance(optimizer, k)), None)
    if kind is None or not getattr(optimizer, "_step_supports_amp_scaling", False):
        return False
    step = optimizer.step     # an LR scheduler wraps it on the instance (functools.wraps: unwrap sees through)
    if inspect.unwrap(getattr(step, "__func__", step)) is not inspect.unwrap(kind.step):
        return False
    return all(g.get("fused") for g in optimizer.param_groups)


class StateWatch:
    """Does the optimizer hold state for every parameter it is about to step? A fused optimizer
    creates missing state even in a step it then skips (torch's fused SGD stores an uninitialised
    momentum buffer), so until it does, a step reads its outcome first. An entry counts only when
    filled (``optimizer.state`` is a defaultdict: looking at ``state[p]`` makes an empty one); a
    param group of SGD without momentum keeps none. Once every parameter of every group holds
    state, that is remembered until the state dict is replaced or changes size, so the check costs
    nothing per step after the first ones. ``groups`` (the ids of the tensors in the optimizer's
    groups, from :class:`~autoaccum.trainable.Trainable`) is part of what is remembered: a group
    added or edited brings parameters without state, and so does a momentum turned on."""

    def __init__(self):
        self._full: tuple | None = None

    def holds(self, optimizer, pairs, groups: tuple[int, ...]) -> bool:
        state = optimizer.state
        keeps = tuple(_keeps_state(optimizer, g) for g in optimizer.param_groups)
        key = (id(state), len(state), keeps)
        if self._full is not None and self._full[0] == key and self._full[1] == groups:
            return True
        stateful = [p for g, k in zip(optimizer.param_groups, keeps) if k for p in g["params"]]
        held = {id(p) for p, st in state.items() if st and not any(v is None for v in st.values())}
        if all(id(p) in held for p in stateful):
            self._full = (key, groups)
            return True
        stepped = {id(p) for p in stateful}
        return all(id(p) in held for p, _ in pairs if id(p) in stepped)


def _keeps_state(optimizer, group: dict) -> bool:
    return not (isinstance(optimizer, torch.optim.SGD) and group.get("momentum", 0) == 0)


def has_step_hooks(optimizer) -> bool:
    """Step hooks (an EMA in a post-hook) would run in a step the eager path does not step: such
    an optimizer reads its outcome first."""
    return bool(getattr(optimizer, "_optimizer_step_pre_hooks", None)
                or getattr(optimizer, "_optimizer_step_post_hooks", None)
                or getattr(torch_optimizer, "_global_optimizer_pre_hooks", None)
                or getattr(torch_optimizer, "_global_optimizer_post_hooks", None))


class DeviceOutcome:
    """``(loss, norm, skip flag)`` of a step, on its way to the host; :meth:`read` waits for that copy only."""

    __slots__ = ("flag", "_host", "_event", "_values")

    def __init__(self, loss: torch.Tensor, norm: torch.Tensor, flag: torch.Tensor):
        self.flag = flag            # for the optimizer: it skips on the device when set
        packed = torch.stack([loss.reshape(()).double(), norm.reshape(()).double(), flag.reshape(()).double()])
        self._event = None
        if packed.is_cuda:
            self._host = torch.empty(3, dtype=torch.float64, pin_memory=True)
            self._host.copy_(packed, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record(torch.cuda.current_stream(packed.device))   # the copy's stream, whatever device is current
        else:
            self._host = packed
        self._values: tuple[float, float, bool] | None = None

    def read(self) -> tuple[float, float, bool]:
        """``(loss, norm, skipped)``: skipped when the flag is set or the loss is not finite."""
        if self._values is None:    # re-entrant (a signal handler may read while this waits)
            event, host = self._event, self._host
            if event is not None:
                event.synchronize()
            loss, norm, flag = host.tolist()
            self._values = (loss, norm, flag > 0 or not math.isfinite(loss))
        return self._values


@dataclass
class StepStats:
    """What one :meth:`Trainer.step` did. With a fused optimizer on CUDA, ``loss``, ``grad_norm``,
    ``skipped`` and ``events`` come from the device when first read (:mod:`autoaccum.outcome`)."""

    loss: float                 # item-weighted mean loss over the whole (global) batch
    grad_norm: float | None     # total norm before clipping (only when max_grad_norm is set)
    skipped: bool               # True when the update was skipped (non-finite loss or gradients)
    micro_batches: list[int]    # sizes actually run (in the attempt that succeeded)
    items: int | float          # items counted over the batch (all ranks; samples unless count_fn is given)
    samples: int = 0            # samples in this rank's batch
    lr: float | None = None     # learning rate of the first param group for this update
    seconds: float = 0.0        # wall time of the step, host-side
    oom_retries: int = 0        # attempts thrown away because a micro-batch ran out of memory
    micro_batch_limit: int = 0  # the plan's micro-batch limit after this step
    events: list[str] = field(default_factory=list)   # notable things that happened, also logged

    @property
    def settled(self) -> bool:
        """Are ``loss``, ``grad_norm``, ``skipped`` and ``events`` known on the host (reading them
        waits for nothing)?"""
        return "_pending" not in self.__dict__

    def __getattr__(self, name: str):
        # Only reached for an attribute the instance lacks: the fields a pending outcome holds back.
        pending = self.__dict__.get("_pending")
        if pending is None or name not in _LATE:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        pending.settle()
        return self.__dict__[name]

    def __getstate__(self) -> dict:
        """A copy or a pickle holds the values, never the pending outcome."""
        pending = self.__dict__.get("_pending")
        if pending is not None:
            pending.settle()
        return dict(self.__dict__)


_LATE = ("loss", "grad_norm", "skipped", "events")   # held back by a pending outcome
PENDING_BY_OPTIMIZER: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()   # optimizer -> its last pending step


class PendingStep:
    """A step whose outcome is still on the device. Settling it reads the outcome, fills its stats
    and completes the step as the eager path would have: counted and the scheduler stepped if it
    stood, counted as skipped if not. Whoever reads first settles it: its stats, the trainer's
    counters or checkpoint, the next step, the trainer's finalizer. Until then the stats lack the
    fields it holds back (``StepStats.__getattr__`` settles on a read). The stats hold it; it holds
    the stats and the trainer weakly (no cycle; stats kept after the trainer is gone still read
    their values). A lock makes one reader settle while others wait (a logging thread); a read
    interrupted while waiting leaves it pending for the next reader; a reader re-entering from the
    same thread (a scheduler reading ``trainer.steps``, a signal handler) finds it settled."""

    __slots__ = ("trainer", "stats", "outcome", "with_norm", "events", "skip_at", "done", "lock")

    def __init__(self, trainer: Trainer, stats: StepStats, outcome: DeviceOutcome):
        self.trainer, self.stats, self.outcome = weakref.ref(trainer), weakref.ref(stats), outcome
        self.with_norm = trainer.max_grad_norm is not None
        fields = stats.__dict__
        self.events: list[str] = fields.pop("events")
        for name in ("loss", "grad_norm", "skipped"):
            fields.pop(name)
        fields["_pending"] = self
        self.skip_at: int | None = None
        self.done = False
        self.lock = threading.RLock()

    def settle(self, trainer: Trainer | None = None) -> None:
        with self.lock:
            if self.done:
                return
            loss, norm, skipped = self.outcome.read()
            if self.done:            # settled meanwhile by a re-entrant reader on this thread
                return
            self.done = True
            stats = self.stats()
            if stats is not None:
                if skipped:
                    self.events.insert(len(self.events) if self.skip_at is None else self.skip_at,
                                       skip_message(loss))
                fields = stats.__dict__
                for name, value in (("loss", loss), ("grad_norm", norm if self.with_norm else None),
                                    ("skipped", skipped), ("events", self.events)):
                    fields.setdefault(name, value)      # a value set by hand meanwhile stays
                del fields["_pending"]
            trainer = trainer if trainer is not None else self.trainer()
            if trainer is not None:
                trainer._completed(self, stood=not skipped)


def skip_message(loss: float) -> str:
    return f"skipped the update: {'loss' if not math.isfinite(loss) else 'gradient norm'} is not finite"
