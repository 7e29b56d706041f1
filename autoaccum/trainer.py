"""One optimizer step of the target batch, run as micro-batches, equal to the full-batch step.

The order of events in :meth:`Trainer.step` is the whole story:

1. split the batch into micro-batches and count each one's items (``count_fn``) - before any
   state changes, so bad input raises with nothing touched;
2. for each micro-batch: forward (under autocast), then backward, with the micro-batch weighted
   by ``items_i / items``, so the accumulated gradient is the gradient of the item-weighted mean
   over the whole batch (the weight multiplies the loss, or - with the gradient buffer - the
   fused accumulate kernel applies it while folding the gradient into fp32);
3. finalize: one read pass for the norm and inf/nan, one write pass to unscale and clip (or
   neither, folded into a fused optimizer); then step the optimizer and the scheduler - or skip
   both if anything was non-finite.

The usual tutorial loop divides each micro-batch loss by ``accum_steps``, which is right only
when every micro-batch holds the same number of items. Here micro-batch ``i`` is weighted by
``items_i / items_total`` with the total counted before the first backward, so uneven splits
and token-mean losses over padded sequences give the full-batch update.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import batch as batching
from . import kernels
from .batchnorm import RunningStats
from .buffer import GradBuffer
from .loss import LossFn, compute_loss
from .plan import Plan, balanced_split
from .progress import Progress
from .scaler import LossScaler
from .update import Updater

CountFn = Callable[[Any], Any]


@dataclass
class StepStats:
    """What one :meth:`Trainer.step` did."""

    loss: float                 # item-weighted mean loss over the whole batch
    grad_norm: float | None     # total norm before clipping (only when max_grad_norm is set)
    skipped: bool               # True when the update was skipped (non-finite loss or gradients)
    micro_batches: list[int]    # sizes actually run
    items: int | float          # items counted over the batch (samples unless count_fn is given)
    samples: int = 0            # samples in the batch
    lr: float | None = None     # learning rate of the first param group for this update
    seconds: float = 0.0        # wall time of the step, host-side
    events: list[str] = field(default_factory=list)   # notable things that happened, for logs


class Trainer:
    """Runs optimizer steps of ``plan.target_batch`` samples in micro-batches.

    Build it with :func:`autoaccum.fit`, which validates the arguments and finds the plan.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, plan: Plan, *,
                 loss_fn: LossFn | None, scheduler, max_grad_norm: float | None,
                 amp_dtype: torch.dtype | None, count_fn: CountFn | None,
                 batchnorm: str | None, device: torch.device, probe_result=None,
                 accum_dtype: torch.dtype | None = None, master_weights: bool = False,
                 backend: str | None = None):
        self.model = model
        self.optimizer = optimizer
        self.plan = plan
        self.loss_fn = loss_fn
        self.scheduler = scheduler
        self.max_grad_norm = max_grad_norm
        self.amp_dtype = amp_dtype
        self.count_fn = count_fn
        self.device = device
        self.probe_result = probe_result
        self.backend = backend
        self.scaler = LossScaler(device) if amp_dtype == torch.float16 else None
        self.steps = 0          # optimizer updates applied
        self.skipped_steps = 0  # steps skipped for non-finite values
        self._running_stats = RunningStats(model, batchnorm)
        self._params = _unique(p for p in model.parameters() if p.requires_grad)
        self.buffer = GradBuffer(self._params, accum_dtype, backend=backend) if accum_dtype is not None else None
        self.updater = Updater(master_weights)

    # ------------------------------------------------------------------ one optimizer step
    def step(self, batch: Any) -> StepStats:
        """Run one optimizer step over ``batch`` (all its samples), split on dim 0.

        ``batch`` may be shorter than the per-rank batch (the last one of an epoch): it is split
        with the same micro-batch limit and weighted by its own item count, as a full-batch step
        on it would be. Parameters, optimizer and scheduler change only if the step succeeds.
        """
        started = time.perf_counter()
        parts, sizes, counts = self._prepare(batch)
        total = sum(counts)
        weights = [c / total for c in counts]

        self._zero_grad()
        self._running_stats.begin(len(parts))
        try:
            loss_sum = self._accumulate(parts, weights)
        except BaseException:
            self._discard_accumulation()
            raise
        self._running_stats.end()

        stats = self._update(loss_sum)
        stats.micro_batches = [s for s, c in zip(sizes, counts) if c > 0]
        stats.items = _as_number(total)
        stats.samples = sum(sizes)
        stats.seconds = time.perf_counter() - started
        if any(c == 0 for c in counts):
            stats.events.append(f"skipped {counts.count(0)} micro-batch(es) with no items")
        return stats

    def _prepare(self, batch: Any) -> tuple[list[Any], list[int], list[float]]:
        """Split and count; raises on bad input before anything is touched."""
        n = batching.batch_size(batch)
        if n > self.plan.per_rank_batch:
            raise ValueError(
                f"batch has {n} samples but this rank's share of target_batch={self.plan.target_batch} "
                f"is {self.plan.per_rank_batch}; give step() one optimizer step of samples "
                f"(e.g. DataLoader(batch_size={self.plan.per_rank_batch}))")
        sizes = self.plan.micro_batches if n == self.plan.per_rank_batch else balanced_split(n, self.plan.micro_batch)
        parts = batching.split(batch, sizes)
        counts = self._count(parts)
        return parts, sizes, counts

    def _count(self, parts: list[Any]) -> list[float]:
        if self.count_fn is None:
            return [float(batching.batch_size(p)) for p in parts]
        counts = []
        for i, p in enumerate(parts):
            value = _to_number(self.count_fn(p), f"count_fn(micro_batch {i})")
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"count_fn returned {value} for micro-batch {i}; it must return the "
                                 f"number of items (e.g. non-padding tokens) in the micro-batch, >= 0")
            counts.append(value)
        if sum(counts) <= 0:
            raise ValueError(f"count_fn returned 0 items for every micro-batch ({counts}); the loss "
                             f"mean over the batch is undefined. count_fn must count the items the "
                             f"loss averages over (e.g. tokens whose label is not ignored)")
        return counts

    def _accumulate(self, parts: list[Any], weights: list[float]) -> torch.Tensor:
        """Forward and backward every micro-batch; returns the weighted loss sum (on device)."""
        if self.buffer is not None:
            self.buffer.begin_step()
        loss_sum = None
        for i, (part, w) in enumerate(zip(parts, weights)):
            if w == 0:
                continue  # no items: its mean loss is undefined and its share of the update is zero
            loss = compute_loss(self.model, batching.to_device(part, self.device), self.loss_fn, self.device,
                                self.amp_dtype, i)
            if self.buffer is not None:
                self.buffer.weight = w        # the accumulate kernel applies it, in fp32
                self._backward(loss)
            else:
                self._backward(loss * w)
            loss_sum = loss.detach() * w if loss_sum is None else loss_sum + loss.detach() * w
        return loss_sum

    def _backward(self, loss: torch.Tensor) -> None:
        (loss * self.scaler.scale if self.scaler is not None else loss).backward()

    def _update(self, loss_sum: torch.Tensor) -> StepStats:
        """Finalize (norm, inf/nan, unscale, clip), then step - or skip; then free the gradients."""
        pairs = self._gradients()
        grads = [g for _, g in pairs]
        inv_scale = self.scaler.inv_scale() if self.scaler is not None else 1.0
        fold = self._can_fold(grads, inv_scale)
        norm, found_inf = kernels.finalize_(grads, inv_scale, self.max_grad_norm, apply=not fold,
                                            backend=self.backend)
        loss = float(loss_sum)           # the one host sync of the step
        norm_value = float(norm)
        skipped = bool(found_inf) or not math.isfinite(loss)
        lr = self.optimizer.param_groups[0].get("lr") if self.optimizer.param_groups else None
        if not skipped:
            grad_scale = kernels.clip_scale(norm, inv_scale, self.max_grad_norm).reciprocal().float() if fold else None
            self.updater.step(self.optimizer, pairs, grad_scale, found_inf)
            self.steps += 1
            if self.scheduler is not None:
                self.scheduler.step()
        else:
            self.skipped_steps += 1
        if self.scaler is not None:
            self.scaler.update(found_inf)  # lowers the scale after inf/nan, grows it after clean runs
        self._zero_grad()
        events = ([f"skipped the update: {'loss' if not math.isfinite(loss) else 'gradient norm'} "
                   f"is not finite"] if skipped else [])
        return StepStats(loss=loss, grad_norm=norm_value if self.max_grad_norm is not None else None,
                         skipped=skipped, micro_batches=[], items=0, lr=lr, events=events)

    def _gradients(self) -> list[tuple[nn.Parameter, torch.Tensor]]:
        """(parameter, its accumulated gradient): buffer views, or what autograd left in ``.grad``."""
        if self.buffer is not None:
            return self.buffer.written()
        return [(p, p.grad) for p in self._params if p.grad is not None]

    def _can_fold(self, grads: list[torch.Tensor], inv_scale) -> bool:
        """Leave the unscale/clip factor to a fused optimizer (it takes ``grad_scale``) when one is needed.

        Fused optimizers take the factor as float32, so float64 gradients keep the exact write pass.
        """
        needed = self.max_grad_norm is not None or not (isinstance(inv_scale, float) and inv_scale == 1.0)
        return bool(needed and grads and getattr(self.optimizer, "_step_supports_amp_scaling", False)
                    and all(g.dtype != torch.float64 for g in grads))

    def _discard_accumulation(self) -> None:
        """After a failed micro-batch: no partial gradient survives, running stats go back."""
        self._zero_grad()
        if self.buffer is not None:
            self.buffer.discard_step()
        self._running_stats.abort()

    def _zero_grad(self) -> None:
        for p in self._params:
            p.grad = None
        self.optimizer.zero_grad(set_to_none=True)

    # ------------------------------------------------------------------ convenience loop
    def train(self, loader: Iterable, epochs: int = 1, *, max_steps: int | None = None,
              progress: bool = True) -> list[StepStats]:
        """Step through ``loader`` (each item: one optimizer step of samples) for ``epochs``.

        Shows a progress bar (loss, micro-batch, accumulation steps, samples/s) on stderr and
        returns every step's :class:`StepStats`.
        """
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise ValueError(f"epochs must be a positive int; got {epochs!r}")
        if max_steps is not None and (not isinstance(max_steps, int) or max_steps < 1):
            raise ValueError(f"max_steps must be a positive int or None; got {max_steps!r}")
        try:
            per_epoch = len(loader)  # type: ignore[arg-type]
        except TypeError:
            per_epoch = None
        total = per_epoch * epochs if per_epoch is not None else None
        if max_steps is not None:
            total = min(total, max_steps) if total is not None else max_steps
        history: list[StepStats] = []
        bar = Progress(total=total, enabled=progress)
        try:
            for _ in range(epochs):
                for batch in loader:
                    stats = self.step(batch)
                    history.append(stats)
                    bar.update(stats, self.plan)
                    if max_steps is not None and len(history) >= max_steps:
                        return history
        finally:
            bar.close()
        return history

    def __repr__(self) -> str:
        buf = f", accum_dtype={self.buffer.dtype}" if self.buffer is not None else ""
        return (f"Trainer({type(self.model).__name__}, {self.plan}, amp={self.amp_dtype}, "
                f"device={self.device}{buf})")


def _to_number(value: Any, what: str) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{what} returned a tensor of shape {tuple(value.shape)}; it must return "
                             f"one number: the items in the micro-batch")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise TypeError(f"{what} returned {type(value).__name__}; it must return the number of items "
                            f"(an int or a one-element tensor)") from None
    return float(value)


def _as_number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else x


def _unique(params: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    seen, out = set(), []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out
