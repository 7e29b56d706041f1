"""Capture and restore every random stream a training step may draw from.

The probe must leave them as it found them, and a retried step must see the same random
numbers a first attempt would: torch (CPU and every initialised CUDA device), numpy, Python.
"""
from __future__ import annotations

import ctypes
import random
import sys
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
    """Every stream as it is now (taken before every step: it costs about 10 µs on a CPU)."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return RngState(torch.get_rng_state(), cuda, _numpy_state(), random.getstate())


_MT_BYTES = 624 * 4 + 4          # numpy's mt19937_state: uint32_t key[624]; int pos
_numpy_seen: tuple[bytes, tuple] | None = None   # (raw generator state, np.random.get_state() of it)
_numpy_raw_ok = True


def _numpy_state() -> tuple:
    """``np.random.get_state()``, which takes about 24 µs (it copies the key word by word), taken
    only when the stream moved since the last one.

    The generator's raw state (key and position) is read through numpy's public ``ctypes``
    interface in well under a microsecond and compared with the raw state behind the last
    snapshot. Equal raw states are the same stream unless the legacy Gaussian cache changed,
    which happens without a draw only when a cached value is used up: so a snapshot that held
    one is never reused. Another bit generator (``np.random.set_bit_generator``) takes the long way.
    """
    global _numpy_seen, _numpy_raw_ok
    if type(getattr(np.random.mtrand._rand, "_bit_generator", None)).__name__ != "MT19937":
        return np.random.get_state(legacy=False)   # a dict; the legacy tuple exists for MT19937 only
    raw = _numpy_raw()
    if raw is not None and _numpy_seen is not None and _numpy_seen[0] == raw and not _numpy_seen[1][3]:
        return _numpy_seen[1]
    state = np.random.get_state()
    if raw is not None:
        pos = int.from_bytes(raw[-4:], sys.byteorder, signed=True)
        if state[0] == "MT19937" and pos == state[2] and raw[:-4] == state[1].tobytes():
            _numpy_seen = (raw, state)
        else:                            # not the layout this reads: never again
            _numpy_raw_ok, _numpy_seen = False, None
    return state


def _numpy_raw() -> bytes | None:
    if not _numpy_raw_ok:
        return None
    return ctypes.string_at(np.random.mtrand._rand._bit_generator.ctypes.state_address, _MT_BYTES)


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
    if not isinstance(numpy_state, dict):
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
    try:
        numpy_state = d["numpy"]
        if isinstance(numpy_state, dict):            # not MT19937 (np.random.set_bit_generator)
            trial = np.random.RandomState(getattr(np.random, str(numpy_state.get("bit_generator")))())
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

