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
    numpy: tuple
    python: tuple


def capture() -> RngState:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return RngState(torch.get_rng_state(), cuda, np.random.get_state(), random.getstate())


def restore(state: RngState) -> None:
    torch.set_rng_state(state.torch_cpu)
    if state.torch_cuda is not None:
        torch.cuda.set_rng_state_all(state.torch_cuda)
    np.random.set_state(state.numpy)
    random.setstate(state.python)


def to_dict(state: RngState) -> dict:
    """A checkpoint form that ``torch.load(weights_only=True)`` (torch's default) accepts: tensors,
    tuples, numbers and strings; numpy's key array travels as an int64 tensor."""
    kind, key, pos, has_gauss, gauss = state.numpy
    return {"torch_cpu": state.torch_cpu, "torch_cuda": state.torch_cuda,
            "numpy": (str(kind), torch.from_numpy(key.astype(np.int64)), int(pos), int(has_gauss), float(gauss)),
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
    try:
        kind, key, pos, has_gauss, gauss = d["numpy"]
        key = key.numpy().astype(np.uint32) if isinstance(key, torch.Tensor) else np.asarray(key, dtype=np.uint32)
        state = RngState(d["torch_cpu"], cuda, (kind, key, pos, has_gauss, gauss), d["python"])
        torch.Generator().set_state(state.torch_cpu)          # dry runs: a bad stream fails here, not half-way
        np.random.RandomState().set_state(state.numpy)
        random.Random().setstate(state.python)
        if cuda is not None and not all(isinstance(t, torch.Tensor) and t.dtype == torch.uint8 for t in cuda):
            raise TypeError("CUDA streams must be uint8 tensors")
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"the checkpoint's 'rng' entry is not one Trainer.state_dict() wrote ({e})") from None
    return state

