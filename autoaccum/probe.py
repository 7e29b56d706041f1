"""``probe``: the largest micro-batch that runs a whole training step, found in few real trials.

This is the entry point that ties the pieces together: the device's limit (:mod:`.memory`), one
real trial (:mod:`.trial`), the search over trials (:mod:`.search`) and the cache of earlier
answers (:mod:`.cache`), which a confirmation trial checks before it is believed.
"""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from . import cache as probe_cache
from .buffer import GradBuffer
from .checks import check_optimizer, check_bool, check_device, check_int, check_runnable, check_step_arguments, parse_bytes
from .loss import LossFn
from .memory import CPU_BUDGET_FRACTION, NotEnoughMemoryError, format_bytes, read_device, release_memory
from .checks import check_positive_int
from .search import (DEFAULT_MAX_MICRO_BATCH, DEFAULT_MAX_TRIALS, MemoryModel, Trial, confirms, default_headroom,
                     search)
from .trial import CudaMeter, StateGuard, TrackerMeter, TrialRunner, persistent_tensors, sample_factory
from .tracker import LiveBytes
from .update import Updater

CPU_DEFAULT_NOTE = "CPU: the limit is {:.0%} of available RAM by default; pass memory_budget= to choose"


# ---------------------------------------------------------------- results
@dataclass
class ProbeResult:
    """What :func:`probe` found; ``to_dict`` is JSON-serialisable, ``plot`` draws it."""

    max_micro_batch: int
    trials: list[Trial]
    memory_model: MemoryModel | None
    limit_bytes: int
    headroom_bytes: int
    device: dict
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    from_cache: bool = False        # the answer is a cached one, confirmed by one real trial
    cache_key: str | None = None

    def to_dict(self) -> dict:
        return {
            "max_micro_batch": self.max_micro_batch,
            "trials": [asdict(t) for t in self.trials],
            "memory_model": asdict(self.memory_model) if self.memory_model else None,
            "limit_bytes": self.limit_bytes,
            "headroom_bytes": self.headroom_bytes,
            "device": self.device,
            "notes": list(self.notes),
            "seconds": self.seconds,
            "from_cache": self.from_cache,
            "cache_key": self.cache_key,
        }

    @classmethod
    def from_dict(cls, d: dict) -> ProbeResult:
        return cls(max_micro_batch=d["max_micro_batch"], trials=[Trial(**t) for t in d["trials"]],
                   memory_model=MemoryModel(**d["memory_model"]) if d.get("memory_model") else None,
                   limit_bytes=d["limit_bytes"], headroom_bytes=d["headroom_bytes"], device=d["device"],
                   notes=list(d.get("notes", [])), seconds=d.get("seconds", 0.0),
                   from_cache=d.get("from_cache", False), cache_key=d.get("cache_key"))

    def table(self) -> str:
        """The trials as aligned text, for the CLI and logs."""
        return trial_table(self.trials)

    def plot(self, path: str | os.PathLike) -> None:
        """Write a PNG: peak memory against micro-batch, the model, the limit and the trials."""
        plot_memory(path, self.trials, self.memory_model, self.limit_bytes, self.headroom_bytes,
                    self.max_micro_batch, title=f"autoaccum probe on {self.device.get('name', '?')}")


def trial_table(trials: list[Trial]) -> str:
    rows = [f"{'trial':>5}  {'micro-batch':>11}  {'fits':>4}  {'peak':>11}  {'seconds':>8}  note"]
    for i, t in enumerate(trials, 1):
        peak = format_bytes(t.peak_bytes) if t.peak_bytes is not None else "-"
        note = "out of memory" if t.oom else ("" if t.fits else "over the limit")
        rows.append(f"{i:>5}  {t.micro_batch:>11}  {'yes' if t.fits else 'no':>4}  {peak:>11}  "
                    f"{t.seconds:>8.3f}  {note}")
    return "\n".join(rows)


def plot_memory(path, trials, model, limit, headroom, chosen, title) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("plot() needs matplotlib: pip install 'autoaccum[plot]'") from e
    gib = float(1 << 30)
    xs = [t.micro_batch for t in trials]
    top = max(xs + [chosen]) * 1.15 + 1
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    if model is not None:
        grid = [top * i / 200 for i in range(201)]
        ax.plot(grid, [model.peak(n) / gib for n in grid], color="0.45", lw=1, label="memory model")
    ax.axhline(limit / gib, color="tab:red", lw=1.2, label=f"limit {format_bytes(limit)}")
    ax.axhline((limit - headroom) / gib, color="tab:red", lw=0.8, ls="--",
               label=f"limit - headroom {format_bytes(headroom)}")
    for t in trials:
        y = (t.peak_bytes if t.peak_bytes is not None else limit) / gib
        ax.scatter([t.micro_batch], [y], marker="o" if t.fits else "x", s=40, zorder=3,
                   color="tab:green" if t.fits else "tab:red")
    for i, t in enumerate(trials, 1):
        y = (t.peak_bytes if t.peak_bytes is not None else limit) / gib
        ax.annotate(str(i), (t.micro_batch, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.axvline(chosen, color="tab:blue", lw=1, ls=":", label=f"max micro-batch {chosen}")
    ax.set_xlabel("micro-batch")
    ax.set_ylabel("peak memory (GiB)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ---------------------------------------------------------------- the public entry point
def probe(model: nn.Module, sample: Any, *, optimizer=None, loss_fn: LossFn | None = None,
          amp_dtype: torch.dtype | None = None, count_fn=None, device: torch.device | str | None = None,
          max_micro_batch: int | None = None, memory_budget: int | str | None = None,
          headroom: int | str | None = None, max_trials: int = DEFAULT_MAX_TRIALS,
          cache: bool = True, world_size: int = 1, accum_dtype: torch.dtype | str | None = "auto",
          master_weights: bool = False) -> ProbeResult:
    """Find the largest micro-batch that runs a whole training step on ``device`` without OOM.

    ``sample`` is one batch (tiled or sliced to each trial's size) or a callable ``sample(n)``
    returning ``n`` samples; make it the worst case (the longest sequences). ``optimizer`` is
    stepped in each trial so its state is counted (without it, optimizer memory is not).
    ``memory_budget`` caps the usable bytes on any device (on the CPU the default is half of
    the available RAM). With ``cache=True`` an earlier answer for the same model, sample, optimizer
    and device is tried first and used only if one real trial at its size fits with the peak it
    had (see :mod:`autoaccum.cache`); ``cache=False`` neither reads nor writes the cache.
    ``accum_dtype``/``master_weights`` are as in :func:`autoaccum.fit`: the trials hold the same
    gradient buffer and master weights that training will.
    The model, optimizer state and RNG streams are left exactly as they were.
    """
    started = time.perf_counter()
    amp, accum = check_step_arguments(model, amp_dtype, loss_fn, count_fn, accum_dtype, master_weights)
    check_optimizer(optimizer, model.parameters())
    cap = DEFAULT_MAX_MICRO_BATCH if max_micro_batch is None else max_micro_batch
    check_positive_int("max_micro_batch", cap)
    check_positive_int("max_trials", max_trials)
    check_int("world_size", world_size, "the number of data-parallel ranks the answer is for", maximum=1 << 20)
    check_bool("cache", cache, "reuse and record probe answers")
    dev = _probe_device(model, device)
    make_batch, sample_desc = sample_factory(sample)
    budget = parse_bytes(memory_budget) if memory_budget is not None else None
    fixed_headroom = parse_bytes(headroom, "headroom", allow_zero=True) if headroom is not None else None

    reading = read_device(dev)
    limit, notes = _limit(reading, budget, dev)
    if optimizer is None:
        notes.append("no optimizer: its state and step are not counted; pass optimizer= for a whole step")
    if dev.type == "cuda":
        notes.append("peaks are torch's reserved bytes (max_memory_reserved), the figure that must fit")
    else:
        notes.append("peaks are live tensor bytes seen by a dispatch-mode tracker (no allocator on the CPU)")

    key = cached = None
    if cache:
        # A budget is exact; a device's free memory drifts, so it is compared in 64 MiB steps.
        limit_key = limit if budget is not None and limit == budget else f"device~{limit >> 26}x64MiB"
        try:
            key = probe_cache.fingerprint(
                model=probe_cache.describe_model(model), sample=sample_desc,
                sample_fn=probe_cache.describe_callable(sample) if "callable" in sample_desc else None,
                optimizer=probe_cache.describe_optimizer(optimizer), amp=str(amp),
                loss_fn=probe_cache.describe_callable(loss_fn), device=[reading.name, reading.total_bytes],
                limit=limit_key, max_micro_batch=cap, world_size=world_size, headroom=fixed_headroom,
                max_trials=max_trials, gradients=[str(accum), master_weights])
        except Exception as e:  # noqa: BLE001 - user objects with odd attributes must not stop the probe
            notes.append(f"the probe cache is off for this model: its fingerprint failed ({type(e).__name__}: {e})")
            key = None
        cached = probe_cache.load(key, cap) if key is not None else None

    guard = StateGuard(model, optimizer)
    tracker = None
    buffer = GradBuffer(list(model.parameters()), accum) if accum is not None else None
    try:
        if dev.type == "cuda":
            meter = CudaMeter(dev)
        else:
            held = persistent_tensors(model, optimizer) + (list(buffer.flat.values()) if buffer else [])
            tracker = LiveBytes(held)
            meter = TrackerMeter(tracker)
        runner = TrialRunner(model, optimizer, make_batch, loss_fn, amp, dev, meter, buffer,
                             Updater(master_weights))
        with contextlib.ExitStack() as stack:
            if buffer is not None:
                stack.enter_context(buffer.capturing())
            if tracker is not None:
                stack.enter_context(tracker)
            first = hint = None
            from_cache = False
            if cached is not None:
                first, head, why = _confirm(cached, runner, limit, fixed_headroom, tracker is None)
                notes.append(why)
                hint = MemoryModel(**cached["memory_model"]) if cached.get("memory_model") else None
            if first is not None and first.fits:
                best, trials, mem_model, from_cache = first.micro_batch, [first], hint, True
            else:
                best, trials, mem_model, head = search(runner, limit, cap, headroom=fixed_headroom,
                                                       allocator=tracker is None, max_trials=max_trials,
                                                       first=first, hint=hint)
    finally:
        if buffer is not None:
            buffer.remove()
        guard.restore()
        del guard, buffer
        release_memory(dev)

    if best == 0:
        smallest = min(trials, key=lambda t: t.micro_batch)
        needed = (f"{format_bytes(smallest.peak_bytes)} measured" if smallest.peak_bytes is not None
                  else "more than is available (out of memory)")
        raise NotEnoughMemoryError(
            f"even a micro-batch of {smallest.micro_batch} does not fit on {reading.name}: it needs {needed}, "
            f"and {format_bytes(limit - head)} is usable (limit {format_bytes(limit)} minus headroom "
            f"{format_bytes(head)}); free memory, shorten the sample, use amp_dtype=torch.bfloat16 or "
            f"activation checkpointing, or raise memory_budget")
    if best == cap and max_micro_batch is not None:
        notes.append(f"max_micro_batch={cap} fits; larger sizes were not tried")
    result = ProbeResult(max_micro_batch=best, trials=trials, memory_model=mem_model, limit_bytes=limit,
                         headroom_bytes=head, device=reading.to_dict(), notes=notes,
                         seconds=time.perf_counter() - started, from_cache=from_cache, cache_key=key)
    if key is not None and not from_cache:
        probe_cache.store(key, result.to_dict())
    return result


def _limit(reading, budget: int | None, dev: torch.device) -> tuple[int, list[str]]:
    """The usable bytes (the device's, or the budget when smaller) and notes that say where they came from."""
    notes = list(reading.notes)
    limit = reading.usable_bytes
    if budget is None:
        if dev.type == "cpu":
            notes.append(CPU_DEFAULT_NOTE.format(CPU_BUDGET_FRACTION))
    elif budget < limit or limit == 0:
        notes.append(f"memory_budget {format_bytes(budget)} caps the usable {format_bytes(limit)}")
        limit = budget
    else:
        notes.append(f"memory_budget {format_bytes(budget)} is above the usable {format_bytes(limit)}; ignored")
    if limit <= 0:
        raise ValueError(f"no memory limit is known for device {dev}; pass memory_budget= (e.g. '16GiB')")
    return limit, notes


def _confirm(entry: dict, runner: TrialRunner, limit: int, fixed_headroom: int | None,
             allocator: bool) -> tuple[Trial, int, str]:
    """One real trial at the cached answer: ``(trial, headroom, why)``; ``trial.fits`` says whether
    the cached answer stands (it fits, with the peak it had when it was stored)."""
    n = entry["max_micro_batch"]
    cached_peak = next(t["peak_bytes"] for t in entry["trials"]
                       if t["fits"] and t["micro_batch"] == n and t["peak_bytes"] is not None)
    trial = runner(n)
    head = fixed_headroom if fixed_headroom is not None else default_headroom(limit, trial.base_bytes or 0, allocator)
    trial.fits, why = confirms(trial, cached_peak, limit - head)
    return trial, head, why


def _probe_device(model: nn.Module, device) -> torch.device:
    devices = {p.device for p in model.parameters()}
    if device is None:
        if len(devices) != 1:
            raise ValueError(f"the model's parameters are on {sorted(map(str, devices)) or 'no device'}; "
                             f"pass device=")
        dev = devices.pop()
        check_runnable("the model's device", dev)
        return dev
    dev = check_device("device", device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    if devices and all(d != dev for d in devices):
        raise ValueError(f"device={device!r} but the model is on {sorted(map(str, devices))}; move the model "
                         f"there first (model.to({str(dev)!r}))")
    return dev
