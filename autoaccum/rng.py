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
