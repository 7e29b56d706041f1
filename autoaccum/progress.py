"""Progress for Trainer.train: loss, micro-batch, accumulation steps, samples/s.

On a terminal, a ``tqdm`` bar with those on it (tqdm is what users expect and it handles
resizing, rates and notebooks); in a log file (not a TTY), a plain line every ``every`` seconds
and at the end, so CI logs stay short.

A step's loss may still be on the device when it returns (:mod:`autoaccum.outcome`); reading it
would make the host wait every step, so the bar shows the latest loss already on the host (the
previous step's, by then) and counts a skipped step once its outcome is known.
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
        self._shown = None       # the latest stats whose loss is on the host
        self._unknown = []       # stats whose outcome was not known yet when they came
        self.started = time.perf_counter()
        self._last_print = -float("inf")
        self._bar = None
        if enabled and self.tty:
            from tqdm.auto import tqdm
            self._bar = tqdm(total=total, file=self.stream, unit="step", dynamic_ncols=True, leave=True)

    def update(self, stats, plan) -> None:
        self.count += 1
        self.samples += stats.samples
        self._unknown.append(stats)
        last = self.count == self.total
        # the first and the last step's outcome are read (waiting for them): there is nothing older to show
        self._count_known(wait=self._shown is None or last)
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.started
        rate = self.samples / elapsed if elapsed > 0 else 0.0
        largest = max(stats.micro_batches, default=0)
        shown = self._shown
        fields = {"loss": f"{shown.loss:.4f}", "micro-batch": f"{largest} x {len(stats.micro_batches)}",
                  "samples/s": f"{rate:,.0f}"}
        if self.skipped:
            fields["skipped"] = str(self.skipped)
        if self._bar is not None:
            self._bar.set_postfix(fields, refresh=False)
            self._bar.update(1)
            return
        now = time.perf_counter()
        if now - self._last_print >= self.every or last:
            self._last_print = now
            done = f"{self.count}/{self.total}" if self.total else f"{self.count}"
            print(f"step {done}  " + "  ".join(f"{k} {v}" for k, v in fields.items()), file=self.stream, flush=True)

    def _count_known(self, wait: bool = False) -> None:
        while self._unknown and (wait or getattr(self._unknown[0], "settled", True)):
            stats = self._unknown.pop(0)
            self.skipped += int(stats.skipped)
            self._shown = stats

    def close(self) -> None:
        self._count_known(wait=True)
        if self._bar is not None:
            self._bar.close()
            self._bar = None
