"""What a step trains: the model's parameters that require grad, and any others the optimizer holds.

Listing a model's parameters walks its module tree in Python: 160 µs per step for a 12-layer
GPT-2 on a CPU, 5% of a small model's step. So the list is made again only when something that
decides it may have changed since it was made:

* a parameter or a submodule was registered on any module (``model.fc = nn.Linear(...)``,
  ``register_parameter``): torch's global registration hooks count these;
* the optimizer's parameter groups hold other tensors (``add_param_group``, an edited list);
* a ``requires_grad`` flag of a tensor seen last time flipped (gradual unfreezing).

Not seen: a parameter put straight into a module's ``_parameters`` dict, bypassing torch's
registration; :meth:`Trainable.rescan` makes the next call look again.
"""
from __future__ import annotations

import itertools
import operator
from collections.abc import Iterable

import torch
from torch import nn

_REQUIRES_GRAD = operator.attrgetter("requires_grad")
_registrations = 0      # parameters and submodules registered in this process, on any module
_hooked = False


def _count(*_args) -> None:
    global _registrations
    _registrations += 1          # returns None: the registered object is kept as it is


def _watch_registrations() -> None:
    global _hooked
    if not _hooked:
        from torch.nn.modules import module
        module.register_module_parameter_registration_hook(_count)
        module.register_module_module_registration_hook(_count)
        _hooked = True


class Trainable:
    """The tensors a step trains, for ``model`` and ``optimizer``, kept up to date cheaply."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        _watch_registrations()
        self.model = model
        self.optimizer = optimizer
        self._seen_at = -1
        self._held: tuple[int, ...] = ()
        self._candidates: list[torch.Tensor] = []
        self._flags: list[bool] = []
        self.params: list[torch.Tensor] = []
        self.frozen_held: list[torch.Tensor] = []   # tensors the optimizer holds that do not require grad
        self.current()

    def current(self) -> list[torch.Tensor]:
        """The trainable tensors now (the same list object while nothing changed)."""
        held = tuple(itertools.chain.from_iterable([map(id, g["params"]) for g in self.optimizer.param_groups]))
        if (self._seen_at == _registrations and held == self._held
                and list(map(_REQUIRES_GRAD, self._candidates)) == self._flags):
            return self.params
        self._seen_at, self._held = _registrations, held
        extra = (p for g in self.optimizer.param_groups for p in g["params"])
        self._candidates = _unique((*self.model.parameters(), *extra))
        self._flags = list(map(_REQUIRES_GRAD, self._candidates))
        params = [p for p, f in zip(self._candidates, self._flags) if f]
        held_ids = set(held)
        self.frozen_held = [p for p, f in zip(self._candidates, self._flags) if not f and id(p) in held_ids]
        if len(params) != len(self.params) or any(p is not q for p, q in zip(params, self.params)):
            self.params = params
        return self.params

    def rescan(self) -> None:
        """Look at the model again on the next :meth:`current` (after changing it behind torch's back)."""
        self._seen_at = -1


def _unique(tensors: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    seen, out = set(), []
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out
