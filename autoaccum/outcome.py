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
"""
from __future__ import annotations

import inspect
import math

import torch
from torch.optim import optimizer as torch_optimizer

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
