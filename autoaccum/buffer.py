"""The gradient buffer: one contiguous accumulator per device, a view per parameter.

Autograd adds each micro-batch's gradient into ``.grad`` in the parameter's own dtype, so a bf16
model accumulates in bf16 and small contributions round away (DeepSpeed warns about exactly
this; Megatron keeps an fp32 ``main_grad``). Here a post-accumulate-grad hook takes every fresh
gradient off the parameter, folds ``weight * g`` into the parameter's fp32 view with the fused
``accumulate_`` kernel and lets the low-precision gradient go. The first contribution of a step
*assigns* (no zeroing pass); a parameter that receives no gradient in a step gets none, as with
autograd.

Gradients are folded in buckets of ``bucket_bytes`` (one multi-tensor launch each) and at the end
of every backward, so at most a bucket of low-precision gradients is alive at a time.

The hooks act only inside :meth:`capturing` (the trainer's micro-batches, the probe's trials):
a backward the user runs elsewhere, or another trainer on the same model, sees plain autograd.
They hold the buffer weakly, so a buffer nobody references any more is freed and its hooks go
with it; :meth:`remove` takes them off at once.

At update time ``grads()`` exposes the views: for parameters of the buffer's dtype ``p.grad`` *is*
the view (no copy); lower-precision parameters are handled by the trainer (a cast, or fp32
master weights).
"""
from __future__ import annotations

import contextlib
import weakref

import torch
from torch import nn

from . import kernels
from .kernels.layout import in_memory_order

ALIGN = 16  # elements: 64-byte aligned views for vectorised access


def accumulator_dtype(p: torch.Tensor, dtype: torch.dtype) -> torch.dtype:
    """The buffer's dtype, or the parameter's own where that is wider (a float64 parameter in a
    bf16 model keeps float64 gradients)."""
    return p.dtype if p.dtype.is_floating_point and p.dtype.itemsize > dtype.itemsize else dtype


class GradBuffer:
    def __init__(self, params: list[nn.Parameter], dtype: torch.dtype = torch.float32,
                 bucket_bytes: int = 32 << 20, backend: str | None = None):
        self.params = [p for p in params if p.requires_grad]
        self.dtype = dtype
        self.bucket_bytes = bucket_bytes
        self.backend = backend
        self.views: dict[int, torch.Tensor] = {}
        self.flat: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
        groups: dict[tuple[torch.device, torch.dtype], list[nn.Parameter]] = {}
        for p in self.params:
            groups.setdefault((p.device, accumulator_dtype(p, dtype)), []).append(p)
        for (device, acc_dtype), ps in groups.items():
            offsets, total = [], 0
            for p in ps:
                offsets.append(total)
                total += -(-p.numel() // ALIGN) * ALIGN
            flat = torch.empty(total, dtype=acc_dtype, device=device)  # every view is assigned before it is read
            self.flat[(device, acc_dtype)] = flat
            for p, off in zip(ps, offsets):
                self.views[id(p)] = _view_like(flat, off, p)
        self.weight = 1.0
        self._fresh: set[int] = set()
        self._written: set[int] = set()
        self._pending: list[tuple[torch.Tensor, torch.Tensor, bool]] = []
        self._pending_ids: set[int] = set()
        self._pending_bytes = 0
        self._flush_queued = False
        self.active = False
        ref = weakref.ref(self)

        def hook(p: torch.Tensor) -> None:
            buffer = ref()
            if buffer is not None and buffer.active:
                buffer._on_grad(p)

        self._hooks = [p.register_post_accumulate_grad_hook(hook) for p in self.params]
        self._finalizer = weakref.finalize(self, _remove_hooks, self._hooks)

    @property
    def nbytes(self) -> int:
        return sum(f.numel() * f.element_size() for f in self.flat.values())

    def begin_step(self) -> None:
        """A new optimizer step: the next contribution to every view assigns."""
        self._fresh = {id(p) for p in self.params}
        self._written = set()
        self._pending.clear()
        self._pending_ids.clear()
        self._pending_bytes = 0
        self._flush_queued = False

    @contextlib.contextmanager
    def capturing(self):
        """Within this block every fresh gradient of the buffer's parameters folds into it."""
        previous, self.active = self.active, True
        try:
            yield self
        finally:
            self.active = previous

    def _on_grad(self, p: torch.Tensor) -> None:
        g = p.grad
        p.grad = None
        if g is None:
            return
        if id(p) in self._pending_ids:
            self.flush()   # a second gradient for p in one backward (reentrant checkpointing + sharing)
        assign = id(p) in self._fresh
        self._fresh.discard(id(p))
        self._written.add(id(p))
        self._pending.append((self.views[id(p)], g, assign))
        self._pending_ids.add(id(p))
        self._pending_bytes += g.numel() * g.element_size()
        if not self._flush_queued:
            self._flush_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)
        if self._pending_bytes >= self.bucket_bytes:
            self.flush()

    def _end_of_backward(self) -> None:
        self._flush_queued = False
        self.flush()

    def flush(self) -> None:
        """Fold every pending gradient into its view: one launch per (assign or add, device, dtype)."""
        if not self._pending:
            return
        launches: dict[tuple, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for v, g, assign in self._pending:
            launches.setdefault((assign, v.device, v.dtype), []).append((v, g))
        for (assign, _, _), pairs in launches.items():
            kernels.accumulate_([v for v, _ in pairs], [g for _, g in pairs], self.weight, assign=assign,
                                backend=self.backend)
        self._pending.clear()
        self._pending_ids.clear()
        self._pending_bytes = 0

    def written(self) -> list[tuple[nn.Parameter, torch.Tensor]]:
        """(parameter, view) for every parameter that received a gradient this step."""
        self.flush()
        return [(p, self.views[id(p)]) for p in self.params if id(p) in self._written]

    def mark_written(self, params: list[nn.Parameter]) -> None:
        """After a cross-rank sum: these views hold gradients now, whichever rank produced them."""
        self._written = {id(p) for p in params}
        self._fresh -= self._written

    def discard_step(self) -> None:
        """Forget this step's accumulation (after an error): nothing pending, nothing written."""
        self._pending.clear()
        self._pending_ids.clear()
        self._pending_bytes = 0
        self._flush_queued = False   # a backward that raised never runs its end-of-backward callback
        self._written = set()
        self._fresh = {id(p) for p in self.params}

    def remove(self) -> None:
        """Take the hooks off the parameters now (they also go when the buffer is freed)."""
        self._finalizer()


def _view_like(flat: torch.Tensor, offset: int, p: torch.Tensor) -> torch.Tensor:
    """``p``'s slot in ``flat``, laid out as autograd lays out ``p.grad``: with ``p``'s strides when
    ``p`` is dense (channels_last...), else contiguous. Fused optimizers read a parameter and its
    gradient as flat memory, so the two layouts must agree."""
    if not p.is_contiguous() and in_memory_order(p) is not None:
        return flat.as_strided(p.shape, p.stride(), flat.storage_offset() + offset)
    return flat[offset:offset + p.numel()].view(p.shape)


def _remove_hooks(hooks: list) -> None:
    for h in hooks:
        h.remove()
    hooks.clear()
