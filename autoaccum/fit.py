"""``fit``: check every argument, find the plan, and hand back a Trainer.

Everything a user can get wrong is checked here, before anything is touched: ``fit`` leaves
the model's parameters and the optimizer's state exactly as they were.
"""
from __future__ import annotations

import math
import numbers
from typing import Any

import torch
from torch import nn

from .batchnorm import MODES as BATCHNORM_MODES
from .checks import check_amp_dtype, check_callable, check_master_weights, resolve_accum_dtype
from .plan import plan as make_plan
from .probe import probe
from .trainer import CountFn, LossFn, Trainer

def fit(model: nn.Module, target_batch: int, optimizer: torch.optim.Optimizer, *,
        loss_fn: LossFn | None = None, micro_batch: int | None = None, scheduler: Any = None,
        max_grad_norm: float | None = None, amp_dtype: torch.dtype | str | None = None,
        count_fn: CountFn | None = None, batchnorm: str | None = None,
        device: torch.device | str | None = None, sample: Any = None,
        memory_budget: int | str | None = None, probe_cache: bool = True,
        accum_dtype: torch.dtype | str | None = "auto", master_weights: bool = False) -> Trainer:
    """Set up exact large-batch training of ``model`` with an effective batch of ``target_batch``.

    ``loss_fn(model, micro_batch)`` returns the MEAN loss over the micro-batch's items; without
    it the model's own output must carry the loss (``out.loss`` or ``out["loss"]``).
    ``count_fn(micro_batch)`` counts those items (default: samples), e.g. non-padding tokens.
    ``micro_batch`` is the largest micro-batch to run; ``None`` means find it with
    :func:`autoaccum.probe` on ``sample`` (the worst-case batch, or ``sample(n)``) under
    ``memory_budget``, with results cached unless ``probe_cache=False``. ``amp_dtype`` is ``torch.float16`` (with a GradScaler) or ``torch.bfloat16``.
    ``batchnorm`` is ``"micro"``, ``"freeze"`` or ``"step"`` (see :mod:`autoaccum.batchnorm`).
    ``device`` is where micro-batches are moved before the forward (default: the model's).
    ``accum_dtype`` is the dtype of the gradient buffer the fused kernels accumulate into
    (``"auto"``: float32 when a trainable parameter is bf16/fp16, else autograd's own ``.grad``;
    ``None``: never). With the buffer, bf16/fp16 parameters get their fp32 gradient cast for the
    update, or with ``master_weights=True`` the optimizer updates fp32 master copies.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    params = [p for p in model.parameters()]
    if not any(p.requires_grad for p in params):
        raise ValueError("model has no parameter that requires grad, so there is nothing to train")
    _check_optimizer(optimizer, params)
    _check_scheduler(scheduler, optimizer)
    check_callable("loss_fn", loss_fn, "loss_fn(model, micro_batch) -> scalar mean loss")
    check_callable("count_fn", count_fn, "count_fn(micro_batch) -> number of items")
    if max_grad_norm is not None:
        if (isinstance(max_grad_norm, bool) or not isinstance(max_grad_norm, numbers.Real)
                or not math.isfinite(max_grad_norm) or max_grad_norm <= 0):
            raise ValueError(f"max_grad_norm must be a positive finite number or None; got {max_grad_norm!r}")
        max_grad_norm = float(max_grad_norm)
    amp = check_amp_dtype(amp_dtype)
    if batchnorm is not None and batchnorm not in BATCHNORM_MODES:
        raise ValueError(f"batchnorm must be one of {', '.join(map(repr, BATCHNORM_MODES))} or None; "
                         f"got {batchnorm!r}")
    dev = _device(device, params)
    accum = resolve_accum_dtype(accum_dtype, params)
    check_master_weights(master_weights, accum)

    world_size = _world_size()
    probe_result = None
    if micro_batch is None:
        if sample is None:
            raise ValueError("pass micro_batch= (the largest micro-batch to run) or sample= (a batch to "
                             "probe memory with) so autoaccum can find the micro-batch")
        per_rank = make_plan(target_batch, 1, world_size).per_rank_batch  # checks target/world first
        probe_result = probe(model, sample, optimizer=optimizer, loss_fn=loss_fn, amp_dtype=amp,
                             count_fn=count_fn, device=dev, max_micro_batch=per_rank,
                             memory_budget=memory_budget, cache=probe_cache, world_size=world_size,
                             accum_dtype=accum, master_weights=master_weights)
        micro_batch = probe_result.max_micro_batch
    the_plan = make_plan(target_batch, micro_batch, world_size)
    return Trainer(model, optimizer, the_plan, loss_fn=loss_fn, scheduler=scheduler,
                   max_grad_norm=max_grad_norm, amp_dtype=amp, count_fn=count_fn,
                   batchnorm=batchnorm, device=dev, probe_result=probe_result, accum_dtype=accum,
                   master_weights=master_weights)


def _check_optimizer(optimizer: Any, params: list[torch.Tensor]) -> None:
    if not (hasattr(optimizer, "step") and hasattr(optimizer, "zero_grad")
            and hasattr(optimizer, "param_groups")):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer built from the model's parameters; "
                        f"got {type(optimizer).__name__}")
    mine = {id(p) for p in params}
    if not any(id(p) in mine for g in optimizer.param_groups for p in g["params"]):
        raise ValueError("optimizer holds none of the model's parameters; build it from "
                         "model.parameters() after moving the model to its device")


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
        try:
            return torch.device(device)
        except (RuntimeError, TypeError) as e:
            raise ValueError(f"device must be a torch.device or a string like 'cuda:0'; got {device!r}") from e
    devices = {p.device for p in params}
    if len(devices) > 1:
        raise ValueError(f"the model's parameters are on several devices ({sorted(map(str, devices))}); "
                         f"pass device= to say where micro-batches go")
    return devices.pop()


def _world_size() -> int:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1
