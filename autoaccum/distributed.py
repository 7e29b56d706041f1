"""Data parallelism on torch.distributed: who takes part, when gradients sync, where ranks agree.

A model wrapped in ``DistributedDataParallel`` or sharded with FSDP2's ``fully_shard`` declares
data parallelism; its process group gives the world size. Every collective autoaccum issues is
an *agreement point* that every rank reaches whatever happened to it, so one rank's bad batch or
out-of-memory error never leaves the others waiting in a collective:

* before the first forward: the item counts (SUM) and whether any rank rejected its batch; then
  DDP's broadcast of module buffers (BatchNorm statistics) from rank 0, which DDP itself would
  run inside the first forward of the step, where one rank's OOM would leave the others waiting;
* after the micro-batches (and, where the model itself communicates inside forward/backward -
  SyncBatchNorm, or DDP's overlapped all-reduce - before and after each one): did any rank fail,
  and the micro-batch each proposes (MIN); the gradients it touched;
* DDP, ``sync="deferred"`` (the default): every micro-batch runs under ``no_sync()``; after the
  agreement, the fp32 gradient buffer is all-reduced in buckets. No collective runs inside a
  forward or backward, so an OOM anywhere is recoverable on every rank.
* DDP, ``sync="overlap"``: DDP's own bucketed all-reduce overlaps the last micro-batch's
  backward; an OOM inside that last micro-batch cannot be recovered collectively.
* FSDP2: ``set_requires_gradient_sync`` only for the last micro-batch; FSDP2 all-gathers inside
  every forward, so an OOM under FSDP2 is reported, not retried.
"""
from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from . import exit_guard
from .checks import resolve_accum_dtype

SYNC_MODES = ("deferred", "overlap")
BUCKET_BYTES = 25 << 20   # DDP's default bucket size

_NO_CONTEXT = contextlib.nullcontext()   # reusable: nullcontext keeps no state


class PeerFailure(RuntimeError):
    """Another rank failed this step (not out of memory); this rank stops with it."""


@dataclass
class Agreement:
    failed: int            # 0 ok, 1 out of memory somewhere, 2 another error somewhere
    proposal: int          # the smallest micro-batch any rank proposes
    touched: torch.Tensor | None = None   # per parameter: 1 if any rank produced a gradient


def _fsdp_module_type():
    try:
        from torch.distributed.fsdp import FSDPModule
        return FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return None


class Topology:
    """How this process takes part in data parallelism: alone, under DDP, or under FSDP2."""

    def __init__(self, model: nn.Module, sync: str = "deferred"):
        if sync not in SYNC_MODES:
            raise ValueError(f"sync must be one of {SYNC_MODES}; got {sync!r}")
        fsdp = _fsdp_module_type()
        self.model = model
        self.sync = sync
        self.group = None
        if isinstance(model, nn.parallel.DistributedDataParallel):
            self.kind = "ddp"
            self.group = model.process_group
            self.module = model.module
        elif fsdp is not None and isinstance(model, fsdp):
            self.kind = "fsdp2"
            self.module = model
        else:
            self.kind = "single"
            self.module = model
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                raise ValueError(
                    f"a process group of {dist.get_world_size()} ranks is initialised but the model is neither "
                    f"DistributedDataParallel nor FSDP2 (fully_shard): wrap it, e.g. "
                    f"DistributedDataParallel(model), so the ranks share one effective batch; to train "
                    f"independent copies, create the trainer before init_process_group")
        if self.kind != "single":
            self.world_size = dist.get_world_size(self.group)
            self.rank = dist.get_rank(self.group)
            backend = dist.get_backend(self.group)
            self.comm_device = (torch.device("cuda", torch.cuda.current_device()) if backend == "nccl"
                                else torch.device("cpu"))
        else:
            self.world_size, self.rank, self.comm_device = 1, 0, torch.device("cpu")
        self.allreduces = 0   # collectives issued for gradients (tests count them)
        # DDP broadcasts buffers from rank 0 in the forward after a synchronised backward; we do it
        # at the start of each step instead, outside any forward (see sync_module_buffers).
        self.broadcasts_buffers = (self.kind == "ddp" and bool(model.broadcast_buffers)
                                   and any(True for _ in self._ddp_buffers()))
        self.lockstep = self.kind == "ddp" and (
            sync == "overlap" or any(isinstance(m, nn.SyncBatchNorm) for m in self.module.modules()))

    # ------------------------------------------------------------------ properties of the setup
    @property
    def distributed(self) -> bool:
        return self.kind != "single"

    @property
    def loss_factor(self) -> float:
        """DDP's own all-reduce and FSDP2's reduce-scatter average over ranks; our weights already
        are global fractions, so the loss is multiplied back by the world size."""
        return float(self.world_size) if self.shards_gradients or self.overlaps else 1.0

    @property
    def syncs_buffer(self) -> bool:
        """autoaccum all-reduces the gradient buffer itself (DDP, deferred)."""
        return self.kind == "ddp" and self.sync == "deferred"

    @property
    def communicates_in_model(self) -> bool:
        """The model's own forward/backward run collectives (lockstep DDP, FSDP2), so every rank
        must run the same micro-batches."""
        return self.lockstep or self.shards_gradients

    def buffer_dtype(self, accum_dtype: Any, params: list[torch.Tensor]) -> torch.dtype | None:
        """The gradient buffer's dtype under this setup. DDP with deferred sync needs one (it is what
        gets all-reduced); FSDP2 keeps its own sharded gradients, so it cannot have one; DDP overlap
        all-reduces autograd's ``.grad``, so it has none either."""
        accum = resolve_accum_dtype(accum_dtype, params)
        auto = isinstance(accum_dtype, str) and accum_dtype == "auto"
        if self.shards_gradients:
            if accum is not None and not auto:
                raise ValueError("FSDP2 keeps its own sharded gradients, so accum_dtype must be 'auto' or None; for "
                                 "fp32 gradient reduction use MixedPrecisionPolicy(reduce_dtype=torch.float32)")
            return None
        if self.syncs_buffer and accum is None:
            if accum_dtype is None:
                raise ValueError("DDP with sync='deferred' all-reduces autoaccum's gradient buffer, so accum_dtype "
                                 "cannot be None; leave it 'auto' or use sync='overlap'")
            trainable = [p for p in params if p.requires_grad]
            accum = torch.float64 if all(p.dtype == torch.float64 for p in trainable) else torch.float32
        if self.overlaps and accum is not None:
            if auto:
                return None   # DDP reduces .grad in the parameters' dtype; README says when that matters
            raise ValueError("DDP with sync='overlap' all-reduces autograd's .grad inside the last backward, so "
                             "there is no gradient buffer: use sync='deferred' for an fp32 buffer, or accum_dtype='auto'")
        return accum

    @property
    def wrapper(self) -> str:
        """The wrapper's name, for messages: "DDP", "FSDP2" or "single process"."""
        return {"ddp": "DDP", "fsdp2": "FSDP2"}.get(self.kind, "single process")

    @property
    def overlaps(self) -> bool:
        """DDP all-reduces inside the last micro-batch's backward (``sync="overlap"``)."""
        return self.kind == "ddp" and self.sync == "overlap"

    def collective_in_flight(self, last: bool, forward_started: bool) -> bool:
        """After a failure: could another rank be waiting in a collective of the model's own (FSDP2
        anywhere; DDP's overlapped all-reduce once the last micro-batch's forward began)? Then no
        agreement point can be reached."""
        return self.shards_gradients or (self.overlaps and last and forward_started)

    @property
    def shards_gradients(self) -> bool:
        """Each rank holds a shard of every gradient (FSDP2): norms are sums over ranks."""
        return self.kind == "fsdp2"

    @property
    def recovers_oom(self) -> bool:
        """An OOM can be retried: every rank can be brought to an agreement point (not under FSDP2,
        whose all-gathers in every forward cannot be rewound)."""
        return not self.shards_gradients

    # ------------------------------------------------------------------ gradient sync control
    def micro_batch(self, last: bool):
        """Run one micro-batch with the right gradient synchronisation (nothing to do in one process)."""
        return self._synced_micro_batch(last) if self.kind in ("ddp", "fsdp2") else _NO_CONTEXT

    @contextlib.contextmanager
    def _synced_micro_batch(self, last: bool):
        if self.kind == "ddp":
            broadcast, self.model.broadcast_buffers = self.model.broadcast_buffers, False
            try:
                if self.sync == "overlap" and last:
                    yield
                else:
                    with self.model.no_sync():
                        yield
            finally:
                self.model.broadcast_buffers = broadcast
        else:
            self.model.set_requires_gradient_sync(last)
            try:
                yield
            finally:
                self.model.set_requires_gradient_sync(True)

    # ------------------------------------------------------------------ agreement points
    def agree_batch(self, local_items: float, rejected: bool, micro_batches: int) -> tuple[float, bool, bool]:
        """One collective before the first forward: the items over all ranks, whether any rank
        rejected its batch, and whether every rank runs the same number of micro-batches (a sum
        of k and of k^2 is enough: they are equal everywhere iff W * sum(k^2) == sum(k)^2)."""
        if not self.distributed:
            return local_items, rejected, True
        k = float(micro_batches)
        t = torch.tensor([local_items, float(rejected), k, k * k], dtype=torch.float64, device=self.comm_device)
        dist.all_reduce(exit_guard.track(t), group=self.group)
        return float(t[0]), bool(t[1] > 0), bool(self.world_size * t[3] == t[2] * t[2])

    def agree(self, failed: int, proposal: int, touched: torch.Tensor | None = None) -> Agreement:
        """Worst outcome (MAX), smallest proposed micro-batch (MIN), union of touched parameters (MAX)."""
        if not self.distributed:
            return Agreement(failed, proposal, touched)
        extra = touched.to(self.comm_device, torch.int64) if touched is not None else torch.zeros(0, dtype=torch.int64,
                                                                                                 device=self.comm_device)
        t = torch.cat([torch.tensor([failed, -proposal], dtype=torch.int64, device=self.comm_device), extra])
        dist.all_reduce(exit_guard.track(t), op=dist.ReduceOp.MAX, group=self.group)
        # a copy: a view would hold ``t``, which exit_guard would take for a collective in flight
        return Agreement(int(t[0]), -int(t[1]), t[2:].clone() if touched is not None else None)

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """In-place SUM over ranks (losses, norms); a no-op alone."""
        if self.distributed:
            mine = t.to(self.comm_device, copy=True)   # no caller holds views of it (see exit_guard)
            dist.all_reduce(exit_guard.track(mine), group=self.group)
            t.copy_(mine)
        return t

    def agree_min(self, value: int) -> int:
        """The smallest ``value`` over ranks: the probed micro-batch every rank can run."""
        if not self.distributed:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=self.comm_device)
        dist.all_reduce(exit_guard.track(t), op=dist.ReduceOp.MIN, group=self.group)
        return int(t[0])

    def unmanaged(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """The trained tensors DDP/FSDP2 do not synchronise: not the wrapped module's (or ignored by DDP)."""
        if not self.distributed:
            return []
        ignored = {id(p) for name, p in self.module.named_parameters()
                   if name in getattr(self.model, "parameters_to_ignore", ())}
        owned = {id(p) for p in self.module.parameters()} - ignored
        return [p for p in params if id(p) not in owned]

    def sync_module_buffers(self) -> None:
        """DDP's buffer broadcast from rank 0, once per step before the first forward (all ranks
        are here after the batch agreement), coalesced per device and dtype."""
        if not self.broadcasts_buffers:
            return
        groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
        for b in self._ddp_buffers():
            groups.setdefault((b.device, b.dtype), []).append(b)
        src = dist.get_global_rank(self.group, 0) if self.group is not None else 0
        with torch.no_grad():
            for bufs in groups.values():
                flat = torch.cat([b.reshape(-1) for b in bufs]).to(self.comm_device)
                dist.broadcast(exit_guard.track(flat), src=src, group=self.group)
                offset = 0
                for b in bufs:
                    b.copy_(flat[offset:offset + b.numel()].view_as(b))
                    offset += b.numel()

    def _ddp_buffers(self):
        ignored = getattr(self.model, "parameters_to_ignore", set())
        return (b for name, b in self.module.named_buffers() if name not in ignored)

    # ------------------------------------------------------------------ deferred DDP gradient sync
    def sync_buffer(self, buffer, params: list[torch.Tensor], touched: torch.Tensor) -> None:
        """DDP, deferred: zero the views of parameters another rank wrote and this one did not
        (``touched``: the union over ranks, from the last agreement), SUM the gradient buffer,
        and mark the union written."""
        mine = {id(p) for p, _ in buffer.written()}
        union = touched.tolist()
        for p, t in zip(params, union):
            if t and id(p) not in mine:
                buffer.views[id(p)].zero_()
        self.all_reduce_buffer(list(buffer.flat.values()))
        buffer.mark_written([p for p, t in zip(params, union) if t])

    def average_unmanaged(self, params: list[torch.Tensor]) -> None:
        """DDP overlap, FSDP2: tensors the optimizer trains that the wrapper does not own (a
        temperature in ``loss_fn``) get no collective from it; average them here (their loss was
        scaled by the world size like everything else), in one all-reduce with has-a-gradient flags."""
        extras = self.unmanaged(params)
        if not extras:
            return
        parts = [(p.grad.detach() if p.grad is not None else torch.zeros_like(p)).reshape(-1).double() for p in extras]
        flags = torch.tensor([p.grad is not None for p in extras], dtype=torch.float64, device=parts[0].device)
        flat = self.sum_(torch.cat([*parts, flags]))
        offset = 0
        for i, p in enumerate(extras):
            n = p.numel()
            if flat[-len(extras) + i] > 0:
                p.grad = (flat[offset:offset + n] / self.world_size).view_as(p).to(p.dtype)
            offset += n

    def all_reduce_buffer(self, flat_buffers: list[torch.Tensor], bucket_bytes: int = BUCKET_BYTES) -> int:
        """SUM the gradient buffer over ranks in buckets of ``bucket_bytes``; returns the bucket count."""
        handles = []
        for flat in flat_buffers:
            per = max(1, bucket_bytes // flat.element_size())
            for start in range(0, flat.numel(), per):
                handles.append(dist.all_reduce(exit_guard.track(flat[start:start + per]), group=self.group,
                                               async_op=True))
        for h in handles:
            h.wait()
        self.allreduces += len(handles)
        return len(handles)


class PeerStopped(BaseException):
    """Raised in the pre-forward hook when another rank reported a failure: this micro-batch ends
    here, before the model's collectives the failed rank will not join. (A BaseException, so a
    broad ``except Exception`` in a ``loss_fn`` does not swallow it.)"""


class PreForward:
    """In lockstep: an agreement right before each forward of the DDP module, as a forward pre-hook
    that runs ahead of DDP's own (which may broadcast or rebuild buckets). Inert unless armed."""

    def __init__(self, model: nn.Module, agree: Callable[[], Agreement] | None):
        self.agree = agree
        self.active = False
        self.forwards = 0                       # forwards begun in the current micro-batch
        self.stopped: Agreement | None = None   # the agreement that reported another rank's failure
        self._handle = None
        if agree is not None:
            me = weakref.ref(self)

            def hook(module, args):
                pre = me()
                if pre is not None and pre.active:
                    pre._meet()
            self._handle = model.register_forward_pre_hook(hook, prepend=True)
            weakref.finalize(self, self._handle.remove)

    def _meet(self) -> None:
        self.forwards += 1
        agreement = self.agree()
        if agreement.failed:
            self.stopped, self.active = agreement, False
            raise PeerStopped()

    def __enter__(self) -> "PreForward":
        """Armed within ``with pre_forward:`` (a plain context manager: entered every step)."""
        self.active, self.stopped, self.forwards = self._handle is not None, None, 0
        return self

    def __exit__(self, *exc) -> None:
        self.active = False

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
