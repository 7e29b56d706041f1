"""A dependency-free progress line for Trainer.train: loss, micro-batch, accumulation, samples/s.

On a terminal it redraws one line; in a log file (not a TTY) it prints a line every
``every`` seconds so CI logs stay short.
"""
from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int | None, *, enabled: bool = True, stream=None, every: float = 10.0):
        self.total = total
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.every = every
        self.count = 0
        self.samples = 0
        self.skipped = 0
        self.started = time.perf_counter()
        self._last_print = -float("inf")
        self._line = ""

    def update(self, stats, plan) -> None:
        self.count += 1
        self.samples += stats.samples
        self.skipped += int(stats.skipped)
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.started
        rate = self.samples / elapsed if elapsed > 0 else 0.0
        done = f"{self.count}/{self.total}" if self.total else f"{self.count}"
        bar = ""
        if self.total and self.tty:
            filled = int(20 * self.count / self.total)
            bar = "[" + "#" * filled + "." * (20 - filled) + "] "
        skipped = f" skipped {self.skipped}" if self.skipped else ""
        largest = max(stats.micro_batches, default=0)
        self._line = (f"{bar}step {done}  loss {stats.loss:.4f}  micro-batch {largest} "
                      f"x {len(stats.micro_batches)}  {rate:,.0f} samples/s{skipped}")
        now = time.perf_counter()
        if self.tty:
            self.stream.write("\r\x1b[2K" + self._line)
            self.stream.flush()
        elif now - self._last_print >= self.every or self.count == self.total:
            self._last_print = now
            print(self._line, file=self.stream, flush=True)

    def close(self) -> None:
        if self.enabled and self.tty and self._line:
            self.stream.write("\n")
            self.stream.flush()
