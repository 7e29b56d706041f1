"""A step's outcome read late, so that the host never waits for the device inside a step.

Whether a step is skipped (a non-finite loss or gradient) is known on the device. Reading it on
the host before the optimizer step drains the device's queue every step: the host's own work
between steps (the next batch's split, counting, the random-stream snapshot, the launches) then
runs while the device idles. On an H200, MLPs with 4.7 ms steps ran 1.16-1.19x the time of a
hand loop that never reads anything.

An optimizer that takes ``found_inf`` (torch's fused Adam, AdamW, SGD) skips on the device by
itself, so the trainer can step it without knowing. The trainer then carries on as if the step
stood: counts it and steps the scheduler, keeping what :class:`RevocableSchedulerStep` needs to
take that back. The loss, the norm and the flag go to pinned host memory in one copy that does
not wait (:class:`DeviceOutcome`). They are read when somebody asks (the step's
:class:`~autoaccum.StepStats`, ``trainer.steps``, a checkpoint) or, at the latest, at the next
step's update, before its optimizer step reads the learning rate. By then the copy is long done,
while the device still works through the next step's backward.
"""
from __future__ import annotations

import copy
import math

import torch
from torch.optim import optimizer as torch_optimizer

_FUSED_KINDS = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD)


def skips_on_device(optimizer) -> bool:
    """Does ``optimizer`` skip a whole update on the device when given ``found_inf``? torch's own
    fused Adam, AdamW and SGD do (other optimizers that claim GradScaler support may follow an
    older protocol and ignore it)."""
    return (isinstance(optimizer, _FUSED_KINDS) and bool(getattr(optimizer, "_step_supports_amp_scaling", False))
            and all(g.get("fused") for g in optimizer.param_groups))


def holds_state(optimizer, pairs) -> bool:
    """Does ``optimizer`` hold state for every parameter of ``pairs`` it steps? A fused optimizer
    creates missing state even in a step it then skips (torch's fused SGD stores an uninitialised
    momentum buffer), so until it does, a step reads its outcome first. SGD without momentum keeps
    no state at all. An entry counts only when it is filled (``optimizer.state`` is a defaultdict:
    merely looking at ``state[p]`` makes an empty one)."""
    if isinstance(optimizer, torch.optim.SGD) and all(g.get("momentum", 0) == 0 for g in optimizer.param_groups):
        return True
    stepped = {id(p) for g in optimizer.param_groups for p in g["params"]}
    held = {id(p) for p, st in optimizer.state.items() if st and not any(v is None for v in st.values())}
    return all(id(p) in held for p, _ in pairs if id(p) in stepped)


def has_step_hooks(optimizer) -> bool:
    """Step hooks (an EMA in a post-hook) would run in a step the eager path does not step: such
    an optimizer reads its outcome first."""
    return bool(getattr(optimizer, "_optimizer_step_pre_hooks", None)
                or getattr(optimizer, "_optimizer_step_post_hooks", None)
                or getattr(torch_optimizer, "_global_optimizer_pre_hooks", None)
                or getattr(torch_optimizer, "_global_optimizer_post_hooks", None))


class DeviceOutcome:
    """``(loss, norm, skip flag)`` of a step, on its way to the host; :meth:`read` waits for that copy only."""

    __slots__ = ("_host", "_event", "_values")

    def __init__(self, loss: torch.Tensor, norm: torch.Tensor, flag: torch.Tensor):
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
        if self._values is None:
            if self._event is not None:
                self._event.synchronize()
            loss, norm, flag = self._host.tolist()
            self._values = (loss, norm, flag > 0 or not math.isfinite(loss))
            self._host = self._event = None
        return self._values


class RevocableSchedulerStep:
    """``scheduler.step()`` that can be taken back: the scheduler's state and the optimizer's
    hyperparameters as they were before it. Taking it back restores a hyperparameter only where
    it still holds what the scheduler's step left (a learning rate the user set by hand since then
    stays); a Tensor hyperparameter, which schedulers change in place, is compared by value."""

    def __init__(self, scheduler, optimizer):
        self.scheduler, self.optimizer = scheduler, optimizer
        self.state = copy.deepcopy(scheduler.state_dict())   # a custom scheduler's may hold live objects
        self.before = _hyperparameters(optimizer)
        self.after: list[dict] | None = None      # None: the step raised part-way; undo restores all

    @staticmethod
    def possible(scheduler) -> bool:
        return callable(getattr(scheduler, "state_dict", None)) and callable(getattr(scheduler, "load_state_dict", None))

    def step(self) -> None:
        self.scheduler.step()
        self.after = _hyperparameters(self.optimizer)

    def undo(self) -> None:
        self.scheduler.load_state_dict(self.state)
        after = self.after if self.after is not None else [None] * len(self.before)
        for group, before, left in zip(self.optimizer.param_groups, self.before, after):
            for key, (held, value) in before.items():
                if left is None:
                    _put(group, key, held, value)
                elif key in left and _holds(group, key, *left[key]):
                    _put(group, key, held, value)


def _hyperparameters(optimizer) -> list[dict]:
    """Per group, ``key -> (the object held, its value)``: a Tensor's value is a copy (schedulers
    write a Tensor learning rate in place)."""
    return [{k: (v, v.detach().clone() if isinstance(v, torch.Tensor) else v)
             for k, v in group.items() if k != "params"} for group in optimizer.param_groups]


def _holds(group: dict, key: str, held, value) -> bool:
    current = group.get(key)
    if isinstance(held, torch.Tensor):
        return current is held and torch.equal(current, value)
    return current is held


def _put(group: dict, key: str, held, value) -> None:
    if isinstance(held, torch.Tensor):
        with torch.no_grad():
            held.copy_(value)
        group[key] = held
    else:
        group[key] = value
