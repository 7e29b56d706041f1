"""Hand the accumulated gradients to the optimizer and step it.

Gradients of the parameter's own dtype are installed as they are (for the buffer: ``p.grad`` is
the fp32 view, no copy). A bf16/fp16 parameter with an fp32 accumulated gradient is either
given the gradient cast to its dtype (``master_weights=False``: the least memory), or stepped
through an fp32 master copy (``master_weights=True``: the optimizer sees fp32 weights, fp32
gradients and keeps fp32 state; the model's weights are the master rounded after each step).
The master copy is re-made from the parameter whenever the parameter changed outside training
(a checkpoint load), which its version counter tells.

Checkpoints: the optimizer's state for a master is fp32 but keyed by the bf16 parameter, and
``Optimizer.load_state_dict`` casts state to the parameter's dtype. ``Trainer.state_dict`` /
``load_state_dict`` save the masters and load the optimizer with the masters in place, so nothing
is rounded; state that did come back in bf16 is cast to fp32 again before the step (with a warning).
"""
from __future__ import annotations

import contextlib
import warnings

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
                    _match_state(optimizer, p, master)
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

    def state_dict(self, params: list[nn.Parameter]) -> list[torch.Tensor | None]:
        """The fp32 masters in the order of ``params`` (None where there is none)."""
        return [self._masters[id(p)][0] if id(p) in self._masters else None for p in params]

    @contextlib.contextmanager
    def masters_in_place(self, params: list[nn.Parameter], masters: list[torch.Tensor | None]):
        """Within: every parameter with a master holds it (so an optimizer loads fp32 state for it);
        after: the parameters hold their own data again and the masters are adopted."""
        swapped, ok = [], False
        try:
            for p, m in zip(params, masters):
                if m is not None:
                    m = m.detach().to(p.device, copy=True)
                    swapped.append((p, p.data, m))
                    p.data = m
            yield
            ok = True
        finally:
            for p, low, m in swapped:
                p.data = low
                if ok:
                    self._masters[id(p)] = (m, p._version)


def _match_state(optimizer, p: nn.Parameter, master: torch.Tensor) -> None:
    """State loaded by ``Optimizer.load_state_dict`` arrives in the parameter's (bf16) dtype; the
    master's optimizer needs it in fp32."""
    state = optimizer.state.get(p)
    if not state:
        return
    for k, v in state.items():
        if (k != "step" and isinstance(v, torch.Tensor) and v.is_floating_point() and v.dtype != master.dtype
                and v.shape == master.shape):
            warnings.warn("optimizer state for fp32 master weights came back in the parameters' dtype "
                          "(Optimizer.load_state_dict casts it); it is cast to fp32 again, but the rounding "
                          "stays: save and load with trainer.state_dict() / trainer.load_state_dict()",
                          stacklevel=4)
            state[k] = v.to(master.dtype)
