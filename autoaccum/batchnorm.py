"""BatchNorm under gradient accumulation: what changes, and the three ways to handle it.

A BatchNorm layer in training mode normalises with the statistics of the batch it sees and
moves its running statistics towards them once per forward. Under accumulation it sees
micro-batches, so (1) its normalisation uses micro-batch statistics, which no accumulation
scheme can avoid without a second pass, and (2) its running statistics move ``accum_steps``
times per optimizer step instead of once. ``mode`` picks what happens to the running stats:

``"micro"``  each micro-batch updates them, as any plain accumulation loop does (the default;
             autoaccum warns once when it applies).
``"freeze"`` they are left exactly as they were (fine-tuning with fixed statistics).
``"step"``   they move once per optimizer step, towards the mean and unbiased variance of the
             whole batch, combined exactly from the micro-batch statistics: the running stats
             end where a single full-batch forward would leave them.

Every mode snapshots the running stats when a step starts, so a step that fails (bad loss,
out of memory) puts them back as they were.
"""
from __future__ import annotations


import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from .warn import warn

MODES = ("micro", "freeze", "step")


class RunningStats:
    """Applies a BatchNorm mode around one optimizer step of a model."""

    def __init__(self, model: nn.Module, mode: str | None):
        if mode is not None and mode not in MODES:
            raise ValueError(f"batchnorm must be one of {', '.join(map(repr, MODES))} (or None for "
                             f"'micro' with a one-time warning); got {mode!r}")
        self.layers = [m for m in model.modules()
                       if isinstance(m, _BatchNorm) and m.track_running_stats]
        if mode == "step" and any(isinstance(m, nn.SyncBatchNorm) for m in self.layers):
            raise ValueError("batchnorm='step' combines per-process micro-batch statistics and cannot "
                             "see SyncBatchNorm's cross-rank counts; use batchnorm='micro' or 'freeze'")
        self.mode = mode or "micro"
        self._warn = mode is None
        self._saved: list[tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor | None, object]] = []
        self._seen: dict[int, list[tuple[int, torch.Tensor, torch.Tensor]]] = {}
        self._hooks: list = []

    def begin(self, accum_steps: int) -> None:
        """Snapshot the running stats of the layers in training mode; arm the mode."""
        active = [m for m in self.layers if m.training]
        self._saved = [(m, m.running_mean.clone(), m.running_var.clone(),
                        None if m.num_batches_tracked is None else m.num_batches_tracked.clone(),
                        m.momentum) for m in active]
        if not active or accum_steps == 1:
            return  # one forward per step: every mode is the full-batch behaviour
        if self._warn:
            self._warn = False
            warn(
                f"the model has {len(active)} BatchNorm layer(s) in training mode: with {accum_steps} "
                f"micro-batches each one normalises with micro-batch statistics and updates the running "
                f"statistics {accum_steps} times per step. Pass batchnorm='step' to update them once from "
                f"the whole batch, 'freeze' to keep them fixed, or 'micro' to keep this and silence the "
                f"warning.")
        if self.mode == "step":
            for m in active:
                m.momentum = 1.0  # the layer's running stats become exactly its micro-batch stats
                self._seen[id(m)] = []
                self._hooks.append(m.register_forward_hook(self._record))

    def end(self) -> None:
        """Finish a step whose micro-batches all ran: apply the mode's running-stat update."""
        try:
            if self.mode == "freeze":
                self._restore()
            elif self.mode == "step" and self._hooks:
                for m, mean0, var0, nbt0, momentum in self._saved:
                    self._apply_full_batch(m, mean0, var0, nbt0, momentum)
        finally:
            self._disarm()

    def abort(self) -> None:
        """Undo the step: running stats back to the snapshot."""
        self._restore()
        self._disarm()

    def _record(self, module: nn.Module, inputs, output) -> None:
        x = inputs[0]
        count = x.numel() // x.shape[1]
        self._seen[id(module)].append((count, module.running_mean.clone(), module.running_var.clone()))

    def _apply_full_batch(self, m, mean0, var0, nbt0, momentum) -> None:
        seen = self._seen.get(id(m), [])
        if not seen:  # the layer did not run in this step
            self._restore_one(m, mean0, var0, nbt0)
            return
        counts = torch.tensor([c for c, _, _ in seen], dtype=torch.float64, device=mean0.device)
        means = torch.stack([mu for _, mu, _ in seen]).double()
        variances = torch.stack([v for _, _, v in seen]).double()
        n = counts.sum()
        w = counts[:, None]
        mean = (w * means).sum(0) / n
        # Parallel variance combination: within-part sums of squares plus between-part spread.
        m2 = ((w - 1) * variances + w * (means - mean) ** 2).sum(0)
        var = m2 / (n - 1)
        if nbt0 is not None:
            m.num_batches_tracked.copy_(nbt0 + 1)
        factor = momentum if momentum is not None else 1.0 / float(m.num_batches_tracked)
        m.running_mean.copy_(((1 - factor) * mean0.double() + factor * mean).to(mean0.dtype))
        m.running_var.copy_(((1 - factor) * var0.double() + factor * var).to(var0.dtype))

    def _restore(self) -> None:
        for m, mean0, var0, nbt0, _ in self._saved:
            self._restore_one(m, mean0, var0, nbt0)

    @staticmethod
    def _restore_one(m, mean0, var0, nbt0) -> None:
        with torch.no_grad():
            m.running_mean.copy_(mean0)
            m.running_var.copy_(var0)
            if nbt0 is not None:
                m.num_batches_tracked.copy_(nbt0)

    def _disarm(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self._seen.clear()
        for m, _, _, _, momentum in self._saved:
            m.momentum = momentum
