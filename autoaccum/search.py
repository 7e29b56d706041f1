"""The search for the largest micro-batch: a memory model fitted to trials, no torch needed.

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

``search(run, ...)`` takes the trial as a function, so it is tested on simulated devices
(``tests/test_search.py``) and shared by the probe (real trials) and the estimator (fake ones).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

DEFAULT_MAX_MICRO_BATCH = 1 << 16
DEFAULT_MAX_TRIALS = 6
STOP_GAIN = 0.02      # a further trial must promise at least 2% more samples
BLOCK = 2 << 20       # CUDA's caching allocator hands out large blocks in 2 MiB steps
MIN_RISE = 8 * BLOCK  # a secant over a smaller rise in peak measures the rounding, not the slope
CONFIRM_TOLERANCE = 0.03   # a cached answer stands when its new peak is within 3% of the stored one


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
        n = (limit - self.fixed_bytes) / self.per_sample_bytes + 1e-9
        if not math.isfinite(n):          # a degenerate model (e.g. from a damaged cache entry)
            return 0 if n < 0 or math.isnan(n) else DEFAULT_MAX_MICRO_BATCH * 1024
        return int(math.floor(n))

    @classmethod
    def through(cls, a: tuple[int, float], b: tuple[int, float], step_bytes: float = 0.0) -> MemoryModel:
        (n1, p1), (n2, p2) = sorted([a, b])
        slope = (p2 - p1) / (n2 - n1)
        return cls(fixed_bytes=p1 - slope * n1, per_sample_bytes=slope, step_bytes=step_bytes)


def default_headroom(limit: int, base: int, allocator: bool) -> int:
    """Bytes kept free below the limit: 2% of the room left for activations; on a caching
    allocator (CUDA) at least 64 MiB for fragmentation, but never more than 4% of that room,
    so the answer stays within 5% of the true maximum on small cards."""
    room = max(limit - base, 0)
    headroom = 0.02 * room
    if allocator:
        headroom = max(headroom, min(64 << 20, 0.04 * room))
    return int(headroom)


def confirms(trial: Trial, cached_peak: int, target: float,
             tolerance: float = CONFIRM_TOLERANCE) -> tuple[bool, str]:
    """Does a trial at a cached answer confirm it? It must fit under ``target`` with a peak within
    ``tolerance`` of the cached one (a lower peak means the model changed and more may fit)."""
    n = trial.micro_batch
    if trial.oom or trial.peak_bytes is None:
        return False, f"cached micro-batch {n} ran out of memory; probed again"
    if trial.peak_bytes > target:
        return False, f"cached micro-batch {n} no longer fits (peak {trial.peak_bytes} B > {int(target)} B); probed again"
    drift = abs(trial.peak_bytes - cached_peak) / max(cached_peak, 1)
    if drift > tolerance:
        return False, (f"cached micro-batch {n} peaked at {trial.peak_bytes} B, {drift:.1%} off the cached "
                       f"{cached_peak} B; probed again")
    return True, f"cached micro-batch {n} confirmed by one trial (peak within {drift:.1%} of the cached one)"


def search(run: Callable[[int], Trial], limit: int, max_micro_batch: int, *, headroom: int | None = None,
           allocator: bool = False, max_trials: int = DEFAULT_MAX_TRIALS, start: int = 2,
           first: Trial | None = None, hint: MemoryModel | None = None
           ) -> tuple[int, list[Trial], MemoryModel | None, int]:
    """Largest micro-batch ``n <= max_micro_batch`` whose trial peak stays under ``limit - headroom``.

    ``run(n)`` performs one trial and returns it (``peak_bytes=None`` and ``oom=True`` when it
    ran out of memory). Returns ``(max_micro_batch, trials, model, headroom)``; the answer is 0
    when even one sample does not fit. ``first`` is a trial already run (a cached answer that did
    not confirm), counted as the first of ``max_trials``; ``hint`` is an earlier memory model whose
    slope places the second trial when the first one did not fit.
    """
    trials: list[Trial] = []
    lo, hi = 0, max_micro_batch + 1     # lo fits, hi does not (or is beyond the cap)
    n = min(first.micro_batch if first is not None else start, max_micro_batch)
    while True:
        t = first if first is not None else run(n)
        first = None
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
        nxt = _next_size(trials, lo, hi, max_micro_batch, target, hint, allocator)
        if nxt is None:
            break
        n = nxt
    return lo, trials, fit_model(trials, limit - (headroom or 0)), headroom or 0


def _next_size(trials: list[Trial], lo: int, hi: int, cap: int, target: float,
               hint: MemoryModel | None = None, allocator: bool = False) -> int | None:
    """The next size to try, or None when ``lo`` is (within STOP_GAIN of) the answer.

    On a caching allocator (CUDA) peaks come in 2 MiB blocks: two trials whose peaks differ by a
    few blocks say nothing about the slope (an H200 probe of an MLP measured 706 MiB at 2 and at
    24 samples, took the slope as nearly zero and ran out of memory at 14,446), so the next size
    is 8x the largest fit instead; and the secant aims one block under the target, so that a
    prediction is not pushed over it by rounding (the same probe then spent its last trials on
    sizes 8 apart that rounded to the same peak, just over)."""
    measured = _measured(trials)
    if len(measured) >= 2:
        a, b = _secant_points(measured, target)
        if allocator and b.peak_bytes <= target and abs(_bytes(b) - _bytes(a)) < MIN_RISE and 8 * lo < hi:
            return min(8 * lo, cap)
        guess = _local_model(measured, target).max_micro_batch(target - (BLOCK if allocator else 0))
    elif len(measured) == 1:
        t = measured[0]
        if t.peak_bytes > target and hint is not None and hint.per_sample_bytes > 0:
            # Over the limit at an earlier answer: the earlier slope through this point says how far down.
            line = MemoryModel(t.peak_bytes - hint.per_sample_bytes * t.micro_batch, hint.per_sample_bytes)
            guess = max(1, min(line.max_micro_batch(target), t.micro_batch - 1))
        else:
            guess = _safe_extrapolation(t, target)
    else:
        guess = None
    if guess is not None and guess >= hi:
        # Beyond the cap: try the cap. Beyond a size that failed: the model is wrong up there.
        guess = cap if hi > cap else None
    if len(trials) >= 2 and not trials[-1].fits and not trials[-2].fits:
        guess = None  # two failures in a row: the model keeps overshooting, so halve the bracket instead
    if guess is not None and guess <= lo and len(measured) == 1 and hi > 2 * lo:
        # One trial that fits, whose "every added byte per sample" bound cannot move past it (the
        # gradients it allocated are a fixed cost the bound charges to its few samples): that bound
        # is a floor, not the answer. Double: a second measured point nearby gives the real slope.
        guess = 2 * lo
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


def _local_model(measured: list[Trial], target: float) -> MemoryModel:
    """Secant through the two measured trials (:func:`_measured`) that best describe the curve near
    the limit (:func:`_secant_points`), with the optimizer step's peak as a floor."""
    under = [t for t in measured if t.peak_bytes <= target]
    a, b = _secant_points(measured, target)
    # The optimizer step's peak is a floor for every size only where it was measured under the
    # target: on CUDA it is read off reserved memory, which still holds the forward/backward's
    # blocks, so an over-the-limit trial's step "peak" grows with its size and would floor every n.
    step = max((t.step_bytes or 0) for t in under) if under else 0
    return MemoryModel.through((a.micro_batch, _bytes(a)), (b.micro_batch, _bytes(b)), step)


def _secant_points(measured: list[Trial], target: float) -> tuple[Trial, Trial]:
    """The two measured trials that best describe the curve near the limit: the largest one under
    the target and the smallest one over it (interpolation), else the two largest under it
    (extrapolation), else the two smallest over it."""
    under = [t for t in measured if t.peak_bytes <= target]
    over = [t for t in measured if t.peak_bytes > target]
    if under and over:
        return under[-1], over[0]
    if len(under) >= 2:
        return under[-2], under[-1]
    return over[0], over[1]


def _bytes(t: Trial) -> float:
    """What the secant goes through: the forward/backward peak (the part that grows with the size)."""
    return t.forward_backward_bytes or t.peak_bytes


def fit_model(trials: list[Trial], target: float) -> MemoryModel | None:
    """The model reported in results: the local secant, or a flat line through a single trial."""
    measured = _measured(trials)
    if len(measured) >= 2:
        return _local_model(measured, target)
    if len(measured) == 1:
        t = measured[0]
        return MemoryModel(fixed_bytes=float(_bytes(t)), per_sample_bytes=0.0,
                           step_bytes=float(t.step_bytes or 0))
    return None

