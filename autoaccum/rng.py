"""Capture and restore every random stream a training step may draw from.

The probe must leave them as it found them, and a retried step must see the same random
numbers a first attempt would: torch (CPU and every initialised CUDA device), numpy, Python.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class RngState:
    torch_cpu: torch.Tensor
    torch_cuda: list[torch.Tensor] | None
    numpy: tuple | dict      # legacy tuple (MT19937), or another bit generator's state dict
    python: tuple


def capture() -> RngState:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return RngState(torch.get_rng_state(), cuda, _numpy_state(), random.getstate())


def _numpy_state():
    """numpy's global stream: the legacy tuple for MT19937 (numpy's default), else the dict that
    ``np.random.set_bit_generator``'s generators have (the tuple exists for MT19937 only).

    Not cached: its legacy Gaussian cache (``has_gauss``) has no cheap public read, and
    ``set_state`` can change it without moving the generator, so no cheaper check is sound."""
    if _numpy_kind() != "MT19937":
        return np.random.get_state(legacy=False)
    return np.random.get_state()


def _numpy_kind() -> str:
    return type(np.random.mtrand._rand._bit_generator).__name__


def restore(state: RngState) -> None:
    torch.set_rng_state(state.torch_cpu)
    if state.torch_cuda is not None:
        torch.cuda.set_rng_state_all(state.torch_cuda)
    np.random.set_state(state.numpy)
    random.setstate(state.python)


def to_dict(state: RngState) -> dict:
    """A checkpoint form that ``torch.load(weights_only=True)`` (torch's default) accepts: tensors,
    tuples, numbers and strings; numpy's key array travels as an int64 tensor (another bit
    generator's state is a dict of numbers already)."""
    numpy_state = state.numpy
    if isinstance(numpy_state, dict):
        numpy_state = _plain(numpy_state)      # Philox and SFC64 hold arrays
    else:
        kind, key, pos, has_gauss, gauss = numpy_state
        numpy_state = (str(kind), torch.from_numpy(key.astype(np.int64)), int(pos), int(has_gauss), float(gauss))
    return {"torch_cpu": state.torch_cpu, "torch_cuda": state.torch_cuda, "numpy": numpy_state,
            "python": state.python}


def from_dict(d: dict) -> RngState:
    """The inverse of :func:`to_dict`, checked before anything is restored."""
    if not isinstance(d, dict) or set(d) != {"torch_cpu", "torch_cuda", "numpy", "python"}:
        raise ValueError("the checkpoint's 'rng' entry is not one Trainer.state_dict() wrote")
    cuda = d["torch_cuda"]
    if cuda is not None:
        have = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if len(cuda) != have:
            raise ValueError(f"the checkpoint holds random streams for {len(cuda)} CUDA device(s) but this process "
                             f"sees {have}; resume on the same devices, or save with state_dict(rng=False)")
    numpy_state = d["numpy"]
    kind = numpy_state.get("bit_generator") if isinstance(numpy_state, dict) else \
        (numpy_state[0] if isinstance(numpy_state, (tuple, list)) and numpy_state else None)
    if isinstance(kind, str) and kind != _numpy_kind():
        raise ValueError(f"the checkpoint's numpy stream is {kind!r} but this process's is {_numpy_kind()!r} "
                         f"(np.random.set_bit_generator); set the same generator before loading")
    try:
        if not isinstance(kind, str):
            raise TypeError("no bit generator named")
        if isinstance(numpy_state, dict):            # not MT19937 (np.random.set_bit_generator)
            numpy_state = _arrays(numpy_state)
            trial = np.random.RandomState(type(np.random.mtrand._rand._bit_generator)())   # same kind, checked
        else:
            kind, key, pos, has_gauss, gauss = numpy_state
            key = key.numpy().astype(np.uint32) if isinstance(key, torch.Tensor) else np.asarray(key, dtype=np.uint32)
            numpy_state, trial = (kind, key, pos, has_gauss, gauss), np.random.RandomState()
        state = RngState(d["torch_cpu"], cuda, numpy_state, d["python"])
        torch.Generator().set_state(state.torch_cpu)          # dry runs: a bad stream fails here, not half-way
        trial.set_state(state.numpy)
        random.Random().setstate(state.python)
        if cuda is not None and not all(isinstance(t, torch.Tensor) and t.dtype == torch.uint8 for t in cuda):
            raise TypeError("CUDA streams must be uint8 tensors")
    except (TypeError, ValueError, RuntimeError, AttributeError) as e:
        raise ValueError(f"the checkpoint's 'rng' entry is not one Trainer.state_dict() wrote ({e})") from None
    return state


def _plain(state: dict) -> dict:
    """A bit generator's state with numpy arrays as lists (``weights_only`` checkpoints take no arrays)."""
    return {k: _plain(v) if isinstance(v, dict) else ({"__array__": v.tolist(), "dtype": str(v.dtype)}
                                                      if isinstance(v, np.ndarray) else v)
            for k, v in state.items()}


def _arrays(state: dict) -> dict:
    """The inverse of :func:`_plain`."""
    if set(state) == {"__array__", "dtype"}:
        return np.array(state["__array__"], dtype=state["dtype"])
    return {k: _arrays(v) if isinstance(v, dict) else v for k, v in state.items()}
