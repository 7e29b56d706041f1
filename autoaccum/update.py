"""Hand the accumulated gradients to the optimizer and step it.

Gradients of the parameter's own dtype are installed as they are (for the buffer: ``p.grad`` is
the fp32 view, no copy). A bf16/fp16 parameter with an fp32 accumulated gradient is either
given the gradient cast to its dtype (``master_weights=False``: the least memory), or stepped
through an fp32 master copy (``master_weights=True``: the optimizer sees fp32 weights, fp32
gradients and keeps fp32 state; the model's weights are the master rounded after each step).
The master copy is re-made from the parameter whenever the parameter changed outside training
(a checkpoint load), which its version counter tells.
"""
from __future__ import annotations

import torch
from torch import nn


class Updater:
    def __init__(self, master_weights: bool = False):
        self.master_weights = master_weights
        self._masters: dict[int, tuple[torch.Tensor, int]] = {}   # id(p) -> (fp32 copy, p._version after sync)

    def step(self, optimizer, pairs: list[tuple[nn.Parameter, torch.Tensor]],
             grad_scale: torch.Tensor | None = None, found_inf: torch.Tensor | None = None) -> None:
        """Install gradients, step ``optimizer`` (passing ``grad_scale``/``found_inf`` to a fused one)."""
        swapped = []
        try:
            for p, g in pairs:
                if g.dtype == p.dtype:
                    p.grad = g
                elif self.master_weights:
                    master = self._master(p, g.dtype)
                    swapped.append((p, p.data, master))
                    p.data = master              # the optimizer updates the fp32 copy with the fp32 gradient
                    p.grad = g
                else:
                    p.grad = g.to(p.dtype)       # accumulated exactly in fp32, cast once for the update
            if grad_scale is not None:
                optimizer.grad_scale = grad_scale   # fused optimizers divide the gradients by it
                optimizer.found_inf = found_inf
            optimizer.step()
        finally:
            if grad_scale is not None:
                for name in ("grad_scale", "found_inf"):
                    if hasattr(optimizer, name):
                        delattr(optimizer, name)
            for p, low, master in swapped:
                p.data = low
                with torch.no_grad():
                    low.copy_(master)            # round the fp32 master to the model's dtype
                self._masters[id(p)] = (master, p._version)

    def _master(self, p: nn.Parameter, dtype: torch.dtype) -> torch.Tensor:
        held = self._masters.get(id(p))
        if held is None or held[1] != p._version or held[0].dtype != dtype:
            held = (p.detach().to(dtype).clone(), p._version)
            self._masters[id(p)] = held
        return held[0]

    def masters(self) -> dict[int, torch.Tensor]:
        return {k: v[0] for k, v in self._masters.items()}
