"""What a step trains: the model's parameters that require grad, and any others the optimizer holds.

Listing a model's parameters walks its module tree in Python: 160 µs per step for a 12-layer
GPT-2 on a CPU, 5% of a small model's step. So the list is made again only when something that
decides it may have changed since it was made:

* a parameter or a submodule was registered on any module (``model.fc = nn.Linear(...)``,
  ``register_parameter``, ``load_state_dict(assign=True)``, parametrizations): torch's global
  registration hooks count these;
* the optimizer's parameter groups hold other tensors (``add_param_group``, an edited list);
* a ``requires_grad`` flag flipped (gradual unfreezing), or a frozen tensor seen last time was
  freed (its module was deleted; frozen tensors are watched through weak references, so a
  deleted frozen module is not kept alive).

Not announced by torch, so not seen: ``ModuleList.insert`` / ``Sequential.insert`` of a module
built earlier, and writes straight into a module's ``_parameters`` or ``_modules`` dicts; call
``Trainer.rescan()`` after those (or build a new trainer).
"""
from __future__ import annotations

import itertools
import operator
import weakref
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
        self._frozen: list[weakref.ref] = []        # tensors looked at that do not require grad
        self._frozen_held: list[weakref.ref] = []   # those of them the optimizer holds
        self.params: list[torch.Tensor] = []
        self.current()

    def current(self) -> list[torch.Tensor]:
        """The trainable tensors now (the same list object while nothing changed)."""
        held = tuple(itertools.chain.from_iterable([map(id, g["params"]) for g in self.optimizer.param_groups]))
        if self._seen_at == _registrations and held == self._held and all(map(_REQUIRES_GRAD, self.params)):
            frozen = [ref() for ref in self._frozen]
            if not any(t is None or t.requires_grad for t in frozen):
                return self.params
        self._seen_at, self._held = _registrations, held
        extra = (p for g in self.optimizer.param_groups for p in g["params"])
        candidates = _unique((*self.model.parameters(), *extra))
        params = [p for p in candidates if p.requires_grad]
        held_ids = set(held)
        self._frozen = [weakref.ref(p) for p in candidates if not p.requires_grad]
        self._frozen_held = [weakref.ref(p) for p in candidates if not p.requires_grad and id(p) in held_ids]
        if len(params) != len(self.params) or any(p is not q for p, q in zip(params, self.params)):
            self.params = params
        return self.params

    @property
    def held(self) -> tuple[int, ...]:
        """The ids of the tensors in the optimizer's parameter groups at the last :meth:`current`
        (the same tuple object while they did not change)."""
        return self._held

    @property
    def frozen_held(self) -> list[torch.Tensor]:
        """Tensors the optimizer holds that do not require grad (``zero_grad`` clears them too)."""
        return [t for t in (ref() for ref in self._frozen_held) if t is not None]

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
