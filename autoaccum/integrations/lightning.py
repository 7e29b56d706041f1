"""``AutoAccum(target_batch)``: a Lightning callback that sizes the micro-batch before fitting.

At ``on_fit_start`` (the model is on its device, the dataloaders are not built yet) it probes the
LightningModule's own ``training_step`` on a batch from its train dataloader, with the optimizer
``configure_optimizers`` returns and the trainer's precision, then sets the module's (or
datamodule's) ``batch_size``, found as Lightning's ``BatchSizeFinder`` finds it, and
``trainer.accumulate_grad_batches`` so that their product times the world size is
``target_batch``. Lightning accumulates equal micro-batches and divides each loss by their
number: exact for a loss averaged over samples, so the micro-batch is the largest that fits and
divides the per-rank batch. Works with ``lightning.pytorch`` or ``pytorch_lightning``, whichever
is installed (``lightning`` first).
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch

from ..checks import check_int
from ..probe import probe
from . import largest_divisor_at_most

try:
    import lightning.pytorch as pl
    from lightning.pytorch.utilities.parsing import lightning_hasattr, lightning_setattr
except ImportError:
    import pytorch_lightning as pl
    from pytorch_lightning.utilities.parsing import lightning_hasattr, lightning_setattr

log = logging.getLogger("autoaccum")

_PRECISION = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


class AutoAccum(pl.Callback):
    def __init__(self, target_batch: int, *, memory_budget: int | str | None = None,
                 batch_size_attr: str = "batch_size", cache: bool = True):
        check_int("target_batch", target_batch, "the effective batch of one optimizer step")
        self.target_batch, self.memory_budget = target_batch, memory_budget
        self.batch_size_attr, self.cache = batch_size_attr, cache
        self.result = None            # the ProbeResult, after fitting started

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if not lightning_hasattr(pl_module, self.batch_size_attr):
            raise ValueError(f"AutoAccum sets the micro-batch through `{self.batch_size_attr}` on the LightningModule, "
                             f"its hparams or its datamodule (as Lightning's BatchSizeFinder does), but none has it; "
                             f"add `self.{self.batch_size_attr} = ...` and use it in train_dataloader()")
        world = max(1, int(trainer.world_size))
        if self.target_batch % world:
            raise ValueError(f"target_batch={self.target_batch} is not divisible by the world size {world}")
        per_rank = self.target_batch // world
        self.result = probe(pl_module, _sampler(trainer, pl_module), optimizer=_optimizer(pl_module),
                            loss_fn=_training_step_loss, amp_dtype=_PRECISION.get(str(trainer.precision)),
                            device=pl_module.device, max_micro_batch=per_rank, memory_budget=self.memory_budget,
                            cache=self.cache)
        micro = largest_divisor_at_most(per_rank, self.result.max_micro_batch)
        lightning_setattr(pl_module, self.batch_size_attr, micro)
        trainer.accumulate_grad_batches = per_rank // micro
        log.info("autoaccum: %s=%d, accumulate_grad_batches=%d for an effective batch of %d on %d rank(s)%s",
                 self.batch_size_attr, micro, per_rank // micro, self.target_batch, world,
                 "" if micro == self.result.max_micro_batch else
                 f" ({self.result.max_micro_batch} fits; Lightning needs equal micro-batches)")


def _training_step_loss(module: Any, batch: Any) -> torch.Tensor:
    """The module's own ``training_step`` as a loss, with ``self.log`` quiet (no loop is running)."""
    with _quiet_logging(module):
        out = module.training_step(batch, 0)
    return out["loss"] if isinstance(out, dict) else out


@contextlib.contextmanager
def _quiet_logging(module: Any):
    saved = module.log, module.log_dict
    module.log = module.log_dict = lambda *a, **k: None
    try:
        yield
    finally:
        module.log, module.log_dict = saved


def _optimizer(module: Any):
    """The first optimizer ``configure_optimizers`` returns (a fresh one: the probe steps it)."""
    made = module.configure_optimizers()
    if isinstance(made, dict):
        made = made.get("optimizer")
    if isinstance(made, (list, tuple)):
        made = made[0] if made else None
        if isinstance(made, (list, tuple)):
            made = made[0] if made else None
        if isinstance(made, dict):
            made = made.get("optimizer")
    return made if isinstance(made, torch.optim.Optimizer) else None


def _sampler(trainer: Any, module: Any):
    """``sample(n)``: the first ``n`` items of the train dataset, collated as its dataloader does."""
    source = trainer.datamodule if getattr(trainer, "datamodule", None) is not None else module
    loader = source.train_dataloader()
    dataset, collate = loader.dataset, loader.collate_fn

    def sample(n: int):
        return collate([dataset[i % len(dataset)] for i in range(n)])

    return sample
