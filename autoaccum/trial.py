"""One real trial: run a micro-batch the way training does and measure its peak memory.

The meters read the CUDA caching allocator (reserved bytes: what must fit on the card) or, on
the CPU and on fake tensors, a dispatch-mode tracker seeded with the training state that exists
already. What a trial runs depends on which:

* a tracker counts live bytes, whose peak is the second micro-batch of an accumulation: one
  forward + backward with gradients already allocated, then the optimizer step;
* an allocator's reserved bytes also depend on where earlier blocks landed, so a trial replays
  the real step's order of events: no gradients at the start (the trainer frees them after every
  update), two micro-batches, then the optimizer step. On an H200 a one-micro-batch trial peaked
  about 130 MiB (the gradients' size) under the real two-micro-batch step: gradients allocated in
  the first backward split the cached activation blocks, and the second forward needs new ones.

Either way optimizer state exists after the first trial; the first one adds what its step created.
:class:`StateGuard` puts back everything the trials touch (parameters, buffers, gradients,
optimizer state, RNG streams), bitwise.
"""
from __future__ import annotations

import copy
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from . import batch as batching
from . import rng
from .buffer import GradBuffer
from .loss import LossFn, compute_loss
from .memory import drop_traceback, is_oom_error, oom_message, release_memory
from .search import Trial
from .tracker import LiveBytes
from .update import Updater


class CudaMeter:
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

    def exclude(self, batch: Any) -> None:
        """The host batch is not on the card; its device copy is what the allocator counts."""

    def peak(self) -> int:
        torch.cuda.synchronize(self.device)
        return torch.cuda.max_memory_reserved(self.device)


class TrackerMeter:
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

    def exclude(self, batch: Any) -> None:
        """The batch a trial slices from exists outside the step, as the batch given to
        ``Trainer.step`` does; only what the step makes of it is counted."""
        self.tracker.exclude(batching.leaves(batch))

    def peak(self) -> int:
        return self.tracker.peak


class TrialRunner:
    """Runs a micro-batch of ``n`` the way training does and measures its peak memory.

    With a gradient ``buffer`` (``accum_dtype``) the gradients fold into it through its hooks
    and reach the optimizer through ``updater`` (casts or fp32 masters), as in training.
    ``make_batch(n)`` builds the host batch, outside what is measured; ``move`` takes it to the
    device inside the measurement (default: :func:`autoaccum.batch.to_device`).
    """

    def __init__(self, model: nn.Module, optimizer, make_batch: Callable[[int], Any], loss_fn: LossFn | None,
                 amp_dtype: torch.dtype | None, device: torch.device, meter,
                 buffer: GradBuffer | None = None, updater: Updater | None = None,
                 move: Callable[[Any], Any] | None = None):
        self.model, self.optimizer, self.make_batch = model, optimizer, make_batch
        self.loss_fn, self.amp_dtype, self.device, self.meter = loss_fn, amp_dtype, device, meter
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.buffer, self.updater = buffer, updater or Updater()
        self.move = move or (lambda batch: batching.to_device(batch, device))
        self.replay = bool(getattr(meter, "allocator", False))   # see the module docstring

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
            self.buffer.begin_step()     # the buffer itself is allocated already, as between steps
        else:
            for p in self.params:
                if self.replay:
                    p.grad = None        # as at the start of a step
                elif p.grad is None:
                    p.grad = torch.zeros_like(p)   # mid-accumulation: gradients already exist
        host = self.make_batch(n)
        got = batching.batch_size(host)
        if got != n:
            raise ValueError(f"sample({n}) returned a batch of {got} samples; sample(n) must return n samples")
        self.meter.exclude(host)
        self.meter.clear()
        base = self.meter.current()
        for _ in range(2 if self.replay else 1):
            part = self.move(host)
            loss = compute_loss(self.model, part, self.loss_fn, self.device, self.amp_dtype)
            loss.backward()
            del loss, part
        del host
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
        self.params = [(p, host_copy(p)) for p in model.parameters()]
        self.buffers = [(b, host_copy(b)) for b in model.buffers()]
        self.grads = [(p, None if p.grad is None else host_copy(p.grad)) for p, _ in self.params]
        self.opt_state = None
        if optimizer is not None:
            self.opt_state = {p: {k: (host_copy(v), v.device) if isinstance(v, torch.Tensor) else copy.deepcopy(v)
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


def host_copy(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", copy=True)


def sample_factory(sample: Any) -> tuple[Callable[[int], Any], Any]:
    """``make_batch(n)`` from a batch (tiled/sliced) or a callable, plus a description of its shapes
    for the cache key (the probe adds a callable's code)."""
    if sample is None:
        raise ValueError("sample is required: one batch (any number of samples) or a callable sample(n)")
    if callable(sample) and not isinstance(sample, (torch.Tensor, dict, list, tuple)):
        streams = rng.capture()      # sample(1) may draw random numbers; the probe leaves them as they were
        try:
            one = batching.describe(sample(1), name="sample")
        finally:
            rng.restore(streams)
        return sample, {"callable": True, "one": one}
    batching.batch_size(sample, name="sample")  # validates leaves with clear errors
    return (lambda n: batching.tile(sample, n)), {"batch": batching.describe(sample, name="sample")}


def persistent_tensors(model: nn.Module, optimizer) -> list[torch.Tensor]:
    """What exists between steps: parameters, buffers, gradients, optimizer state."""
    out = list(model.parameters()) + list(model.buffers())
    out += [p.grad for p in model.parameters() if p.grad is not None]
    if optimizer is not None:
        out += [v for st in optimizer.state.values() for v in st.values() if isinstance(v, torch.Tensor)]
    return out

