"""Sizing for the training loops people already run: Hugging Face's Trainer and Lightning.

Each module imports its framework when used (``pip install "autoaccum[hf]"`` or
``"autoaccum[lightning]"``). Both frameworks split a step into equal micro-batches only, so the
micro-batch is the largest one that fits *and* divides the per-rank batch; what that gives up
against the probe's answer is said.
"""
from __future__ import annotations


def largest_divisor_at_most(n: int, limit: int) -> int:
    """The largest d <= limit with n % d == 0 (1 always qualifies)."""
    for d in range(min(n, limit), 0, -1):
        if n % d == 0:
            return d
    return 1
