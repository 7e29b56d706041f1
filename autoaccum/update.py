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
import itertools
import operator
from collections.abc import Callable

import torch
from torch import nn

from . import kernels
from .warn import warn

_VERSION = operator.attrgetter("_version")


class Updater:
    def __init__(self, master_weights: bool = False):
        self.master_weights = master_weights
        self._masters: dict[int, tuple[torch.Tensor, int]] = {}   # id(p) -> (fp32 copy, p._version after sync)

    def step(self, optimizer, pairs: list[tuple[nn.Parameter, torch.Tensor]],
             grad_scale: torch.Tensor | None = None, found_inf: torch.Tensor | None = None) -> None:
        """Install gradients, step ``optimizer`` (passing ``grad_scale``/``found_inf`` to one that takes
        them: torch's fused optimizers)."""
        swapped, lent = [], []
        try:
            for p, g in pairs:
                if p.grad is g:
                    continue                     # autograd's own gradient, already in place
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
            if getattr(optimizer, "_step_supports_amp_scaling", False):
                # fused optimizers divide the gradients by grad_scale, and skip the whole update on
                # the device when found_inf is set
                lent = [(k, v) for k, v in (("grad_scale", grad_scale), ("found_inf", found_inf)) if v is not None]
                for k, v in lent:
                    setattr(optimizer, k, v)
            optimizer.step()
        finally:
            for k, _ in lent:
                if hasattr(optimizer, k):
                    delattr(optimizer, k)
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


class OptimizerWrites:
    """Has ``optimizer.step`` written anything yet? Taken right before the step: the version counter
    of every parameter it holds and of every tensor in its state, and a shallow copy of the state.
    A fault raised before the first write (a lazily allocated state, an OOM making it) can be
    undone exactly by putting the copy back; one raised after it cannot (the parameters moved),
    which ``wrote`` tells.

    Version counters move only with torch's own in-place ops. Fused kernels (``fused=True``) and
    optimizers outside ``torch.optim`` (bitsandbytes, apex) may write through raw pointers, so for
    them the parameters' norms are also taken before the step (one read of the parameters, no host
    sync; compared only after a fault)."""

    def __init__(self, optimizer):
        self.optimizer = optimizer
        self.params = list(itertools.chain.from_iterable([g["params"] for g in optimizer.param_groups]))
        # (key, copy) pairs: a dict keyed by tensors would call Tensor.__hash__ (Python) per entry
        self.state = list(zip(optimizer.state.keys(), map(dict.copy, optimizer.state.values())))
        values = itertools.chain.from_iterable(map(dict.values, [copy for _, copy in self.state]))
        self.tensors = [*self.params, *(t for t in values if isinstance(t, torch.Tensor))]
        self.versions = list(map(_VERSION, self.tensors))
        self.fingerprint = _norms(self.params) if not _versions_tell(optimizer) else None

    def wrote(self) -> bool:
        if list(map(_VERSION, self.tensors)) != self.versions:
            return True
        if self.fingerprint is None:
            return False
        return any(not torch.equal(a, b) for a, b in zip(self.fingerprint, _norms(self.params)))

    def undo(self) -> None:
        """The optimizer's state as it was (entries it created or replaced go; nothing was written in place)."""
        self.optimizer.state.clear()
        self.optimizer.state.update((k, dict(v)) for k, v in self.state)


def _versions_tell(optimizer) -> bool:
    """Does every write of ``optimizer`` move a version counter? torch.optim's own optimizers, unfused."""
    inner = getattr(optimizer, "optimizer", optimizer)          # accelerate's AcceleratedOptimizer
    return (type(inner).__module__.startswith("torch.optim")
            and not any(g.get("fused") for g in inner.param_groups))


def _norms(params: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per-parameter norms in float64 (a write that leaves all of them unchanged is not a write)."""
    groups: dict = {}
    for p in params:
        groups.setdefault((p.device, p.dtype), []).append(p.detach())
    with torch.no_grad():
        return [n for ts in groups.values() for n in torch._foreach_norm(ts, 2, dtype=torch.float64)]


def _match_state(optimizer, p: nn.Parameter, master: torch.Tensor) -> None:
    """State loaded by ``Optimizer.load_state_dict`` arrives in the parameter's (bf16) dtype; the
    master's optimizer needs it in fp32."""
    state = optimizer.state.get(p)
    if not state:
        return
    for k, v in state.items():
        if (k != "step" and isinstance(v, torch.Tensor) and v.is_floating_point() and v.dtype != master.dtype
                and v.shape == master.shape):
            warn("optimizer state for fp32 master weights came back in the parameters' dtype "
                 "(Optimizer.load_state_dict casts it); it is cast to fp32 again, but the rounding "
                 "stays: save and load with trainer.state_dict() / trainer.load_state_dict()")
            state[k] = v.to(master.dtype)


# ---------------------------------------------------------------- finalize: norm, inf/nan, unscale, clip
def finalize(full: list[torch.Tensor], inv_scale, max_grad_norm: float | None, optimizer, *,
             sharded: bool, sum_: Callable[[torch.Tensor], torch.Tensor], backend: str | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The accumulated gradients made ready for the optimizer: ``(norm, found_inf, grad_scale)``.

    One read for the norm and the inf/nan flag and, unless a fused optimizer can fold it
    (``grad_scale`` is then the factor to pass it), one write that unscales and clips. ``full``
    are the gradients as the optimizer sees them (DTensors under FSDP2, whose local shards are
    finalized, with the norm's squares summed over ranks by ``sum_``).
    """
    grads = [_local(g) for g in full]
    if sharded:
        norm, found_inf = _finalize_sharded(full, grads, inv_scale, max_grad_norm, sum_, backend)
        return norm, found_inf, None
    fold = can_fold(optimizer, grads, inv_scale, max_grad_norm)
    norm, found_inf = kernels.finalize_(grads, inv_scale, max_grad_norm, apply=not fold, backend=backend)
    grad_scale = kernels.clip_scale(norm, inv_scale, max_grad_norm).reciprocal().float() if fold else None
    return norm, found_inf, grad_scale


def can_fold(optimizer, grads: list[torch.Tensor], inv_scale, max_grad_norm: float | None) -> bool:
    """Leave the unscale/clip factor to a fused optimizer (it takes ``grad_scale``) when one is needed.

    Fused optimizers take the factor as float32, so float64 gradients keep the exact write pass.
    """
    needed = max_grad_norm is not None or not (isinstance(inv_scale, float) and inv_scale == 1.0)
    return bool(needed and grads and getattr(optimizer, "_step_supports_amp_scaling", False)
                and all(g.dtype != torch.float64 for g in grads))


def _finalize_sharded(full: list[torch.Tensor], grads: list[torch.Tensor], inv_scale, max_grad_norm,
                      sum_, backend) -> tuple[torch.Tensor, torch.Tensor]:
    """FSDP2: the squares of the shards' norms sum over ranks; a replicated tensor (not sharded,
    averaged by the trainer over ranks) counts once. ``grads`` are ``full``'s local shards."""
    sharded = [g for f, g in zip(full, grads) if f is not g]
    replicated = [g for f, g in zip(full, grads) if f is g]
    norm, found = _norm(sharded, inv_scale, backend)
    t = torch.stack([torch.where(found > 0, 0.0, norm.double()) ** 2, found.double()])
    sum_(t)
    if replicated:
        r_norm, r_found = _norm(replicated, inv_scale, backend)
        t[0] += torch.where(r_found > 0, 0.0, r_norm.double().to(t.device)) ** 2
        t[1] += r_found.double().to(t.device)
    found = (t[1] > 0).float()
    norm64 = torch.where(found > 0, float("inf"), t[0].sqrt())
    if not bool(found):
        scale = float(kernels.clip_scale(norm64, inv_scale, max_grad_norm))   # float64: no float32 rounding
        if scale != 1.0 and grads:
            for g in grads:
                g.mul_(scale)    # a number: bf16/fp16 multiply by it in float32, on any device
    return norm64.float(), found


def _norm(grads: list[torch.Tensor], inv_scale, backend) -> tuple[torch.Tensor, torch.Tensor]:
    """Norm and inf/nan flag without writing; float64 gradients keep a float64 norm (the kernels'
    float32 result would put float32 rounding into the clipping factor)."""
    if grads and all(g.dtype == torch.float64 for g in grads):
        return kernels.reference.norm_and_flag(grads, inv_scale)
    return kernels.finalize_(grads, inv_scale, None, apply=False, backend=backend)


def _local(g: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor gradient (FSDP2); plain tensors as they are."""
    return g if type(g) is torch.Tensor or not hasattr(g, "to_local") else g.to_local()
