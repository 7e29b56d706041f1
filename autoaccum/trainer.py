"""One optimizer step of the target batch, run as micro-batches, equal to the full-batch step.

The order of events in :meth:`Trainer.step` is the whole story:

1. split the batch into micro-batches and count each one's items (``count_fn``) - before any
   state changes, so bad input raises with nothing touched; under data parallelism the counts
   are summed over ranks, so every weight is a share of the *global* batch;
2. for each micro-batch: forward (under autocast), then backward, with the micro-batch weighted
   by ``items_i / items``, so the accumulated gradient is the gradient of the item-weighted mean
   over the whole batch (the weight multiplies the loss, or - with the gradient buffer - the
   fused accumulate kernel applies it while folding the gradient into fp32);
3. if a micro-batch ran out of memory (on any rank): throw the partial accumulation away, lower
   the micro-batch, restore the random streams and run the same batch again;
4. synchronise gradients over ranks (DDP, deferred), then finalize: one read pass for the norm
   and inf/nan, one write pass to unscale and clip (or neither, folded into a fused optimizer);
   then step the optimizer and the scheduler - or skip both if anything was non-finite.

The usual tutorial loop divides each micro-batch loss by ``accum_steps``, which is right only
when every micro-batch holds the same number of items. Here micro-batch ``i`` is weighted by
``items_i / items_total`` with the total counted before the first backward, so uneven splits
and token-mean losses over padded sequences give the full-batch update.
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import batch as batching
from . import checkpoint, count
from . import rng as random_streams
from .batchnorm import RunningStats
from .buffer import GradBuffer
from .distributed import Agreement, PeerFailure, PeerStopped, PreForward, Topology
from .checks import check_bool, check_count, check_int
from .loss import LossFn, WeightedLoss, autocast, autocast_or_none, call_loss, checked, compute_loss
from .memory import NotEnoughMemoryError, release_memory
from .outcome import (PENDING_BY_OPTIMIZER, DeviceOutcome, PendingStep, StateWatch, StepStats, has_step_hooks,
                      skip_message, skips_on_device)
from .plan import Plan
from .plan import plan as make_plan
from .progress import Progress
from .recovery import Failure, Regrow, classify, not_enough_memory_message, smaller_micro_batch
from .scaler import LossScaler
from .trainable import Trainable
from .update import OptimizerWrites, Updater, finalize

CountFn = Callable[[Any], Any]
log = logging.getLogger("autoaccum")


@dataclass
class _Attempt:
    loss_sum: WeightedLoss | None
    failure: Failure | None
    agreement: Agreement


class _Counter:
    """A counter of the trainer (``steps``, ``skipped_steps``) that completes a step still pending
    on the device before it is read or set; the value lives in ``_<name>``."""

    def __init__(self, doc: str):
        self.__doc__ = doc

    def __set_name__(self, owner, name: str) -> None:
        self.attr = "_" + name

    def __get__(self, trainer, owner=None):
        if trainer is None:
            return self
        trainer._settle()
        return getattr(trainer, self.attr)

    def __set__(self, trainer, value: int) -> None:
        trainer._settle()
        setattr(trainer, self.attr, value)


class Trainer:
    """Runs optimizer steps of ``plan.target_batch`` samples in micro-batches.

    Build it with :func:`autoaccum.fit`, which validates the arguments and finds the plan.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, plan: Plan | None, *,
                 loss_fn: LossFn | None, scheduler, max_grad_norm: float | None,
                 amp_dtype: torch.dtype | None, count_fn: CountFn | None,
                 batchnorm: str | None, device: torch.device, probe_result=None,
                 accum_dtype: torch.dtype | None = None, master_weights: bool = False,
                 backend: str | None = None, topology: Topology | None = None,
                 oom_retry: bool = True, regrow_after: int | None = None,
                 sizer: Callable[[Any], tuple[Plan, Any]] | None = None, default_optimizer: bool = False):
        if plan is None and sizer is None:
            raise ValueError("a Trainer needs a plan, or a sizer that makes one from the first batch")
        self.model = model
        self.optimizer = optimizer
        self.default_optimizer = default_optimizer   # fit built it: AdamW with torch's defaults
        self.plan = plan                              # None until the first batch is sized (lazy probing)
        self._sizer = sizer
        self.loss_fn = loss_fn
        self.scheduler = scheduler
        self.max_grad_norm = max_grad_norm
        self.amp_dtype = amp_dtype
        self.count_fn = count_fn
        self._count_pending = count_fn is None      # decided on the first batch (autoaccum.count)
        self.device = device
        self.probe_result = probe_result
        self.backend = backend
        self.topology = topology or Topology(model)
        self.oom_retry = oom_retry
        self.max_micro_batch = plan.micro_batch if plan else 0   # the first plan's; regrowth never exceeds it
        self.scaler = LossScaler(device) if amp_dtype == torch.float16 else None
        self._steps = 0          # optimizer updates applied (``steps``)
        self._skipped_steps = 0  # steps skipped for non-finite values (``skipped_steps``)
        self._pending: PendingStep | None = None   # the last step's outcome, still on the device
        # torch's fused optimizers skip on the device (found_inf), so the host need not know before
        # stepping them (autoaccum.outcome).
        self._defer = device.type == "cuda" and not self.topology.shards_gradients
        self._state_watch = StateWatch()
        self.oom_retries = 0    # attempts discarded after an out-of-memory error, over the whole run
        self._regrow = Regrow(regrow_after)
        self._running_stats = RunningStats(model, batchnorm)
        self._trainable = Trainable(model, optimizer)
        self._params = self._trainable.params
        self._accum_dtype = accum_dtype
        self.buffer = None     # with a pending plan, built after sizing (the probe holds a buffer of its own)
        if accum_dtype is not None and plan is not None:
            self.buffer = GradBuffer(self._params, accum_dtype, backend=backend)
        self.updater = Updater(master_weights)
        self._lockstep = PreForward(model, (lambda: self._agree(None, final=False)) if self.topology.lockstep else None)
        self.closed = False
        self._committed = False   # within step(): the optimizer has written, so the step must complete
        self._zero_grad_kwargs = _zero_grad_kwargs(optimizer)

    steps = _Counter("Optimizer updates applied.")
    skipped_steps = _Counter("Steps whose update was skipped for a non-finite loss or gradient.")

    def __del__(self):
        # A trainer dropped with a step pending still completes it: the scheduler may outlive it
        # (a new fit with the same optimizer and scheduler).
        try:
            self._settle()
        except Exception:  # noqa: BLE001 - nothing can be reported from a finalizer
            pass

    def _settle(self) -> None:
        """Complete the last step if its outcome is still on the device (see :mod:`autoaccum.outcome`),
        and another trainer's over the same optimizer (a second phase built with fit while the first
        trainer is still referenced)."""
        pending = self._pending
        if pending is not None:
            pending.settle(self)
        other = PENDING_BY_OPTIMIZER.get(self.optimizer)
        if other is not None:
            other.settle()

    # ------------------------------------------------------------------ one optimizer step
    def step(self, batch: Any) -> StepStats:
        """Run one optimizer step over ``batch`` (all its samples), split on dim 0.

        ``batch`` may be shorter than the per-rank batch (the last one of an epoch): it is split
        with the same micro-batch limit and weighted by its own item count, as a full-batch step
        on it would be. Parameters, optimizer, scheduler, loss scale and the random streams change
        only through a successful pass over the whole batch.
        """
        if self.closed:
            raise RuntimeError("this Trainer was closed (its gradient buffer is gone); make a new one with autoaccum.fit")
        started = time.perf_counter()
        if self.plan is None:
            self._size(batch)
        events: list[str] = []
        plan = self.plan
        try:
            self._maybe_regrow(events)
            n, parts, counts, total = self._prepare(batch)
            self._refresh_params()
        except BaseException:
            self.plan = plan                            # a rejected batch leaves the plan as it found it
            raise
        streams = random_streams.capture()
        regrow = self._regrow.state_dict()
        on_device = batching.on_device(batch, self.device)   # then no micro-batch needs moving
        retries = 0
        self._committed = False                         # set once the optimizer has written
        try:
            self.topology.sync_module_buffers()         # DDP's buffer broadcast, at a point every rank reaches
            while True:
                attempt = self._attempt(parts, counts, total, on_device)
                if attempt.failure is None and not attempt.agreement.failed:
                    break
                retries += 1
                self._recover(attempt, events)          # raises unless this was a recoverable OOM
                random_streams.restore(streams)         # the retry sees the stream a first attempt would
                _, parts, counts, _ = self._prepare(batch)   # the new split's counts; the total is the same
            self._running_stats.end()
            if self.topology.syncs_buffer:
                self.topology.sync_buffer(self.buffer, self._params, attempt.agreement.touched)
            elif self.topology.distributed:
                self.topology.average_unmanaged(self._params)
            stats = self._update(attempt.loss_sum)
        except BaseException:
            if not self._committed:                     # all or nothing: nothing of this step survives
                self._discard_accumulation()
                random_streams.restore(streams)
                self.plan = plan
                self._regrow.load_state_dict(regrow)
            raise
        sizes = self._sizes(n)
        stats.micro_batches = [s for s, c in zip(sizes, counts) if c > 0]
        stats.items = _as_number(total)
        stats.samples = n
        stats.seconds = time.perf_counter() - started
        stats.oom_retries = retries
        stats.micro_batch_limit = self.plan.micro_batch
        pending = stats.__dict__.get("_pending")     # events held back with the outcome: no wait
        listed = pending.events if pending is not None else stats.events
        listed[:0] = events
        if pending is not None:
            pending.skip_at = len(listed)             # its skip message goes where the eager path puts it
        if any(c == 0 for c in counts):
            listed.append(f"skipped {counts.count(0)} micro-batch(es) with no items")
        return stats

    def _size(self, batch: Any) -> None:
        """Lazy sizing: the first batch given to :meth:`step` is the probe's sample."""
        self._adopt(*self._sizer(batch))
        log.info("autoaccum: probed the first batch: %s", self.plan)

    def _adopt(self, plan: Plan, probe_result=None) -> None:
        """The first plan, made after fit (probed on the first batch, or set by hand): nothing left to size."""
        self.plan, self.probe_result, self.max_micro_batch, self._sizer = plan, probe_result, plan.micro_batch, None

    def _refresh_params(self) -> None:
        """Follow parameters frozen or unfrozen since the last step (gradual unfreezing): the
        gradient buffer is rebuilt for the new set (its contents only live within a step)."""
        params = self._trainable.current()   # the same list object while nothing changed
        if params is self._params and (self._accum_dtype is None or self.buffer is not None):
            return
        if self._accum_dtype is not None:
            if self.buffer is not None:
                self.buffer.remove()
                self.buffer = None          # the old buffer's memory goes before the new one is allocated
            self.buffer = GradBuffer(params, self._accum_dtype, backend=self.backend)   # may raise: retried next step
        self._params = params
        log.info("autoaccum: the trainable parameters changed; now %d tensors", len(params))

    def rescan(self) -> None:
        """Look at the model's parameters again before the next step. Changes torch announces
        (assigning a parameter or module, ``requires_grad_``, ``add_param_group``) are seen by
        themselves; this is for those it does not: ``ModuleList.insert`` / ``Sequential.insert``
        of a module built earlier, writes straight into ``_parameters`` or ``_modules``."""
        self._trainable.rescan()

    def _sizes(self, n: int) -> list[int]:
        return self.plan.micro_batches if n == self.plan.per_rank_batch else self.plan.split(n)

    def _prepare(self, batch: Any) -> tuple[int, list[Any], list[float], float]:
        """Split, check and count this rank's batch under the current plan, then agree on the global
        total: ``(samples, micro-batches, their item counts, total items over all ranks)``.

        Every rank reaches the agreement even when its own batch is bad, so a rejected batch on
        one rank raises on all of them instead of leaving the others in a collective.
        """
        error: Exception | None = None
        n, parts, counts = 0, [], []
        try:
            n = batching.batch_size(batch)
            self.plan.check_batch(n)
            sizes = self._sizes(n)
            parts = batching.split(batch, sizes)
            if self._count_pending:        # no count_fn: decided on the first batch that can tell
                self.count_fn, settled = count.choose(self.model, self.loss_fn, parts, self.device,
                                                      checkable=not self.topology.shards_gradients)
                self._count_pending = not settled
            counts = self._count(parts, sizes)
            self._check_collective_shape(counts)
        except (ValueError, TypeError) as e:
            if not self.topology.distributed:
                raise
            error = e
        total, rejected, uniform = self.topology.agree_batch(sum(counts), error is not None, len(counts))
        if error is not None:
            raise error
        if rejected:
            raise PeerFailure("another rank rejected its batch (its error says why); this rank stops too")
        if not uniform and self.topology.communicates_in_model:
            raise ValueError(f"ranks split their batches into different numbers of micro-batches (here {len(counts)}); "
                             f"with {self.topology.wrapper} communicating inside the model every rank must run the same "
                             f"micro-batches: give every rank the same number of samples (DistributedSampler pads; "
                             f"or drop_last=True)")
        if not math.isfinite(total):
            raise ValueError(f"count_fn's counts add up to {total} items over the batch; they must sum to a finite "
                             f"number (count items, e.g. tokens, not their values)")
        if total <= 0:
            raise ValueError(f"count_fn returned 0 items for every micro-batch ({counts}); the loss mean over "
                             f"the batch is undefined. count_fn must count the items the loss averages over "
                             f"(e.g. tokens whose label is not ignored)")
        return n, parts, counts, total

    def _check_collective_shape(self, counts: list[float]) -> None:
        """Where the model itself communicates in forward/backward, no micro-batch may be skipped
        for having no items (it would skip those collectives on this rank only)."""
        if self.topology.communicates_in_model and any(c == 0 for c in counts):
            raise ValueError("a micro-batch has no items (count_fn returned 0): with collectives inside the "
                             "model's forward every micro-batch must run on every rank; balance the batch")

    def _count(self, parts: list[Any], sizes: list[int]) -> list[float]:
        if self.count_fn is None:
            return [float(s) for s in sizes]
        counts = []
        for i, p in enumerate(parts):
            counts.append(check_count(self.count_fn(p), f"count_fn(micro_batch {i})"))
        return counts

    def _attempt(self, parts: list[Any], counts: list[float], total: float, on_device: bool) -> _Attempt:
        """Forward and backward every micro-batch; stop at the first failure (here or, in lockstep,
        on another rank) and report it at an agreement point.

        Agreements are collectives of one shape, and every rank stops issuing them after the first
        that reports a failure, so ranks pair them up one to one whatever happened where. Without
        lockstep there is one, at the end. In lockstep (the model itself communicates inside
        forward/backward: DDP's overlapped all-reduce, SyncBatchNorm) there is also one right
        before each forward of the DDP module (a pre-hook) and one after each backward: a rank
        that fails before its forward (moving inputs, in ``loss_fn`` before the model) meets the
        others at that pre-forward point, not inside a collective of the model's.
        """
        topo = self.topology
        for p in self._params:      # gradients left by a backward outside the trainer must not add in
            p.grad = None
        if self.buffer is not None:
            self.buffer.begin_step()
        live = [i for i, c in enumerate(counts) if c > 0]
        self._running_stats.begin(len(live))
        loss_sum, failure, in_flight = WeightedLoss(self.device), None, False
        if not topo.distributed:
            with self.buffer.capturing() if self.buffer is not None else contextlib.nullcontext():
                failure = self._run_alone(parts, counts, total, live, on_device, loss_sum)
            return _Attempt(loss_sum, failure, self._agree(failure, final=True))
        context = autocast(self.device, self.amp_dtype)      # reusable: entered once per micro-batch
        factor = topo.loss_factor
        agree_each = topo.lockstep
        buffer = self.buffer.capturing() if self.buffer is not None else contextlib.nullcontext()
        with buffer, self._lockstep as lockstep:
            for i in live:
                last = i == live[-1]
                lockstep.forwards = 0
                part, failure = (parts[i], None) if on_device else self._inputs(parts[i], i)
                if failure is None:
                    share = counts[i] / total
                    loss, failure = self._forward_backward(part, i, last, share * factor, context)
                    if lockstep.stopped is not None:        # another rank failed: it met us before our forward
                        return _Attempt(loss_sum, failure, lockstep.stopped)
                    if loss is not None:
                        loss_sum.add(loss, share)
                    # A scalar loss can own a large storage (CPU mse_loss reduces in place in its
                    # elementwise buffer): it must not live into the next micro-batch.
                    del loss
                del part
                if failure is not None:
                    in_flight = topo.collective_in_flight(last, lockstep.forwards > 0)
                    break
                if agree_each and not (last and topo.sync == "overlap"):
                    agreement = self._agree(None, final=last)
                    if agreement.failed or last:
                        return _Attempt(loss_sum, None, agreement)
        return _Attempt(loss_sum, failure, self._agree(failure, final=True, in_flight=in_flight))

    def _run_alone(self, parts: list[Any], counts: list[float], total: float, live: list[int], on_device: bool,
                   loss_sum: WeightedLoss) -> Failure | None:
        """:meth:`_attempt`'s micro-batches in one process: what :meth:`_forward_backward` does for
        each, with nothing only ranks need (agreement points, the wrapper's sync context), without
        a call and two context managers per micro-batch around it (about 3 µs each on a CPU, which
        a small model notices). Returns the first failure, if any."""
        model, loss_fn = self.model, self.loss_fn
        context = autocast_or_none(self.device, self.amp_dtype)
        loss = part = None
        for i in live:
            share = counts[i] / total
            try:
                part = parts[i] if on_device else batching.to_device(parts[i], self.device)
                if context is None:
                    loss = call_loss(model, part, loss_fn)
                else:
                    with context:
                        loss = call_loss(model, part, loss_fn)
                loss = checked(loss, i, loss_fn is None)
                self._backward(loss, share)
            except Exception as e:  # noqa: BLE001 - classified: OOM is recovered, anything else re-raised
                loss = part = None                   # a half-run graph dies with them
                return classify(e, i, batching.batch_size(parts[i]))
            loss_sum.add(loss, share)
            # A scalar loss can own a large storage (CPU mse_loss reduces in place in its
            # elementwise buffer): it must not live into the next micro-batch.
            loss = part = None
        return None

    def _inputs(self, part: Any, index: int) -> tuple[Any, Failure | None]:
        """The micro-batch on the device (an OOM here is a failure like any other)."""
        try:
            return batching.to_device(part, self.device), None
        except Exception as e:  # noqa: BLE001 - classified: OOM is recovered, anything else re-raised
            return None, classify(e, index, batching.batch_size(part))

    def _forward_backward(self, part: Any, index: int, last: bool, weight: float,
                          context) -> tuple[torch.Tensor | None, Failure | None]:
        """One micro-batch, its loss weighted by ``weight`` (its share of the batch's items, times
        the topology's loss factor) under ``context`` (autocast): (its loss, failure)."""
        try:
            with self.topology.micro_batch(last):
                loss = compute_loss(self.model, part, self.loss_fn, self.device, self.amp_dtype, index,
                                    context=context)
                self._backward(loss, weight)
            return loss, None
        except PeerStopped:
            return None, None
        except Exception as e:  # noqa: BLE001 - classified: OOM is recovered, anything else re-raised
            failure = classify(e, index, batching.batch_size(part))
            del e, part     # with its frames gone, a half-run graph dies when this returns
            return None, failure

    def _backward(self, loss: torch.Tensor, weight: float) -> None:
        """Backward of ``weight * loss``; with the gradient buffer the accumulate kernel applies the
        weight instead (in fp32) and the loss goes as it is; fp16's loss scale multiplies either."""
        if self.buffer is not None:
            self.buffer.weight = weight
            weighted = loss
        else:
            weighted = loss * weight
        (weighted * self.scaler.scale if self.scaler is not None else weighted).backward()

    def _agree(self, failure: Failure | None, final: bool, in_flight: bool = False) -> Agreement:
        """The agreement point: every rank reports ok / out of memory / error and proposes a micro-batch."""
        topo = self.topology
        if failure is not None and in_flight:
            self._discard_accumulation()
            if not failure.oom:
                raise failure.error
            raise RuntimeError(f"out of memory in micro-batch {failure.index} ({failure.message}) while other ranks "
                               f"may be inside {topo.wrapper} collectives, so they cannot be brought back to a "
                               f"common point: " + ("use sync='deferred' (the default) to recover from this"
                                                    if topo.recovers_oom else "restart with a smaller micro_batch")
                               ) from failure.error
        if not topo.recovers_oom:
            return Agreement(0, self.plan.micro_batch)   # nothing to agree on: FSDP2 syncs itself
        code = 0 if failure is None else (1 if failure.oom and self.oom_retry else 2)
        proposal = self.plan.micro_batch
        if code == 1:
            proposal = smaller_micro_batch(failure, self.plan.micro_batch, self.probe_result, self.device,
                                           last_good=self._regrow.last_good)
        touched = None
        if topo.syncs_buffer:   # every agreement has this shape; only the final one of a clean attempt says much
            written = {id(p) for p, _ in self.buffer.written()} if final and failure is None else set()
            touched = torch.tensor([id(p) in written for p in self._params], dtype=torch.int64)
        return topo.agree(code, proposal, touched)

    def _recover(self, attempt: _Attempt, events: list[str]) -> None:
        """Throw the attempt away; re-raise a real error; after an OOM lower the micro-batch (or give up)."""
        failure, agreement = attempt.failure, attempt.agreement
        attempt.loss_sum = None
        self._discard_accumulation()
        release_memory(self.device)
        if failure is not None and (not failure.oom or not self.oom_retry):
            raise failure.error    # the error as raised (an OOM's traceback was dropped to free its tensors)
        if agreement.failed == 2:
            raise PeerFailure("another rank failed in this step (its error says why); this rank stops too")
        if agreement.proposal < 1:
            raise NotEnoughMemoryError(not_enough_memory_message(failure, self.topology.rank, self.device,
                                                                 self.probe_result))
        self._regrow.out_of_memory()
        self.oom_retries += 1
        old = self.plan.micro_batch
        self.set_micro_batch(agreement.proposal)
        here = (f"micro-batch {failure.index} ({failure.size} samples) on rank {self.topology.rank}: "
                f"{failure.message}" if failure is not None else "another rank")
        message = (f"out of memory in {here}; retrying the same batch with micro-batch {self.plan.micro_batch} "
                   f"(was {old}): {self.plan}")
        events.append(message)
        log.warning("autoaccum: %s", message)

    def _maybe_regrow(self, events: list[str]) -> None:
        grown = self._regrow.proposal(self.plan, self.max_micro_batch)
        if grown is not None:
            grown = self.topology.agree_min(grown)
            message = f"regrowing the micro-batch from {self.plan.micro_batch} to {grown} after clean steps"
            self.set_micro_batch(grown)
            events.append(message)
            log.info("autoaccum: %s", message)

    def set_micro_batch(self, micro_batch: int) -> Plan:
        """Re-plan with a new micro-batch limit; the effective batch (``target_batch``) is unchanged."""
        check_int("micro_batch", micro_batch, "the largest micro-batch to run")
        if self.plan is None:           # chosen by hand before the first batch: nothing left to probe
            self._adopt(make_plan(self._sizer.pending.target_batch, micro_batch, self._sizer.pending.world_size))
            return self.plan
        self.plan = make_plan(self.plan.target_batch, micro_batch, self.plan.world_size)
        return self.plan

    def _update(self, loss_sum: WeightedLoss) -> StepStats:
        """Finalize (norm, inf/nan, unscale, clip), then step - or skip; then free the gradients."""
        topo = self.topology
        pairs = self._gradients()
        inv_scale = self.scaler.inv_scale() if self.scaler is not None else 1.0
        loss_t = loss_sum.total()                      # float64; a float on the CPU
        if topo.distributed:
            loss_t = topo.sum_(torch.as_tensor(loss_t, dtype=torch.float64, device=self.device).reshape(1))
        norm, found_inf, grad_scale = finalize([g for _, g in pairs], inv_scale, self.max_grad_norm,
                                               self.optimizer, sharded=topo.shards_gradients, sum_=topo.sum_,
                                               backend=self.backend)
        late = None
        try:
            self._settle()             # the previous step's outcome, copied long ago: before this step's lr is read
        except BaseException as e:  # noqa: BLE001 - raised once this step stands, as eager raised it from
            late = e                # the step it belongs to, after that step stood
        try:
            stats = self._apply(pairs, loss_t, norm, found_inf, grad_scale)
        except BaseException as e:
            if late is not None:
                e.add_note(f"autoaccum: before this, completing the previous step raised {late!r}")
            raise
        if late is not None:
            late.add_note("autoaccum: raised while completing the previous step (its outcome read, its scheduler "
                          "stepped); this step's update stands")
            raise late
        return stats

    def _apply(self, pairs, loss_t, norm, found_inf, grad_scale) -> StepStats:
        """Step the optimizer - or skip; then free the gradients."""
        lr = self.optimizer.param_groups[0].get("lr") if self.optimizer.param_groups else None
        if isinstance(lr, torch.Tensor):   # schedulers write a Tensor lr in place: keep this step's value
            lr = lr.item() if lr.device.type == "cpu" else lr.detach().clone()
        if (self._defer and self._pending is None and skips_on_device(self.optimizer)
                and not has_step_hooks(self.optimizer)
                and self._state_watch.holds(self.optimizer, pairs, self._trainable.held)):
            return self._update_on_device(pairs, loss_t, norm, found_inf, grad_scale, lr)
        loss = float(loss_t)           # the host sync of the step
        norm_value = float(norm)
        skipped = bool(found_inf) or not math.isfinite(loss)
        if not skipped:
            self._optimizer_step(pairs, grad_scale, found_inf)
            self._committed = True                     # the update stands, whatever raises after it
        self._after_update(found_inf, stood=not skipped)
        return StepStats(loss=loss, grad_norm=norm_value if self.max_grad_norm is not None else None,
                         skipped=skipped, micro_batches=[], items=0, lr=lr,
                         events=[skip_message(loss)] if skipped else [])

    def _update_on_device(self, pairs, loss_t, norm, found_inf, grad_scale, lr) -> StepStats:
        """The update for an optimizer that skips on the device: stepped with the skip flag, the loss
        scale stepped and the gradients freed now; counting the step and stepping the scheduler, which
        the eager path does only for a step that stood, wait for the outcome (:meth:`PendingStep.settle`)."""
        loss64 = torch.as_tensor(loss_t, dtype=torch.float64, device=found_inf.device).reshape(())
        flag = ((found_inf > 0) | ~torch.isfinite(loss64)).float()
        stats = StepStats(loss=math.nan, grad_norm=None, skipped=False, micro_batches=[], items=0, lr=lr)
        pending = PendingStep(self, stats, DeviceOutcome(loss64, norm, flag))
        try:
            self._optimizer_step(pairs, grad_scale, found_inf, pending)
        except BaseException as e:
            # An error path may wait: read the outcome now. In a step that turns out skipped the
            # eager path would not have called the optimizer; the step ends as a skipped one (if it
            # wrote nothing, exactly as eager's), and the error goes on, as any optimizer fault does.
            skipped = pending.outcome.read()[2]
            if self._committed:       # it wrote (parameters moved, or its state did): completed but for this
                self._settle()
            elif skipped:             # it wrote nothing; its state was put back
                self._committed = True
                self._pending = pending
                self._after_update(found_inf, stood=None)
                self._settle()
            if skipped:
                e.add_note("autoaccum: the step's outcome was non-finite values, so it counts as a skipped "
                           "step (the optimizer was called only because it skips such a step on the device)")
            raise
        self._committed = True
        self._pending = PENDING_BY_OPTIMIZER[self.optimizer] = pending
        self._after_update(found_inf, stood=None)
        return stats

    def _optimizer_step(self, pairs, grad_scale, found_inf, pending: PendingStep | None = None) -> None:
        """``optimizer.step`` with a fault on either side of its first write handled (see README,
        "Reliability"): raised before it wrote anything, the optimizer's state is put back and the
        step fails whole (the caller rolls back the rest); raised after, the update stands, so the
        step is completed (counted, scheduler and loss scale stepped, gradients freed) before the
        error goes on, and counters, scheduler and parameters agree. With a ``pending`` outcome the
        optimizer gets its skip flag, and counting and the scheduler wait for the outcome."""
        writes = OptimizerWrites(self.optimizer)
        try:
            self.updater.step(self.optimizer, pairs, grad_scale, found_inf if pending is None else pending.outcome.flag)
        except BaseException as e:
            if not writes.wrote():
                writes.undo()
                raise
            self._committed = True
            if pending is not None:
                self._pending = pending
            self._after_update(found_inf, stood=True if pending is None else None)
            e.add_note("autoaccum: the optimizer had already written when this was raised, so the update "
                       "stands and the step was completed (counted, scheduler stepped, gradients freed)")
            raise

    def _after_update(self, found_inf: torch.Tensor, stood: bool | None) -> None:
        """Count the step (``stood``: applied or skipped; None: its outcome is still on the device,
        counted when it is read), step the loss scale, free the gradients."""
        try:
            if stood is not None:
                self._tally(stood)
            if self.scaler is not None:
                self.scaler.update(found_inf)  # lowers the scale after inf/nan, grows it after clean runs
        finally:
            self._zero_grad()

    def _tally(self, stood: bool) -> None:
        """An update applied (counted, the scheduler stepped) or skipped (counted as skipped)."""
        if stood:
            self._steps += 1
            if self.scheduler is not None:
                self.scheduler.step()
        else:
            self._skipped_steps += 1

    def _completed(self, pending: PendingStep, stood: bool) -> None:
        """``pending``, this trainer's step on the device, has been read: count it as the eager path would."""
        if self._pending is not pending:
            return
        try:
            self._tally(stood)
        finally:
            self._pending = None

    def _gradients(self) -> list[tuple[nn.Parameter, torch.Tensor]]:
        """(parameter, its accumulated gradient): buffer views, or what autograd left in ``.grad``."""
        if self.buffer is not None:
            return self.buffer.written()
        return [(p, p.grad) for p in self._params if p.grad is not None]

    def _discard_accumulation(self) -> None:
        """After a failed attempt: no partial gradient survives, running stats go back."""
        self._zero_grad()
        if self.buffer is not None:
            self.buffer.discard_step()
        self._running_stats.abort()

    def _zero_grad(self) -> None:
        """``optimizer.zero_grad(set_to_none=True)`` and the same for trained tensors it does not hold.
        torch.optim's own ``zero_grad`` is done here without its per-call wrappers (about 20 µs on
        a CPU); an optimizer with a ``zero_grad`` of its own (apex resets buckets there) gets it called."""
        for p in self._params:
            p.grad = None
        if self._zero_grad_kwargs is None:
            for p in self._trainable.frozen_held:
                p.grad = None
        else:
            self.optimizer.zero_grad(**self._zero_grad_kwargs)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self, *, rng: bool = True) -> dict:
        """Everything a resumed run needs besides the model's own state_dict, so that N steps, a save,
        a load into fresh objects and M more steps are bitwise the N + M steps of an uninterrupted run:
        the optimizer, scheduler, loss scale, fp32 master weights, step counters, the current plan
        (a micro-batch lowered after an out-of-memory stays lowered), the regrowth state and, unless
        ``rng=False``, the random streams autoaccum manages (torch CPU and CUDA, numpy, Python)."""
        check_bool("rng", rng, "save the random streams")
        self._settle()
        return {"optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "masters": self.updater.state_dict(self._params),
                "steps": self.steps, "skipped_steps": self.skipped_steps, "oom_retries": self.oom_retries,
                "plan": self.plan.to_dict() if self.plan is not None else None,
                "max_micro_batch": self.max_micro_batch, "regrow": self._regrow.state_dict(),
                "rng": random_streams.to_dict(random_streams.capture()) if rng else None}

    def load_state_dict(self, state: dict) -> None:
        """Resume from :meth:`state_dict`. Load the model's state_dict first: the masters are
        adopted as they were saved, and the optimizer's fp32 state for them is not rounded. Every
        check runs before anything is loaded: a checkpoint that does not fit changes nothing."""
        params = self._trainable.current()
        shape = self.plan if self.plan is not None else self._sizer.pending
        ckpt = checkpoint.check(state, params=params, scheduler=self.scheduler, scaler=self.scaler,
                                target_batch=shape.target_batch, world_size=shape.world_size)
        self._settle()             # a pending step must complete before the loaded state lands, not after
        masters = ckpt.masters if self.updater.master_weights else [None] * len(params)   # else: the
        with self.updater.masters_in_place(params, masters):     # parameters' own dtype for the state
            self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None:
            self.scaler.load_state_dict(state["scaler"])
        self._steps = state.get("steps", 0)
        self._skipped_steps = state.get("skipped_steps", 0)
        self.oom_retries = state.get("oom_retries", 0)
        if ckpt.plan is not None:
            if self.plan is None:
                self._adopt(ckpt.plan)              # sized when it was saved: nothing left to probe
            self.plan = ckpt.plan
            self.max_micro_batch = state.get("max_micro_batch") or ckpt.plan.micro_batch
        if state.get("regrow") is not None:
            self._regrow.load_state_dict(state["regrow"])
        if ckpt.streams is not None:
            random_streams.restore(ckpt.streams)

    def close(self) -> None:
        """Take the gradient buffer's hooks off the parameters and free the buffer. They are inert
        outside :meth:`step` and go when the trainer is garbage-collected; this makes it immediate."""
        self._settle()
        if self.buffer is not None:
            self.buffer.remove()
            self.buffer = None
        self._lockstep.remove()
        self.closed = True

    # ------------------------------------------------------------------ convenience loop
    def train(self, loader: Iterable, epochs: int = 1, *, max_steps: int | None = None,
              progress: bool = True) -> list[StepStats]:
        """Step through ``loader`` (each item: one optimizer step of samples) for ``epochs``.

        Shows a progress bar (loss, micro-batch, accumulation steps, samples/s) on stderr (on rank 0
        only when distributed) and returns every step's :class:`StepStats`.
        """
        if isinstance(loader, (str, bytes)) or not isinstance(loader, Iterable):
            raise TypeError(f"loader must be an iterable of batches (a DataLoader, a list of batches); "
                            f"got {type(loader).__name__}")
        check_int("epochs", epochs, "passes over loader")
        if max_steps is not None:
            check_int("max_steps", max_steps, "optimizer steps to run at most; or None")
        check_bool("progress", progress, "show a progress bar")
        try:
            per_epoch = len(loader)  # type: ignore[arg-type]
        except TypeError:
            per_epoch = None
        total = per_epoch * epochs if per_epoch is not None else None
        if max_steps is not None:
            total = min(total, max_steps) if total is not None else max_steps
        history: list[StepStats] = []
        bar = Progress(total=total, enabled=progress and self.topology.rank == 0)
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
        buf = f", accum_dtype={self._accum_dtype}" if self._accum_dtype is not None else ""
        par = f", {self.topology.wrapper} x{self.topology.world_size}" if self.topology.distributed else ""
        plan = self.plan if self.plan is not None else self._sizer
        return (f"Trainer({type(self.model).__name__}, {plan}, optimizer={_describe_optimizer(self)}, "
                f"amp={self.amp_dtype}, device={self.device}{buf}{par})")


def _describe_optimizer(trainer: Trainer) -> str:
    opt = trainer.optimizer
    group = opt.param_groups[0] if opt.param_groups else {}
    shown = ", ".join(f"{k}={group[k]}" for k in ("lr", "weight_decay", "fused") if group.get(k) is not None)
    return f"{type(opt).__name__}({shown}{', default' if trainer.default_optimizer else ''})"


def _zero_grad_kwargs(optimizer) -> dict | None:
    """How the trainer calls ``optimizer.zero_grad``: None when it is torch.optim's own (setting
    ``.grad = None`` is all it does, so the trainer does that itself), else its keyword arguments
    (``set_to_none=True`` where it takes them; some overrides take none)."""
    if (getattr(type(optimizer), "zero_grad", None) is torch.optim.Optimizer.zero_grad
            and "zero_grad" not in getattr(optimizer, "__dict__", {})):
        return None
    try:
        params = inspect.signature(optimizer.zero_grad).parameters
    except (TypeError, ValueError):
        return {}
    takes = "set_to_none" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    return {"set_to_none": True} if takes else {}


def _as_number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else x

