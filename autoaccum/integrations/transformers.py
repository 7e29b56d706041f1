"""``tune(args, model, sample)``: Hugging Face Trainer arguments sized by autoaccum's probe.

The probe runs a real training step of ``model`` with its own loss and the optimizer HF's Trainer
builds from ``args`` (the class and arguments ``Trainer.create_optimizer`` uses), under
``args``' precision, and finds the largest micro-batch that fits. HF accumulates equal micro-batches only and divides the loss by
the accumulation steps (its ``num_items_in_batch`` fixes token counts for causal LMs), so the
micro-batch is the largest one that fits and divides the per-rank batch.
"""
from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from torch import nn

from .. import rng as random_streams
from ..checks import check_int
from ..probe import ProbeResult, probe
from . import largest_divisor_at_most

log = logging.getLogger("autoaccum")


def tune(args: Any, model: nn.Module, sample: Any, *, target_batch: int | None = None,
         memory_budget: int | str | None = None, cache: bool = True) -> Any:
    """A copy of ``args`` (``transformers.TrainingArguments``) with ``per_device_train_batch_size``
    and ``gradient_accumulation_steps`` set so that their product times the world size is
    ``target_batch`` (default: the effective batch ``args`` already asks for) and the micro-batch
    fits. ``sample`` is a worst-case batch (the longest sequences) as the data collator returns it,
    or ``sample(n)``. The probe's result is on the returned object as ``autoaccum_probe``."""
    import transformers
    if not isinstance(args, transformers.TrainingArguments):
        raise TypeError(f"args must be a transformers.TrainingArguments; got {type(args).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (a transformers model); got {type(model).__name__}")
    world = max(1, int(args.world_size))
    current = args.per_device_train_batch_size * args.gradient_accumulation_steps * world
    target = current if target_batch is None else check_int("target_batch", target_batch, "the effective batch")
    if target % world:
        raise ValueError(f"target_batch={target} is not divisible by the world size {world}; HF gives every rank "
                         f"the same batch")
    per_rank = target // world
    result = _probe(args, model, sample, per_rank, memory_budget, cache)
    micro = largest_divisor_at_most(per_rank, result.max_micro_batch)
    tuned = copy.deepcopy(args)
    tuned.per_device_train_batch_size = micro
    tuned.gradient_accumulation_steps = per_rank // micro
    tuned.autoaccum_probe = result
    given_up = "" if micro == result.max_micro_batch else (
        f" ({result.max_micro_batch} fits, but HF needs equal micro-batches: {micro} is the largest that divides "
        f"{per_rank}, {1 - micro / result.max_micro_batch:.0%} less per micro-batch)")
    log.info("autoaccum: per_device_train_batch_size=%d, gradient_accumulation_steps=%d for an effective batch of "
             "%d on %d rank(s)%s", micro, per_rank // micro, target, world, given_up)
    return tuned


def _probe(args, model: nn.Module, sample: Any, per_rank: int, memory_budget, cache: bool) -> ProbeResult:
    """The probe with HF's own optimizer for ``args`` and its precision; the model's own loss. The
    optimizer is made the way ``Trainer.create_optimizer`` makes it, without constructing a Trainer
    (whose ``__init__`` reseeds every random stream with ``args.seed``)."""
    import transformers
    streams = random_streams.capture()
    try:
        cls, kwargs = transformers.Trainer.get_optimizer_cls_and_kwargs(args, model)
        optimizer = cls([p for p in model.parameters() if p.requires_grad], **kwargs)
    finally:
        random_streams.restore(streams)
    amp = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else None
    device = next(model.parameters()).device
    return probe(model, sample, optimizer=optimizer, amp_dtype=amp, device=device, max_micro_batch=per_rank,
                 memory_budget=memory_budget, cache=cache)
