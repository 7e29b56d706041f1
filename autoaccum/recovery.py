"""Out of memory in the middle of a step: what failed, how small to go, when to grow back.

Data changes (longer sequences later), fragmentation grows, other processes take memory: a
micro-batch that fitted yesterday may not fit now. The trainer discards the step's partial
accumulation, frees memory, lowers the micro-batch and re-runs the *same* batch from its first
micro-batch, so no sample is lost or counted twice and the effective batch is unchanged. This
module holds the decisions; the trainer holds the order of events.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from .memory import drop_traceback, format_bytes, is_oom_error, oom_message, read_device
from .plan import Plan

log = logging.getLogger("autoaccum")


@dataclass
class Failure:
    """A micro-batch that raised: out of memory (recoverable) or anything else (re-raised)."""

    index: int                      # which micro-batch
    size: int                       # its number of samples
    oom: bool
    message: str
    error: BaseException | None = None   # the error itself, re-raised unchanged when not recovered


def classify(exc: BaseException, index: int, size: int) -> Failure:
    """Turn an exception from a micro-batch into a Failure; an OOM's frames (and the tensors they
    hold) are released at once, the error object itself is kept to re-raise if needed."""
    if is_oom_error(exc):
        drop_traceback(exc)
        return Failure(index, size, True, oom_message(exc), exc)
    return Failure(index, size, False, f"{type(exc).__name__}: {exc}", exc)


def smaller_micro_batch(failure: Failure, limit: int, probe_result, device: torch.device,
                        last_good: int | None = None) -> int:
    """At most half the size that failed, and no more than the memory model says fits now; right
    after a regrowth, the size that ran cleanly before it (``last_good``) instead.

    Returns 0 when even one sample ran out of memory.
    """
    if last_good is not None and last_good < failure.size:
        return min(limit, last_good)
    proposal = min(limit, failure.size // 2)
    model = getattr(probe_result, "memory_model", None)
    if model is not None and proposal > 0 and device.type == "cuda":
        reading = read_device(device)
        room = reading.usable_bytes - getattr(probe_result, "headroom_bytes", 0)
        fits = model.max_micro_batch(room)
        if 0 < fits < proposal:
            proposal = fits
    return proposal


def not_enough_memory_message(failure: Failure | None, rank: int, device: torch.device, probe_result) -> str:
    """Why training cannot go on: one sample does not fit (here, or on another rank: ``failure`` None)."""
    reading = read_device(device)
    needed = ""
    model = getattr(probe_result, "memory_model", None)
    if model is not None:
        needed = f"; the memory model predicts {format_bytes(model.peak(1))} for one sample"
    where = (f"a micro-batch of {failure.size} sample(s) ran out of memory on rank {rank} ({failure.message})"
             if failure is not None else "a micro-batch of 1 sample ran out of memory on another rank (its error says "
                                         "how much it needed)")
    return (f"{where}{needed}; "
            f"{format_bytes(reading.usable_bytes)} is usable on {reading.name} (rank {rank}). Free memory (other processes), "
            f"shorten the sequences, use amp_dtype=torch.bfloat16 or activation checkpointing")


class Regrow:
    """After ``after`` clean steps below the original micro-batch, try one accumulation step fewer.

    One step fewer is the smallest growth that changes the split (a larger limit that leaves the
    split as it was would prove nothing). An OOM right after a regrowth goes back to the size
    that ran cleanly (``last_good``) and doubles the wait, so a size that keeps failing is tried
    ever more rarely; any OOM restarts the count of clean steps.
    """

    def __init__(self, after: int | None):
        self.after = after
        self.wait = after
        self.clean = 0
        self.last_good: int | None = None   # set while a regrowth is on trial

    def proposal(self, plan: Plan, original: int) -> int | None:
        """Called before a step: a larger micro-batch limit to try, or None."""
        self.last_good = None
        if self.after is None or plan.micro_batch >= original:
            return None
        self.clean += 1
        if self.clean <= self.wait:
            return None
        self.clean = 0
        if plan.accum_steps <= 1:
            return None
        grown = -(-plan.per_rank_batch // (plan.accum_steps - 1))   # the smallest limit for one step fewer
        if grown > original:
            return None
        self.last_good = plan.micro_batch
        return grown

    def state_dict(self) -> dict:
        return {"after": self.after, "wait": self.wait, "clean": self.clean, "last_good": self.last_good}

    def load_state_dict(self, state: dict) -> None:
        self.after, self.wait, self.clean, self.last_good = (state["after"], state["wait"], state["clean"],
                                                             state["last_good"])

    def out_of_memory(self) -> None:
        if self.after is None:
            return
        if self.last_good is not None:
            self.wait *= 2
        self.clean = 0
        self.last_good = None
