"""Find the largest micro-batch that runs a whole training step, in few real trials.

The anchors search blindly: Lightning doubles then bisects (up to 25 trials), Accelerate backs
off by x0.9 from 128 on every OOM. Peak memory of a training step is close to affine in the
micro-batch (parameters, gradients and optimizer state are fixed; activations grow per
sample), so we measure instead of guessing:

1. a trial at a small size measures the fixed bytes and an upper bound on the per-sample bytes,
   which gives a second size that surely fits and is far enough away to measure the slope;
2. the two measured peaks give a memory model; it predicts the largest size under the usable
   limit minus a headroom for fragmentation;
3. a trial at the prediction confirms it. When it runs out of memory we bisect between the last
   fit and the failure (or interpolate, when the failure was measured); when the refitted model
   says there is room, we search upward; the number of trials is bounded.

A trial is one micro-batch forward + backward with gradients already allocated (as in the
middle of an accumulation) and one optimizer step, so optimizer state exists. Everything the
trials touch (parameters, buffers, gradients, optimizer state, RNG streams) is restored
bitwise afterwards.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import inspect
import json
import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import batch as batching
from . import rng
from .buffer import GradBuffer
from .checks import check_step_arguments
from .loss import LossFn, compute_loss
from .memory import (DeviceReading, NotEnoughMemoryError, drop_traceback, format_bytes, is_oom_error,
                     oom_message, parse_bytes, read_device, release_memory)
from .plan import check_positive_int
from .tracker import LiveBytes, storage_bytes
from .update import Updater

DEFAULT_MAX_MICRO_BATCH = 1 << 16
DEFAULT_MAX_TRIALS = 6
STOP_GAIN = 0.02      # a further trial must promise at least 2% more samples
CACHE_VERSION = 2


# ---------------------------------------------------------------- results
@dataclass
class Trial:
    """One real run of a micro-batch: did it fit, and how much memory did it take."""

    micro_batch: int
    fits: bool
    peak_bytes: int | None          # peak over forward/backward and the optimizer step (None after an OOM)
    seconds: float
    oom: bool = False               # a real out-of-memory error (not just over the budget)
    base_bytes: int | None = None   # memory held before the micro-batch: parameters, gradients, state
    forward_backward_bytes: int | None = None
    step_bytes: int | None = None
    error: str | None = None


@dataclass
class MemoryModel:
    """``peak(n) = max(fixed + per_sample * n, step)``: fitted to measured trials."""

    fixed_bytes: float
    per_sample_bytes: float
    step_bytes: float = 0.0

    def peak(self, n: int) -> float:
        return max(self.fixed_bytes + self.per_sample_bytes * n, self.step_bytes)

    def max_micro_batch(self, limit: float) -> int:
        """Largest ``n`` whose predicted peak is at most ``limit`` (0 if none; a huge number if flat)."""
        if self.step_bytes > limit or self.fixed_bytes + self.per_sample_bytes > limit:
            return 0
        if self.per_sample_bytes <= 0:
            return DEFAULT_MAX_MICRO_BATCH * 1024
        return int(math.floor((limit - self.fixed_bytes) / self.per_sample_bytes + 1e-9))

    @classmethod
    def through(cls, a: tuple[int, float], b: tuple[int, float], step_bytes: float = 0.0) -> MemoryModel:
        (n1, p1), (n2, p2) = sorted([a, b])
        slope = (p2 - p1) / (n2 - n1)
        return cls(fixed_bytes=p1 - slope * n1, per_sample_bytes=slope, step_bytes=step_bytes)


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
    from_cache: bool = False
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


# ---------------------------------------------------------------- the search (no torch needed)
def default_headroom(limit: int, base: int, allocator: bool) -> int:
    """Bytes kept free below the limit: 2% of the room left for activations; on a caching
    allocator (CUDA) at least 64 MiB for fragmentation, but never more than 4% of that room,
    so the answer stays within 5% of the true maximum on small cards."""
    room = max(limit - base, 0)
    headroom = 0.02 * room
    if allocator:
        headroom = max(headroom, min(64 << 20, 0.04 * room))
    return int(headroom)


def search(run: Callable[[int], Trial], limit: int, max_micro_batch: int, *, headroom: int | None = None,
           allocator: bool = False, max_trials: int = DEFAULT_MAX_TRIALS, start: int = 2
           ) -> tuple[int, list[Trial], MemoryModel | None, int]:
    """Largest micro-batch ``n <= max_micro_batch`` whose trial peak stays under ``limit - headroom``.

    ``run(n)`` performs one trial and returns it (``peak_bytes=None`` and ``oom=True`` when it
    ran out of memory). Returns ``(max_micro_batch, trials, model, headroom)``; the answer is 0
    when even one sample does not fit.
    """
    trials: list[Trial] = []
    lo, hi = 0, max_micro_batch + 1     # lo fits, hi does not (or is beyond the cap)
    n = min(start, max_micro_batch)
    while True:
        t = run(n)
        trials.append(t)
        if headroom is None and t.base_bytes is not None:
            headroom = default_headroom(limit, t.base_bytes, allocator)
        target = limit - (headroom or 0)
        t.fits = not t.oom and t.peak_bytes is not None and t.peak_bytes <= target
        if t.fits:
            lo = max(lo, n)
        else:
            hi = min(hi, n)
        if hi - lo <= 1 or len(trials) >= max_trials:
            break
        nxt = _next_size(trials, lo, hi, max_micro_batch, target)
        if nxt is None:
            break
        n = nxt
    return lo, trials, fit_model(trials, limit - (headroom or 0)), headroom or 0


def _next_size(trials: list[Trial], lo: int, hi: int, cap: int, target: float) -> int | None:
    """The next size to try, or None when ``lo`` is (within STOP_GAIN of) the answer."""
    measured = _measured(trials)
    if len(measured) >= 2:
        guess = _local_model(trials, target).max_micro_batch(target)
    elif len(measured) == 1:
        guess = _safe_extrapolation(measured[0], target)
    else:
        guess = None
    if guess is not None and guess >= hi:
        # Beyond the cap: try the cap. Beyond a size that failed: the model is wrong up there.
        guess = cap if hi > cap else None
    if len(trials) >= 2 and not trials[-1].fits and not trials[-2].fits:
        guess = None  # two failures in a row: the model keeps overshooting, so halve the bracket instead
    if guess is None:
        guess = (lo + hi) // 2
        if guess <= lo or (lo > 0 and hi - 1 - lo <= STOP_GAIN * lo):
            return None
        return guess
    if guess <= lo or (lo > 0 and len(measured) >= 2 and guess - lo <= STOP_GAIN * lo):
        return None
    return guess


def _measured(trials: list[Trial]) -> list[Trial]:
    seen: dict[int, Trial] = {}
    for t in trials:
        if t.peak_bytes is not None:
            seen[t.micro_batch] = t
    return sorted(seen.values(), key=lambda t: t.micro_batch)


def _safe_extrapolation(t: Trial, target: float) -> int:
    """From one trial: the size that fits even if every byte the micro-batch added were per-sample
    (less 15%, for measurement noise); far enough from the first trial to measure the slope."""
    if t.peak_bytes > target:
        return max(1, t.micro_batch // 2)
    added = t.forward_backward_bytes - t.base_bytes if t.forward_backward_bytes is not None else None
    if not added or added <= 0:
        return t.micro_batch * 4
    per_sample_upper = added / t.micro_batch
    return t.micro_batch + int(0.85 * (target - t.peak_bytes) / per_sample_upper)


def _local_model(trials: list[Trial], target: float) -> MemoryModel:
    """Secant through the two measured trials that best describe the curve near the limit:
    the largest one under the target and the smallest one over it (interpolation), else the
    two largest under it (extrapolation)."""
    measured = _measured(trials)
    under = [t for t in measured if t.peak_bytes <= target]
    over = [t for t in measured if t.peak_bytes > target]
    if under and over:
        a, b = under[-1], over[0]
    elif len(under) >= 2:
        a, b = under[-2], under[-1]
    else:
        a, b = over[0], over[1]
    step = max((t.step_bytes or 0) for t in measured)
    return MemoryModel.through((a.micro_batch, a.forward_backward_bytes or a.peak_bytes),
                               (b.micro_batch, b.forward_backward_bytes or b.peak_bytes), step)


def fit_model(trials: list[Trial], target: float) -> MemoryModel | None:
    """The model reported in results: the local secant, or a flat line through a single trial."""
    measured = _measured(trials)
    if len(measured) >= 2:
        return _local_model(trials, target)
    if len(measured) == 1:
        t = measured[0]
        return MemoryModel(fixed_bytes=float(t.forward_backward_bytes or t.peak_bytes), per_sample_bytes=0.0,
                           step_bytes=float(t.step_bytes or 0))
    return None


# ---------------------------------------------------------------- one real trial
class _CudaMeter:
    """Reads the caching allocator: reserved bytes are what must fit on the card."""

    allocator = True

    def __init__(self, device: torch.device):
        self.device = device

    def clear(self) -> None:
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)

    def reset_peak(self) -> None:
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)

    def current(self) -> int:
        return torch.cuda.memory_allocated(self.device)

    def peak(self) -> int:
        torch.cuda.synchronize(self.device)
        return torch.cuda.max_memory_reserved(self.device)


class _TrackerMeter:
    """Live tensor bytes seen by a dispatch-mode tracker (CPU, and fake tensors in ``estimate``)."""

    allocator = False

    def __init__(self, tracker: LiveBytes):
        self.tracker = tracker

    def clear(self) -> None:
        self.tracker.reset_peak()

    def reset_peak(self) -> None:
        self.tracker.reset_peak()

    def current(self) -> int:
        return self.tracker.current

    def peak(self) -> int:
        return self.tracker.peak


class TrialRunner:
    """Runs a micro-batch of ``n`` the way training does and measures its peak memory.

    With a gradient ``buffer`` (``accum_dtype``) the gradients fold into it through its hooks
    and reach the optimizer through ``updater`` (casts or fp32 masters), as in training.
    """

    def __init__(self, model: nn.Module, optimizer, make_batch: Callable[[int], Any], loss_fn: LossFn | None,
                 amp_dtype: torch.dtype | None, device: torch.device, meter,
                 buffer: GradBuffer | None = None, updater: Updater | None = None):
        self.model, self.optimizer, self.make_batch = model, optimizer, make_batch
        self.loss_fn, self.amp_dtype, self.device, self.meter = loss_fn, amp_dtype, device, meter
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.buffer, self.updater = buffer, updater or Updater()

    def __call__(self, n: int) -> Trial:
        started = time.perf_counter()
        error = None
        try:
            trial = self._measure(n)
        except Exception as e:
            if not is_oom_error(e):
                raise
            error = oom_message(e, 200)
            drop_traceback(e)
            del e
            trial = None
        if trial is None:  # outside the except block, so the frames are gone before we collect
            release_memory(self.device)
            trial = Trial(micro_batch=n, fits=False, peak_bytes=None, seconds=0.0, oom=True, error=error)
        trial.seconds = time.perf_counter() - started
        return trial

    def _measure(self, n: int) -> Trial:
        if self.buffer is not None:
            self.buffer.begin_step()     # the buffer itself is allocated already, like mid-accumulation
        else:
            for p in self.params:        # mid-accumulation: gradients already exist
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
        self.meter.clear()
        base = self.meter.current()
        part = batching.to_device(self.make_batch(n), self.device)
        got = batching.batch_size(part)
        if got != n:
            raise ValueError(f"sample({n}) returned a batch of {got} samples; sample(n) must return n samples")
        loss = compute_loss(self.model, part, self.loss_fn, self.device, self.amp_dtype)
        loss.backward()
        del loss, part
        forward_backward = self.meter.peak()
        step = 0
        if self.optimizer is not None:
            self.meter.reset_peak()
            before = self.meter.current()
            if self.buffer is not None:
                self.updater.step(self.optimizer, self.buffer.written())
                for p in self.params:
                    p.grad = None        # cast copies go; the buffer stays
            else:
                self.optimizer.step()
            step = self.meter.peak()
            new_state = max(self.meter.current() - before, 0)
            # The first step creates optimizer state; in training it exists during every backward.
            forward_backward += new_state
            base += new_state
        return Trial(micro_batch=n, fits=True, peak_bytes=max(forward_backward, step), seconds=0.0,
                     base_bytes=base, forward_backward_bytes=forward_backward, step_bytes=step)


class StateGuard:
    """Bitwise snapshot (in host memory) of everything a trial changes; ``restore`` puts it back."""

    def __init__(self, model: nn.Module, optimizer):
        self.model, self.optimizer = model, optimizer
        self.params = [(p, _host_copy(p)) for p in model.parameters()]
        self.buffers = [(b, _host_copy(b)) for b in model.buffers()]
        self.grads = [(p, None if p.grad is None else _host_copy(p.grad)) for p, _ in self.params]
        self.opt_state = None
        if optimizer is not None:
            self.opt_state = {p: {k: (_host_copy(v), v.device) if isinstance(v, torch.Tensor) else copy.deepcopy(v)
                                  for k, v in st.items()} for p, st in optimizer.state.items()}
            self.opt_groups = [{k: copy.deepcopy(v) for k, v in g.items() if k != "params"}
                               for g in optimizer.param_groups]
        self.rng = rng.capture()

    def restore(self) -> None:
        with torch.no_grad():
            for t, saved in self.params + self.buffers:
                t.copy_(saved)
            for p, saved in self.grads:
                p.grad = None if saved is None else saved.to(p.device)
        if self.optimizer is not None:
            state = self.optimizer.state
            for p in list(state.keys()):
                if p not in self.opt_state:
                    del state[p]
            for p, saved in self.opt_state.items():
                current = state[p]
                for k in list(current.keys()):
                    if k not in saved:
                        del current[k]
                for k, v in saved.items():
                    if isinstance(v, tuple) and len(v) == 2 and isinstance(v[0], torch.Tensor):
                        host, device = v
                        old = current.get(k)
                        if isinstance(old, torch.Tensor) and old.shape == host.shape and old.dtype == host.dtype:
                            old.copy_(host)
                        else:
                            current[k] = host.to(device)
                    else:
                        current[k] = v
            for group, saved in zip(self.optimizer.param_groups, self.opt_groups):
                group.update(saved)
        rng.restore(self.rng)


def _host_copy(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", copy=True)


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
    the available RAM). Results are cached under the user cache dir, keyed by everything that
    changes memory use; ``cache=False`` neither reads nor writes the cache.
    ``accum_dtype``/``master_weights`` are as in :func:`autoaccum.fit`: the trials hold the same
    gradient buffer and master weights that training will.
    The model, optimizer state and RNG streams are left exactly as they were.
    """
    started = time.perf_counter()
    amp, accum = check_step_arguments(model, amp_dtype, loss_fn, count_fn, accum_dtype, master_weights)
    cap = DEFAULT_MAX_MICRO_BATCH if max_micro_batch is None else max_micro_batch
    check_positive_int("max_micro_batch", cap)
    check_positive_int("max_trials", max_trials)
    dev = _probe_device(model, device)
    make_batch, sample_desc = sample_factory(sample)
    budget = parse_bytes(memory_budget) if memory_budget is not None else None
    fixed_headroom = parse_bytes(headroom, "headroom", allow_zero=True) if headroom is not None else None

    reading = read_device(dev)
    notes = list(reading.notes)
    limit = reading.usable_bytes
    if budget is not None:
        if budget < limit or limit == 0:
            notes.append(f"memory_budget {format_bytes(budget)} caps the usable {format_bytes(limit)}")
            limit = budget
        else:
            notes.append(f"memory_budget {format_bytes(budget)} is above the usable {format_bytes(limit)}; ignored")
    if limit <= 0:
        raise ValueError(f"no memory limit is known for device {dev}; pass memory_budget= (e.g. '16GiB')")
    if optimizer is None:
        notes.append("no optimizer: its state and step are not counted; pass optimizer= for a whole step")
    if dev.type == "cuda":
        notes.append("peaks are torch's reserved bytes (max_memory_reserved), the figure that must fit")
    else:
        notes.append("peaks are live tensor bytes seen by a dispatch-mode tracker (no allocator on the CPU)")

    key = None
    if cache:
        # A budget is exact; a device's free memory drifts, so it is compared in 64 MiB steps.
        limit_key = limit if budget is not None and limit == budget else f"device~{limit >> 26}x64MiB"
        key = cache_key(model, sample_desc, optimizer, amp, loss_fn, reading, limit_key, cap, world_size,
                        fixed_headroom, max_trials, (str(accum), master_weights))
        hit = _cache_load(key)
        if hit is not None:
            hit.from_cache = True
            hit.seconds = time.perf_counter() - started
            return hit

    guard = StateGuard(model, optimizer)
    tracker = None
    buffer = GradBuffer(list(model.parameters()), accum) if accum is not None else None
    try:
        if dev.type == "cuda":
            meter = _CudaMeter(dev)
        else:
            persistent = _persistent_tensors(model, optimizer) + (list(buffer.flat.values()) if buffer else [])
            tracker = LiveBytes(baseline=storage_bytes(persistent))
            meter = _TrackerMeter(tracker)
        runner = TrialRunner(model, optimizer, make_batch, loss_fn, amp, dev, meter, buffer,
                             Updater(master_weights))
        with contextlib.ExitStack() as stack:
            if buffer is not None:
                stack.enter_context(buffer.capturing())
            if tracker is not None:
                stack.enter_context(tracker)
            best, trials, mem_model, head = search(runner, limit, cap, headroom=fixed_headroom,
                                                   allocator=tracker is None, max_trials=max_trials)
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
                         seconds=time.perf_counter() - started, cache_key=key)
    if cache:
        _cache_store(key, result)
    return result


def _probe_device(model: nn.Module, device) -> torch.device:
    devices = {p.device for p in model.parameters()}
    if device is None:
        if len(devices) != 1:
            raise ValueError(f"the model's parameters are on {sorted(map(str, devices)) or 'no device'}; "
                             f"pass device=")
        return devices.pop()
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    if devices and all(d != dev for d in devices):
        raise ValueError(f"device={device!r} but the model is on {sorted(map(str, devices))}; move the model "
                         f"there first (model.to({str(dev)!r}))")
    return dev


def sample_factory(sample: Any) -> tuple[Callable[[int], Any], Any]:
    """``make_batch(n)`` from a batch (tiled/sliced) or a callable, plus a description for the cache key."""
    if sample is None:
        raise ValueError("sample is required: one batch (any number of samples) or a callable sample(n)")
    if callable(sample) and not isinstance(sample, (torch.Tensor, dict, list, tuple)):
        streams = rng.capture()      # sample(1) may draw random numbers; the probe leaves them as they were
        try:
            one = batching.describe(sample(1), name="sample")
        finally:
            rng.restore(streams)
        return sample, {"callable": _qualname(sample), "source": _source_hash(sample), "one": one}
    batching.batch_size(sample, name="sample")  # validates leaves with clear errors
    return (lambda n: batching.tile(sample, n)), {"batch": batching.describe(sample, name="sample")}


def _persistent_tensors(model: nn.Module, optimizer) -> list[torch.Tensor]:
    out = list(model.parameters()) + list(model.buffers())
    out += [p.grad for p in model.parameters() if p.grad is not None]
    if optimizer is not None:
        out += [v for st in optimizer.state.values() for v in st.values() if isinstance(v, torch.Tensor)]
    return out


# ---------------------------------------------------------------- cache
def cache_dir() -> Path:
    env = os.environ.get("AUTOACCUM_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "autoaccum"


def cache_key(model, sample_desc, optimizer, amp, loss_fn, reading: DeviceReading, limit, cap: int,
              world_size: int, headroom, max_trials: int, gradients=None) -> str:
    """Everything that changes a step's memory: structure, shapes, dtypes, code, optimizer, amp, device."""
    classes = sorted({type(m) for m in model.modules()}, key=_qualname)
    opt = None
    if optimizer is not None:
        flags = {k: repr(v) for k, v in optimizer.defaults.items()
                 if k in ("foreach", "fused", "capturable", "amsgrad", "momentum", "differentiable", "maximize")}
        opt = [_qualname(type(optimizer)), flags, len(optimizer.state) > 0]
    parts = {
        "version": CACHE_VERSION, "torch": torch.__version__,
        "model": [_qualname(type(model)), model.training,
                  [[n, list(p.shape), str(p.dtype), p.requires_grad] for n, p in model.named_parameters()],
                  [[n, list(b.shape), str(b.dtype)] for n, b in model.named_buffers()],
                  [[_qualname(c), _source_hash(c)] for c in classes],
                  [[n, _settings(m)] for n, m in model.named_modules()]],
        "sample": sample_desc, "optimizer": opt, "amp": str(amp),
        "loss_fn": [_qualname(loss_fn), _source_hash(loss_fn)] if loss_fn is not None else None,
        "device": [reading.name, reading.total_bytes], "limit": limit,
        "max_micro_batch": cap, "world_size": world_size, "headroom": headroom, "max_trials": max_trials,
        "gradients": gradients,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _cache_file() -> Path:
    return cache_dir() / "probe-cache.json"


def _cache_read_all() -> dict:
    try:
        with open(_cache_file()) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _cache_load(key: str) -> ProbeResult | None:
    entry = _cache_read_all().get(key)
    if entry is None:
        return None
    try:
        result = ProbeResult.from_dict(entry)
    except (KeyError, TypeError, ValueError):
        return None
    best = result.max_micro_batch
    if isinstance(best, bool) or not isinstance(best, int) or best < 1:
        return None   # a damaged entry: probe again
    return result


def _cache_store(key: str, result: ProbeResult) -> None:
    data = _cache_read_all()
    data[key] = result.to_dict() | {"stored_at": time.time()}
    if len(data) > 256:  # keep the newest entries
        for old in sorted(data, key=lambda k: data[k].get("stored_at", 0))[: len(data) - 256]:
            del data[old]
    path = _cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".probe-cache.")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
        os.replace(tmp, path)  # atomic: concurrent ranks never see a torn file
    except OSError:
        pass  # a read-only home is no reason to fail training


def _settings(module: nn.Module) -> dict:
    """A module's plain public settings (``p`` of dropout, ``eps``, ``gradient_checkpointing``,
    ``use_cache``...): flags that change memory without changing any parameter shape."""
    out = {}
    for k, v in vars(module).items():
        if k.startswith("_"):
            continue
        if v is None or isinstance(v, (bool, int, float, str)):
            out[k] = v
        elif isinstance(v, (tuple, list)) and all(x is None or isinstance(x, (bool, int, float, str)) for x in v):
            out[k] = list(v)
    return out


def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__qualname__)}"


def _source_hash(obj: Any) -> str | None:
    try:
        return hashlib.sha256(inspect.getsource(obj).encode()).hexdigest()[:16]
    except (OSError, TypeError):
        return None
