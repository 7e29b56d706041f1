"""One micro-batch's loss: call the user's ``loss_fn`` (or the model) under autocast, check the result.

Shared by the trainer and the memory probe, so a probe trial runs exactly what training runs.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

LossFn = Callable[[nn.Module, Any], torch.Tensor]


def autocast(device: torch.device, amp_dtype: torch.dtype | None):
    """Autocast to ``amp_dtype``; with None, off - and no context at all unless a caller's is on,
    so a plain fp32 step pays for no context manager per micro-batch."""
    return autocast_or_none(device, amp_dtype) or contextlib.nullcontext()


def autocast_or_none(device: torch.device, amp_dtype: torch.dtype | None):
    """:func:`autocast`, or None where it would be a ``nullcontext`` (then a loop need not enter it)."""
    if amp_dtype is not None:
        return torch.autocast(device.type, dtype=amp_dtype)
    if torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return None


def compute_loss(model: nn.Module, part: Any, loss_fn: LossFn | None, device: torch.device,
                 amp_dtype: torch.dtype | None, index: int = 0, *, context=None) -> torch.Tensor:
    """The checked scalar mean loss of micro-batch ``index`` (``part`` already on ``device``).
    ``context``: ``autocast(device, amp_dtype)`` made once by a caller that runs many micro-batches."""
    with context if context is not None else autocast(device, amp_dtype):
        out = call_loss(model, part, loss_fn)
    return checked(out, index, loss_fn is None)


def call_loss(model: nn.Module, part: Any, loss_fn: LossFn | None) -> Any:
    """``loss_fn(model, part)``, or the model's own loss; unchecked (see :func:`checked`)."""
    return loss_fn(model, part) if loss_fn is not None else model_loss(model, part)


def checked(out: Any, index: int, from_model: bool) -> torch.Tensor:
    """``out`` as the scalar loss of micro-batch ``index``, or an error that says what is wrong."""
    if type(out) is torch.Tensor and out.dim() == 0 and out.requires_grad and out.is_floating_point():
        return out                 # the common case, checked in one line
    return check_loss(out, index, from_model)


def model_loss(model: nn.Module, part: Any) -> torch.Tensor:
    """The loss a model computes itself (``loss_fn=None``): ``output.loss`` or ``output["loss"]``."""
    if isinstance(part, Mapping):
        out = model(**part)
    elif isinstance(part, (tuple, list)) and not hasattr(part, "_fields"):
        if _keyword_model(model):
            raise TypeError(
                f"loss_fn is None and the micro-batch is a {type(part).__name__}, but {type(model).__name__} (a "
                f"Hugging Face model) takes keyword arguments: model(*micro_batch) would put the second tensor "
                f"into its second parameter, not attention_mask or labels. Give batches as dicts "
                f"(input_ids=..., attention_mask=..., labels=...), or pass loss_fn")
        out = model(*part)
    else:
        out = model(part)
    if isinstance(out, Mapping) and "loss" in out:
        return out["loss"]
    if not isinstance(out, Mapping) and getattr(out, "loss", None) is not None:
        return out.loss
    raise TypeError(
        f"loss_fn is None, so autoaccum uses the loss the model returns, but model(micro_batch) returned "
        f"{type(out).__name__} without a 'loss'; return an object with .loss or a dict with 'loss', "
        f"or pass loss_fn=lambda model, micro_batch: <mean loss over the micro-batch's items>")


def check_loss(loss: Any, index: int, from_model: bool) -> torch.Tensor:
    source = "the model's loss" if from_model else "loss_fn"
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"{source} returned {type(loss).__name__} for micro-batch {index}; it must return "
                        f"a scalar tensor: the mean loss over the micro-batch's items")
    if loss.numel() != 1:
        raise ValueError(f"{source} returned a tensor of shape {tuple(loss.shape)} for micro-batch {index}; "
                         f"it must be a scalar: the MEAN loss over the micro-batch's items (e.g. .mean())")
    if not loss.is_floating_point():
        raise TypeError(f"{source} returned a {loss.dtype} tensor for micro-batch {index}; a loss must be "
                        f"floating point")
    if not loss.requires_grad:
        raise ValueError(f"{source} returned a tensor that does not require grad for micro-batch {index}: "
                         f"it was computed under torch.no_grad(), detached, or from frozen parameters only; "
                         f"compute it from the model's output with autograd enabled")
    return loss if loss.dim() == 0 else loss.reshape(())   # no extra graph node for a 0-dim loss


class WeightedLoss:
    """The step's loss ``sum(share_i * loss_i)`` in few ops.

    On the CPU each loss is read as a Python float at once (no device to wait for) and the sum
    is exact to float64 (``math.fsum``). Elsewhere, detached losses are kept and summed at the
    end (one multi-tensor multiply, one float64 sum), instead of two ops per micro-batch: nothing
    waits for the device. A loss that owns a large storage (CPU ``mse_loss`` reduces in place in
    its elementwise buffer) is folded in at once, so that memory does not live into the next
    micro-batch."""

    KEEP_BYTES = 64

    def __init__(self, device: torch.device):
        self.host = device.type == "cpu"
        self.device = device
        self.values: list[float] = []       # on the CPU: share_i * loss_i
        self.losses: list[torch.Tensor] = []
        self.shares: list[float] = []
        self.folded: torch.Tensor | None = None

    def add(self, loss: torch.Tensor, share: float) -> None:
        if self.host:
            self.values.append(loss.item() * share)
            return
        try:
            small = loss.untyped_storage().nbytes() <= self.KEEP_BYTES
        except (RuntimeError, NotImplementedError, AttributeError):   # a tensor subclass without one storage
            small = False
        if small:
            self.losses.append(loss.detach())
            self.shares.append(share)
            return
        if self.folded is None:
            self.folded = torch.zeros((), dtype=torch.float64, device=loss.device)
        self.folded.add_(loss.detach(), alpha=share)

    def total(self) -> torch.Tensor | float:
        """The weighted sum in float64: a float on the CPU, else a 0-dim tensor (0 when nothing was added)."""
        if self.host:
            try:
                return math.fsum(self.values)
            except (ValueError, OverflowError):   # inf - inf (nan), or partial sums past float64's range
                return sum(self.values)
        total = self.folded
        if self.losses:
            kept = torch.stack(torch._foreach_mul(self.losses, self.shares)).sum(dtype=torch.float64)
            total = kept if total is None else total + kept
        return total if total is not None else torch.zeros((), dtype=torch.float64, device=self.device)


def _keyword_model(model: nn.Module) -> bool:
    """A Hugging Face model (its forward's parameters after the first are not the batch's fields)."""
    inner = getattr(model, "module", model)
    return hasattr(inner, "config") and hasattr(inner, "main_input_name")

