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

from .memory import drop_traceback, format_bytes, is_oom_error, read_device

log = logging.getLogger("autoaccum")


@dataclass
class Failure:
    """A micro-batch that raised: out of memory (recoverable) or anything else (re-raised)."""

    index: int                      # which micro-batch
    size: int                       # its number of samples
    oom: bool
    message: str
    error: BaseException | None = None   # kept only for non-OOM errors, to re-raise unchanged


def classify(exc: BaseException, index: int, size: int) -> Failure:
    """Turn an exception from a micro-batch into a Failure; an OOM's frames are released at once."""
    if is_oom_error(exc):
        message = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}"
        drop_traceback(exc)
        return Failure(index, size, True, message)
    return Failure(index, size, False, f"{type(exc).__name__}: {exc}", exc)


def smaller_micro_batch(failure: Failure, limit: int, probe_result, device: torch.device) -> int:
    """At most half the size that failed, and no more than the memory model says fits now.

    Returns 0 when even one sample ran out of memory.
    """
    proposal = min(limit, failure.size // 2)
    model = getattr(probe_result, "memory_model", None)
    if model is not None and proposal > 0 and device.type == "cuda":
        reading = read_device(device)
        room = reading.usable_bytes - getattr(probe_result, "headroom_bytes", 0)
        fits = model.max_micro_batch(room)
        if 0 < fits < proposal:
            proposal = fits
    return proposal


def not_enough_memory_message(failure: Failure, rank: int, device: torch.device, probe_result) -> str:
    reading = read_device(device)
    needed = ""
    model = getattr(probe_result, "memory_model", None)
    if model is not None:
        needed = f"; the memory model predicts {format_bytes(model.peak(1))} for one sample"
    return (f"a micro-batch of {failure.size} sample(s) ran out of memory on rank {rank} ({failure.message}){needed}; "
            f"{format_bytes(reading.usable_bytes)} is usable on {reading.name}. Free memory (other processes), "
            f"shorten the sequences, use amp_dtype=torch.bfloat16 or activation checkpointing")


class Regrow:
    """After ``after`` clean steps below the original micro-batch, try 25% more; back off after an OOM.

    An OOM right after a regrowth doubles the wait, so a size that keeps failing is tried ever
    more rarely; any OOM restarts the count of clean steps.
    """

    def __init__(self, after: int | None):
        self.after = after
        self.wait = after
        self.clean = 0
        self.just_grew = False

    def proposal(self, current: int, original: int) -> int | None:
        """Called before a step: a larger micro-batch to try, or None."""
        self.just_grew = False
        if self.after is None or current >= original:
            return None
        self.clean += 1
        if self.clean <= self.wait:
            return None
        self.clean = 0
        self.just_grew = True
        return min(original, max(current + 1, int(current * 1.25)))

    def out_of_memory(self) -> None:
        if self.after is None:
            return
        if self.just_grew:
            self.wait *= 2
        self.clean = 0
        self.just_grew = False
