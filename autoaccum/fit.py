"""``fit``: check every argument, find the plan, and hand back a Trainer.

Everything a user can get wrong is checked here, before anything is touched: ``fit`` leaves
the model's parameters and the optimizer's state exactly as they were.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from . import batch as batching
from .batchnorm import MODES as BATCHNORM_MODES
from .checks import (check_amp_dtype, check_bool, check_callable, check_choice, check_device, check_int,
                     check_master_weights, check_model, check_optimizer, check_positive_real, check_runnable,
                     parse_bytes)
from .distributed import SYNC_MODES, PeerFailure, Topology
from .plan import Plan
from .plan import plan as make_plan
from .probe import ProbeResult, probe
from .trainer import CountFn, LossFn, Trainer


def fit(model: nn.Module, target_batch: int, optimizer: torch.optim.Optimizer | None = None, *,
        loss_fn: LossFn | None = None, micro_batch: int | None = None, scheduler: Any = None,
        max_grad_norm: float | None = None, amp_dtype: torch.dtype | str | None = None,
        count_fn: CountFn | None = None, batchnorm: str | None = None,
        device: torch.device | str | None = None, sample: Any = None,
        memory_budget: int | str | None = None, probe_cache: bool = True,
        accum_dtype: torch.dtype | str | None = "auto", master_weights: bool = False,
        sync: str = "deferred", oom_retry: bool = True, regrow_after: int | None = None) -> Trainer:
    """Set up exact large-batch training of ``model`` with an effective batch of ``target_batch``.

    ``optimizer`` defaults to ``torch.optim.AdamW(model.parameters())`` with torch's defaults
    (``fused=True`` when every parameter is on CUDA).
    ``loss_fn(model, micro_batch)`` returns the MEAN loss over the micro-batch's items; without
    it the model's own output must carry the loss (``out.loss`` or ``out["loss"]``).
    ``count_fn(micro_batch)`` counts those items (default: samples), e.g. non-padding tokens.
    ``micro_batch`` is the largest micro-batch to run; ``None`` means find it with
    :func:`autoaccum.probe` on ``sample`` (the worst-case batch, or ``sample(n)``) under
    ``memory_budget``, with results cached unless ``probe_cache=False``; with no ``sample`` either,
    the first batch given to :meth:`Trainer.step` is probed. Under DDP every rank probes and all
    take the smallest result. ``amp_dtype`` is ``torch.float16`` (with dynamic loss
    scaling) or ``torch.bfloat16``.
    ``batchnorm`` is ``"micro"``, ``"freeze"`` or ``"step"`` (see :mod:`autoaccum.batchnorm`).
    ``device`` is where micro-batches are moved before the forward (default: the model's).
    ``accum_dtype`` is the dtype of the gradient buffer the fused kernels accumulate into
    (``"auto"``: float32 when a trainable parameter is bf16/fp16, else autograd's own ``.grad``;
    ``None``: never). With the buffer, bf16/fp16 parameters get their fp32 gradient cast for the
    update, or with ``master_weights=True`` the optimizer updates fp32 master copies.
    ``sync`` (DDP only): ``"deferred"`` all-reduces the gradient buffer once after the last
    micro-batch (OOM-safe on every rank), ``"overlap"`` lets DDP all-reduce during the last
    micro-batch's backward. ``oom_retry``: on out-of-memory, re-run the batch with a smaller
    micro-batch; ``regrow_after``: after that many clean steps, try a larger one again.
    """
    check_model(model)
    params = [p for p in model.parameters()]
    if not any(p.requires_grad for p in params):
        raise ValueError("model has no parameter that requires grad, so there is nothing to train")
    check_int("target_batch", target_batch, "the effective batch size of one optimizer step")
    if micro_batch is not None:
        check_int("micro_batch", micro_batch, "the largest micro-batch to run; None: probe it")
        for name, value in (("memory_budget", memory_budget), ("sample", sample)):
            if value is not None:
                raise ValueError(f"{name} is used to probe the micro-batch, but micro_batch={micro_batch} was given, "
                                 f"so nothing is probed; pass one or the other")
    default_optimizer = optimizer is None
    if optimizer is not None:
        _check_optimizer(optimizer, params)
    elif scheduler is not None:
        raise ValueError("scheduler needs the optimizer it was built for: pass that optimizer= too")
    _check_dense_gradients(model)
    _check_scheduler(scheduler, optimizer)
    check_callable("loss_fn", loss_fn, "loss_fn(model, micro_batch) -> scalar mean loss")
    check_callable("count_fn", count_fn, "count_fn(micro_batch) -> number of items")
    max_grad_norm = check_positive_real("max_grad_norm", max_grad_norm, "the clipping threshold", allow_none=True)
    amp = check_amp_dtype(amp_dtype)
    check_choice("batchnorm", batchnorm, BATCHNORM_MODES, allow_none=True)
    dev = _device(device, params)
    check_choice("sync", sync, SYNC_MODES)
    check_bool("oom_retry", oom_retry, "re-run a batch with a smaller micro-batch after out-of-memory")
    if regrow_after is not None:
        check_int("regrow_after", regrow_after, "clean steps before trying a larger micro-batch again; or None")
    check_bool("probe_cache", probe_cache, "reuse an earlier probe's answer")
    if memory_budget is not None:
        parse_bytes(memory_budget)          # a bad budget fails here, not at the first step
    topology = Topology(model, sync)
    accum = topology.buffer_dtype(accum_dtype, params)
    check_master_weights(master_weights, accum)

    world_size = topology.world_size
    the_plan = make_plan(target_batch, micro_batch if micro_batch is not None else max(1, target_batch // world_size),
                         world_size)
    if micro_batch is not None:
        sizer = None
    elif topology.shards_gradients:
        raise ValueError("fit cannot probe an FSDP2 model: its trials would need every rank in lockstep. "
                         "Probe the unsharded model on one GPU (autoaccum.probe) or pass micro_batch=")
    else:
        def run_probe(batch: Any) -> ProbeResult:
            # Trials run on the wrapped module, so no rank ever waits in a collective for another's trial.
            return probe(topology.module, batch, optimizer=optimizer, loss_fn=loss_fn, amp_dtype=amp,
                         count_fn=count_fn, device=dev, max_micro_batch=the_plan.per_rank_batch,
                         memory_budget=memory_budget, cache=probe_cache, world_size=world_size,
                         accum_dtype=accum, master_weights=master_weights)
        sizer = Sizer(the_plan, topology, run_probe)
    if optimizer is None:
        optimizer = default_optimizer_for(params)
    probe_result = None
    if sizer is not None and sample is not None:
        the_plan, probe_result = sizer(sample, lazy=False)
        sizer = None
    return Trainer(model, optimizer, the_plan if sizer is None else None, loss_fn=loss_fn, scheduler=scheduler,
                   max_grad_norm=max_grad_norm, amp_dtype=amp, count_fn=count_fn,
                   batchnorm=batchnorm, device=dev, probe_result=probe_result, accum_dtype=accum,
                   master_weights=master_weights, topology=topology, oom_retry=oom_retry,
                   regrow_after=regrow_after, sizer=sizer, default_optimizer=default_optimizer)


def default_optimizer_for(params: list[torch.Tensor]) -> torch.optim.Optimizer:
    """``AdamW`` with torch's defaults over ``params``; the fused kernel when all of them are on CUDA."""
    fused = bool(params) and all(p.device.type == "cuda" and p.is_floating_point() for p in params)
    return torch.optim.AdamW(params, fused=True) if fused else torch.optim.AdamW(params)


class Sizer:
    """Finds the plan by probing a batch: ``fit``'s ``sample=``, or the first batch given to
    ``Trainer.step``. Under data parallelism every rank probes and all take the smallest answer; a
    rank whose probe fails tells the others (it proposes 0) instead of leaving them waiting.
    ``pending`` is the plan's shape before sizing (its micro-batch is a placeholder)."""

    def __init__(self, pending: Plan, topology: Topology, run_probe: Callable[[Any], ProbeResult]):
        self.pending, self.topology, self.run_probe = pending, topology, run_probe

    def __call__(self, batch: Any, lazy: bool = True) -> tuple[Plan, ProbeResult]:
        try:
            if lazy:
                self.pending.check_batch(batching.batch_size(batch))
            result = self.run_probe(batch)
        except BaseException:
            self.topology.agree_min(0)
            raise
        micro_batch = self.topology.agree_min(result.max_micro_batch)
        if micro_batch < 1:
            raise PeerFailure("another rank could not probe its micro-batch (its error says why); this rank stops too")
        return make_plan(self.pending.target_batch, micro_batch, self.pending.world_size), result

    def __repr__(self) -> str:
        return f"target {self.pending.target_batch}: micro-batch probed on the first batch given to step()"


def _check_optimizer(optimizer: Any, params: list[torch.Tensor]) -> None:
    if not (hasattr(optimizer, "step") and hasattr(optimizer, "zero_grad")
            and hasattr(optimizer, "param_groups")):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer built from the model's parameters; "
                        f"got {type(optimizer).__name__}")
    check_optimizer(optimizer, params)
    if type(optimizer).__name__ == "AcceleratedOptimizer" and getattr(optimizer, "scaler", None) is not None:
        raise ValueError("optimizer comes from accelerator.prepare with fp16 mixed precision, so its step() goes "
                         "through Accelerate's GradScaler, which expects a loss scaled by accelerator.backward; "
                         "pass the optimizer it wraps (optimizer.optimizer) and amp_dtype=torch.float16: autoaccum "
                         "scales, unscales and skips overflowing steps itself")


def _check_dense_gradients(model: nn.Module) -> None:
    """Sparse gradients (``Embedding(sparse=True)``) cannot be weighted into a buffer, clipped or
    unscaled by the fused kernels; say so before anything runs."""
    for name, m in model.named_modules():
        if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.sparse and m.weight.requires_grad:
            raise ValueError(f"module {name or type(m).__name__!r} makes sparse gradients ({type(m).__name__}("
                             f"sparse=True)); autoaccum accumulates, clips and unscales dense gradients: "
                             f"use sparse=False")


def _check_scheduler(scheduler: Any, optimizer: Any) -> None:
    if scheduler is None:
        return
    if not callable(getattr(scheduler, "step", None)):
        raise TypeError(f"scheduler must have a step() method (a torch.optim.lr_scheduler); "
                        f"got {type(scheduler).__name__}")
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        raise TypeError("ReduceLROnPlateau steps on a validation metric, not once per update; step it "
                        "yourself after evaluation and leave scheduler=None")
    owner = getattr(scheduler, "optimizer", optimizer)
    if owner is not optimizer:
        raise ValueError("scheduler was built for a different optimizer than the one passed to fit; "
                         "build it from the same optimizer")


def _device(device: Any, params: list[torch.Tensor]) -> torch.device:
    if device is not None:
        return check_device("device", device)
    devices = {p.device for p in params}
    if len(devices) > 1:
        raise ValueError(f"the model's parameters are on several devices ({sorted(map(str, devices))}); "
                         f"pass device= to say where micro-batches go")
    dev = devices.pop()
    check_runnable("the model's device", dev)
    return dev
