"""Trainer checkpoints, checked whole before anything loads.

``Trainer.state_dict()`` holds what a bitwise resume needs besides the model's own state: the
optimizer, scheduler and loss scale, the fp32 master weights, the step counters, the plan in force
(a micro-batch lowered after an out-of-memory stays lowered), the regrowth state and the random
streams. :func:`check` validates a loaded one against the trainer it is meant for, so that
``load_state_dict`` either loads all of it or changes nothing.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from . import rng as random_streams
from .checks import check_int
from .plan import Plan
from .plan import plan as make_plan

REGROW_KEYS = {"after", "wait", "clean", "last_good"}
PLAN_KEYS = {"target_batch", "micro_batch", "world_size"}


@dataclass
class Checked:
    masters: list[torch.Tensor | None]     # per trainable parameter, as saved
    plan: Plan | None
    streams: random_streams.RngState | None


def check(state: Any, *, params: list[torch.Tensor], scheduler: Any, scaler: Any, target_batch: int,
          world_size: int) -> Checked:
    """Everything in ``state`` that a trainer with these parts would load, or the error saying why not."""
    if not isinstance(state, dict) or "optimizer" not in state:
        raise TypeError("state must be a dict from Trainer.state_dict() (with an 'optimizer' entry)")
    masters = state.get("masters") or [None] * len(params)
    if len(masters) != len(params):
        raise ValueError(f"the checkpoint holds master weights for {len(masters)} parameters but "
                         f"{len(params)} are trainable now; freeze/unfreeze as when it was saved")
    for p, m in zip(params, masters):
        if m is not None and tuple(m.shape) != tuple(p.shape):
            raise ValueError(f"a master weight of shape {tuple(m.shape)} does not fit a parameter of "
                             f"shape {tuple(p.shape)}; is this checkpoint from another model?")
    for name, part in (("scheduler", scheduler), ("scaler", scaler)):
        if (state.get(name) is None) != (part is None):
            raise ValueError(f"the checkpoint {'has no' if state.get(name) is None else 'has a'} {name} "
                             f"state but this trainer {'has' if part is not None else 'has no'} {name}")
    for name in ("steps", "skipped_steps", "oom_retries"):
        if name in state:
            check_int(f"the checkpoint's {name!r}", state[name], minimum=0)
    if state.get("max_micro_batch") is not None:
        check_int("the checkpoint's 'max_micro_batch'", state["max_micro_batch"], minimum=0)
    if state.get("regrow") is not None and (not isinstance(state["regrow"], dict) or set(state["regrow"]) != REGROW_KEYS):
        raise ValueError("the checkpoint's 'regrow' entry is not one Trainer.state_dict() wrote")
    streams = random_streams.from_dict(state["rng"]) if state.get("rng") is not None else None
    return Checked(masters, _plan(state.get("plan"), target_batch, world_size), streams)


def _plan(saved: Any, target: int, world: int) -> Plan | None:
    if saved is None:
        return None
    if not isinstance(saved, dict) or not PLAN_KEYS <= set(saved):
        raise ValueError("the checkpoint's 'plan' entry is not one Trainer.state_dict() wrote")
    if (saved["target_batch"], saved["world_size"]) != (target, world):
        raise ValueError(f"the checkpoint was saved with target_batch={saved['target_batch']} on "
                         f"{saved['world_size']} rank(s), this trainer has target_batch={target} on {world}; "
                         f"resume with the same effective batch and world size")
    return make_plan(saved["target_batch"], saved["micro_batch"], saved["world_size"])
