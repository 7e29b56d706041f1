"""Pre-flight sizing: predict a training step's peak memory without allocating anything.

The step (forward, backward, optimizer step) runs on fake tensors: a copy of the model whose
parameters are FakeTensors (metadata only, nothing allocated), built from the real model or
from one built on the meta device. A dispatch-mode tracker counts the live bytes every op
would hold, and the same search as :func:`autoaccum.probe` runs over these dry runs.

Fake CUDA tensors abort autograd on a CPU-only build of torch, so the dry run uses fake CPU
tensors and models what differs on a GPU:

* the caching allocator rounds every block up to 512 bytes (modelled);
* cuBLAS/cuBLASLt keep a workspace in the allocator (``workspace_bytes``, default 32 MiB);
* the CUDA context and kernels take memory outside torch (``context_bytes``, default 512 MiB,
  subtracted from ``device_memory``);
* torch.optim left to choose runs its ``foreach`` kernels on CUDA, not the CPU's per-tensor loop
  (modelled: the fake optimizer is told ``foreach=True``).

What it cannot see: fragmentation of the caching allocator (covered by the same headroom the
probe keeps), cuDNN convolution workspaces chosen at run time, kernels that differ between
CPU and CUDA (a fused CUDA attention kernel never materialises the seq x seq scores, while a
CPU fallback might; autocast casts slightly different op lists on the two devices), and
forwards that branch on tensor values, which fake tensors cannot run.
"""
from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from . import batch as batching
from . import rng
from .buffer import GradBuffer
from .checks import check_optimizer, check_positive_int, check_step_arguments, parse_bytes
from .loss import LossFn
from .memory import format_bytes
from .probe import plot_memory
from .search import DEFAULT_MAX_MICRO_BATCH, MemoryModel, Trial, search
from .tracker import ROUND_CUDA, LiveBytes
from .trial import TrackerMeter, TrialRunner, sample_factory
from .update import Updater

DEVICE_KINDS = ("cuda", "cpu")


@dataclass
class Estimate:
    """Predicted memory of a training step on a device of ``device_memory`` bytes."""

    max_micro_batch: int
    memory_model: MemoryModel | None
    device_memory_bytes: int
    usable_bytes: int
    headroom_bytes: int
    runs: list[Trial]
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    dry_run: Callable[[int], Trial] | None = field(default=None, repr=False, compare=False)

    def peak_bytes(self, micro_batch: int) -> int:
        """Predicted peak bytes of one micro-batch step (forward, backward, optimizer): a dry run at
        ``micro_batch`` (nothing is allocated, so it is cheap and exact where the memory curve is not
        a line, e.g. a kernel that switches at some size); the memory model when no dry run is at hand."""
        check_positive_int("micro_batch", micro_batch)
        if self.dry_run is not None:
            return self.dry_run(micro_batch).peak_bytes
        if self.memory_model is None:
            raise ValueError("no dry run succeeded, so there is no memory model")
        return int(round(self.memory_model.peak(micro_batch)))

    def to_dict(self) -> dict:
        return {"max_micro_batch": self.max_micro_batch,
                "memory_model": asdict(self.memory_model) if self.memory_model else None,
                "device_memory_bytes": self.device_memory_bytes, "usable_bytes": self.usable_bytes,
                "headroom_bytes": self.headroom_bytes, "runs": [asdict(r) for r in self.runs],
                "notes": list(self.notes), "seconds": self.seconds}

    def plot(self, path) -> None:
        plot_memory(path, self.runs, self.memory_model, self.usable_bytes, self.headroom_bytes,
                    self.max_micro_batch, title=f"autoaccum estimate for {format_bytes(self.device_memory_bytes)}")


def estimate(model: nn.Module, sample: Any, *, optimizer=None, loss_fn: LossFn | None = None,
             amp_dtype: torch.dtype | None = None, count_fn=None, device_memory: int | str = "80GiB",
             max_micro_batch: int | None = None, context_bytes: int | str | None = None,
             workspace_bytes: int | str | None = None, headroom: int | str | None = None,
             max_runs: int = 8, accum_dtype: torch.dtype | str | None = "auto",
             master_weights: bool = False, device_kind: str = "cuda") -> Estimate:
    """Predict the largest micro-batch for a GPU with ``device_memory`` bytes, allocating nothing.

    ``model`` may live anywhere, the meta device included (build big models under
    ``torch.device("meta")`` to size them on a laptop); ``optimizer`` only lends its class and
    hyperparameters. ``sample`` is as in :func:`autoaccum.probe` (meta tensors work too);
    ``accum_dtype``/``master_weights`` as in :func:`autoaccum.fit`. ``device_kind="cuda"`` models
    a GPU: the caching allocator's 512-byte rounding, each micro-batch's copy from the host, a cuBLAS
    workspace and the CUDA context (``workspace_bytes``/``context_bytes``, default 32 and 512 MiB);
    ``"cpu"`` sizes a device where the data already lives and none of that applies (both default 0).
    """
    started = time.perf_counter()
    amp, accum = check_step_arguments(model, amp_dtype, loss_fn, count_fn, accum_dtype, master_weights,
                                      allow_meta=True)
    check_optimizer(optimizer, model.parameters())
    cap = DEFAULT_MAX_MICRO_BATCH if max_micro_batch is None else max_micro_batch
    check_positive_int("max_micro_batch", cap)
    check_positive_int("max_runs", max_runs)
    if device_kind not in DEVICE_KINDS:
        raise ValueError(f"device_kind must be 'cuda' (a GPU) or 'cpu'; got {device_kind!r}")
    cuda = device_kind == "cuda"
    total = parse_bytes(device_memory, "device_memory")
    context = parse_bytes(context_bytes if context_bytes is not None else "512MiB" if cuda else 0,
                          "context_bytes", allow_zero=True)
    workspace = parse_bytes(workspace_bytes if workspace_bytes is not None else "32MiB" if cuda else 0,
                            "workspace_bytes", allow_zero=True)
    fixed_headroom = parse_bytes(headroom, "headroom", allow_zero=True) if headroom is not None else None
    usable = total - context
    if usable <= 0:
        raise ValueError(f"device_memory={device_memory!r} leaves nothing after the CUDA context "
                         f"({format_bytes(context)}); pass a larger device_memory or a smaller context_bytes")
    make_real, _ = sample_factory(sample)
    dry_run = _DryRun(model, optimizer, make_real, loss_fn, amp, accum, master_weights, workspace, cuda)
    best, runs, mem_model, head = dry_run.search(usable, cap, fixed_headroom, max_runs)
    if cuda:
        notes = [f"fake CPU dry runs; modelled CUDA: 512-byte block rounding, each micro-batch's copy from the "
                 f"host, {format_bytes(workspace)} cuBLAS workspace, {format_bytes(context)} CUDA context outside "
                 f"the allocator",
                 "not modelled: allocator fragmentation (covered by the headroom), cuDNN workspaces, "
                 "CUDA-only kernels and autocast differences between CPU and CUDA"]
    else:
        notes = ["fake CPU dry runs sized for the CPU: live tensor bytes, no rounding, data already in memory"]
    if optimizer is None:
        notes.append("no optimizer: its state and step are not counted")
    return Estimate(max_micro_batch=best, memory_model=mem_model, device_memory_bytes=total,
                    usable_bytes=usable, headroom_bytes=head, runs=runs, notes=notes,
                    seconds=time.perf_counter() - started, dry_run=dry_run)


class _DryRun:
    """The training step on a fake copy of the model, measured by a tracker: nothing is allocated.
    It stays usable after the search, so :meth:`Estimate.peak_bytes` runs one at any size."""

    def __init__(self, model, optimizer, make_real, loss_fn, amp, accum, master_weights, workspace, cuda):
        from torch._subclasses.fake_tensor import FakeTensorMode  # heavy; only the estimator needs it
        self.mode = FakeTensorMode(allow_non_fake_inputs=True)   # sample(n) may slice real data
        fake_model, fake_of = _fake_copy(model, self.mode)
        fake_opt = _fake_optimizer(optimizer, fake_of, self.mode, cuda) if optimizer is not None else None
        mode = self.mode

        def make_batch(n: int):
            return batching.map_leaves(make_real(n), lambda t: _fake_like(torch.as_tensor(t), mode))

        def to_device(batch):
            return batching.map_leaves(batch, torch.clone)   # the host-to-device copy, counted as on a GPU

        grad_buffer = None
        if accum is not None:
            with self.mode:
                grad_buffer = GradBuffer(list(fake_model.parameters()), accum)
        held = list(fake_model.parameters()) + list(fake_model.buffers())
        held += list(grad_buffer.flat.values()) if grad_buffer is not None else []
        self.tracker = LiveBytes(held, extra_bytes=workspace, round_to=ROUND_CUDA if cuda else 1)
        self.runner = TrialRunner(fake_model, fake_opt, make_batch, loss_fn, amp, torch.device("cpu"),
                                  TrackerMeter(self.tracker), grad_buffer, Updater(master_weights),
                                  move=to_device if cuda else (lambda batch: batch))
        self._peaks: dict[int, Trial] = {}
        self.cuda = cuda

    def search(self, usable: int, cap: int, fixed_headroom: int | None, max_runs: int):
        return self._within(lambda: search(self._remembered, usable, cap, headroom=fixed_headroom,
                                           allocator=self.cuda, max_trials=max_runs))

    def __call__(self, n: int) -> Trial:
        return self._peaks[n] if n in self._peaks else self._within(lambda: self._remembered(n))

    def _remembered(self, n: int) -> Trial:
        trial = self.runner(n)
        self._peaks[n] = trial
        return trial

    def _within(self, fn):
        """Run under the fake mode and the tracker, leaving every random stream as it was
        (``sample(n)`` and the model may draw random numbers)."""
        streams = rng.capture()
        try:
            with self.mode, self.tracker:
                return fn()
        except Exception as e:
            if type(e).__name__ in ("DataDependentOutputException", "DynamicOutputShapeException",
                                    "UnsupportedOperatorException"):
                raise RuntimeError(f"estimate cannot dry-run this model on fake tensors ({type(e).__name__}: {e}); "
                                   f"its forward depends on tensor values. Use autoaccum.probe on the device") from e
            raise
        finally:
            rng.restore(streams)


def _fake_like(t: torch.Tensor, mode) -> torch.Tensor:
    """A fake CPU tensor with ``t``'s shape, strides and dtype (``t`` may be real, CUDA or meta)."""
    with mode:
        return torch.empty_strided(tuple(t.shape), tuple(t.stride()), dtype=t.dtype, device="cpu")


def _fake_copy(model: nn.Module, mode) -> tuple[nn.Module, dict[int, torch.Tensor]]:
    """Deep-copy the module structure, substituting fake tensors for every parameter and buffer."""
    memo: dict[int, Any] = {}
    fake_of: dict[int, torch.Tensor] = {}
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in memo:
            continue
        fake = _fake_like(t, mode)
        if isinstance(t, nn.Parameter):
            fake = nn.Parameter(fake, requires_grad=t.requires_grad)
        memo[id(t)] = fake
        fake_of[id(t)] = fake
    return copy.deepcopy(model, memo), fake_of


def _fake_optimizer(optimizer, fake_of: dict[int, torch.Tensor], mode, cuda: bool):
    """``optimizer``'s class and hyperparameters over the fake parameters. torch.optim picks its
    implementation by device: left to choose (``foreach=None``), it loops tensor by tensor on the
    CPU but runs the ``foreach`` kernels on CUDA, whose temporaries span every parameter at once
    (on a wide MLP the step's peak differs by the largest weight's size). Modelling a GPU, the fake
    optimizer is told to take CUDA's path."""
    groups = []
    for g in optimizer.param_groups:
        params = [fake_of[id(p)] for p in g["params"] if id(p) in fake_of]
        if not params:
            continue
        group = {**{k: v for k, v in g.items() if k != "params"}, "params": params}
        if cuda and _defaults_to_foreach_on_cuda(group):
            group["foreach"] = True
        groups.append(group)
    try:
        with mode:
            return type(optimizer)(groups)
    except Exception as e:
        raise TypeError(f"estimate could not rebuild {type(optimizer).__name__} over fake parameters ({e}); "
                        f"pass an optimizer whose constructor takes param groups, or optimizer=None") from e


def _defaults_to_foreach_on_cuda(group: dict) -> bool:
    """Would torch.optim take its ``foreach`` path for this group on CUDA (``_default_to_fused_or_foreach``;
    torch leaves it off for a Tensor ``lr`` without ``capturable``, which ``foreach=True`` rejects)?"""
    return ("foreach" in group and group["foreach"] is None and not group.get("fused")
            and not group.get("differentiable")
            and not (isinstance(group.get("lr"), torch.Tensor) and not group.get("capturable")))
