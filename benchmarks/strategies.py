"""The batch-size searches autoaccum is measured against, re-implemented from their documented behaviour.

Each takes ``fits(n) -> bool`` (one real trial) and returns ``(largest size found, sizes tried)``.
"""
from __future__ import annotations

from collections.abc import Callable


def doubling_then_bisect(fits: Callable[[int], bool], start: int = 2, max_trials: int = 25,
                         cap: int = 1 << 16) -> tuple[int, list[int]]:
    """Lightning's BatchSizeFinder, mode='binsearch': double until a failure, then bisect."""
    tried: list[int] = []
    lo, hi, n = 0, None, start
    while len(tried) < max_trials:
        tried.append(n)
        if fits(n):
            lo = n
            if hi is None:
                if n >= cap:
                    break
                n = min(2 * n, cap)
                continue
        else:
            hi = n
        if hi is not None:
            if hi - lo <= 1:
                break
            n = (lo + hi) // 2
    return lo, tried


def backoff(fits: Callable[[int], bool], start: int = 128, factor: float = 0.9) -> tuple[int, list[int]]:
    """Accelerate's find_executable_batch_size: start high, multiply by 0.9 after every OOM."""
    tried: list[int] = []
    n = start
    while n >= 1:
        tried.append(n)
        if fits(n):
            return n, tried
        n = int(n * factor)
    return 0, tried


def exact_bisect(fits: Callable[[int], bool], cap: int = 1 << 16) -> tuple[int, list[int]]:
    """The reference: the exact largest size that fits (memory grows with size), by full bisection."""
    tried: list[int] = []
    lo, hi = 0, cap + 1
    n = 1
    while n <= cap:  # gallop to bracket, then bisect to one sample
        tried.append(n)
        if not fits(n):
            hi = n
            break
        lo, n = n, n * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        tried.append(mid)
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo, tried
