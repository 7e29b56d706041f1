"""What a micro-batch's loss averages over: the items that weight it in the step.

Exactness needs every micro-batch weighted by the items its mean loss was taken over. Public
count functions for ``fit(count_fn=...)``:

``samples``
    every sample counts one (losses averaged over samples; the default with a ``loss_fn``).
``labels(ignore_index=-100, shift=False, key="labels")``
    positions whose label is not ignored; ``shift=True`` for causal language models, whose loss
    predicts token t+1 from tokens up to t and so never scores the first label of a sequence.

With neither ``loss_fn`` nor ``count_fn``, the model computes its own loss, and a batch that is a
mapping with integer ``labels`` is counted by :func:`rule_for`: the labels the model's loss
averages over, shifted for causal language models (Hugging Face's ``loss_type``, or its default,
``ForCausalLM``). :func:`verify` checks that rule on the first micro-batch against the model's
own loss (one extra forward in eval mode, under ``no_grad``, random streams untouched) and falls
back to the other shift, or to samples with a warning, when the loss is not that mean.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .batch import batch_size, to_device
from .memory import is_oom_error, release_memory
from .warn import warn

log = logging.getLogger("autoaccum")

IGNORE_INDEX = -100


def samples(micro_batch: Any) -> int:
    """One item per sample (the rows of the micro-batch's tensors)."""
    return batch_size(micro_batch)


class labels:
    """Count the positions of ``micro_batch[key]`` whose label is not ``ignore_index``; with
    ``shift`` the first position of every sequence is left out (causal language models)."""

    def __init__(self, ignore_index: int = IGNORE_INDEX, shift: bool = False, key: str = "labels"):
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise TypeError(f"ignore_index must be an int (Hugging Face uses -100); got {ignore_index!r}")
        if not isinstance(shift, bool):
            raise TypeError(f"shift must be True (causal language models) or False; got {shift!r}")
        self.ignore_index, self.shift, self.key = ignore_index, shift, key

    def __call__(self, micro_batch: Any) -> torch.Tensor:
        if not isinstance(micro_batch, Mapping) or self.key not in micro_batch:
            raise TypeError(f"count.labels counts micro_batch[{self.key!r}], but the micro-batch is "
                            f"{type(micro_batch).__name__} without that key; pass count_fn= for this batch")
        target = micro_batch[self.key]
        if self.shift:
            target = target[..., 1:]
        return (target != self.ignore_index).sum()

    def __repr__(self) -> str:
        return f"labels(ignore_index={self.ignore_index}, shift={self.shift}, key={self.key!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, labels) and (self.ignore_index, self.shift, self.key) == (
            other.ignore_index, other.shift, other.key)

    def __hash__(self) -> int:
        return hash((self.ignore_index, self.shift, self.key))


def has_labels(micro_batch: Any) -> bool:
    """A mapping whose ``labels`` are an integer tensor (token or class ids, -100 where ignored)."""
    if not isinstance(micro_batch, Mapping):
        return False
    target = micro_batch.get("labels")
    return isinstance(target, torch.Tensor) and not target.is_floating_point() and target.dtype != torch.bool


def causal(model: nn.Module) -> bool:
    """Does the model's own loss shift its labels? Hugging Face models say so in ``loss_type``
    (``ForCausalLM``; an unknown or missing one defaults to it); anything else is not assumed to."""
    m = _unwrap(model)
    if not hasattr(m, "loss_function") or not hasattr(m, "config"):
        return type(m).__name__.endswith(("ForCausalLM", "LMHeadModel"))
    if getattr(m.config, "is_encoder_decoder", False):
        return False               # seq2seq models shift the decoder's inputs, not the labels
    loss_type = getattr(m, "loss_type", None)
    return loss_type in (None, "ForCausalLM") or type(m).__name__.endswith(("ForCausalLM", "LMHeadModel"))


def rule_for(model: nn.Module, micro_batch: Any) -> labels | None:
    """The count the model's own loss implies for this batch, or None (samples)."""
    if not has_labels(micro_batch):
        return None
    target = micro_batch["labels"]
    return labels(shift=causal(model) and target.dim() >= 2)


def verify(model: nn.Module, micro_batch: Any, rule: labels) -> tuple[labels | None, str, bool]:
    """Check ``rule`` against the model's own loss on ``micro_batch``: the mean cross-entropy of its
    logits over the counted positions must equal the loss it returns. Returns ``(rule, why, settled)``:
    the rule that matches (``rule``, or the other shift) or None (neither: count samples), a sentence
    saying what was found, and whether this micro-batch could tell at all (it cannot when it has
    no counted label or its loss is not finite; the caller then keeps ``rule`` and asks again).

    The forward runs once, in eval mode (no dropout, no BatchNorm update), under ``no_grad``, with
    every random stream forked, so training is not disturbed; the cross-entropy is taken in
    float32 (float64 for a float64 model), as the model's own loss is."""
    if int(rule(micro_batch)) == 0:
        return rule, "its first micro-batch has no counted label to check against", False
    m = _unwrap(model)
    modes = [(mod, mod.training) for mod in m.modules()]
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=_cuda_devices(m)):
            m.eval()
            out = m(**micro_batch)
    finally:
        for mod, training in modes:
            mod.training = training
    loss = out.get("loss") if isinstance(out, Mapping) else getattr(out, "loss", None)
    logits = out.get("logits") if isinstance(out, Mapping) else getattr(out, "logits", None)
    if not isinstance(loss, torch.Tensor) or not isinstance(logits, torch.Tensor):
        return rule, "the model returns no loss and logits to check the count against; counting as its class implies", True
    found = loss.detach().double().item()
    if not math.isfinite(found):
        return rule, "its loss on the first micro-batch is not finite", False
    target = micro_batch["labels"].to(logits.device)
    for candidate in (rule, labels(rule.ignore_index, not rule.shift, rule.key)):
        mean = _mean_cross_entropy(logits, target, candidate)
        if mean is not None and math.isclose(mean, found, rel_tol=1e-4, abs_tol=1e-6):
            return candidate, f"the model's loss ({found:.6g}) is the mean over {candidate}", True
    return None, (f"the model's loss ({found:.6g}) is not the mean cross-entropy over its labels, shifted or not; "
                  f"counting samples"), True


def _mean_cross_entropy(logits: torch.Tensor, target: torch.Tensor, rule: labels) -> float | None:
    """The mean cross-entropy over ``rule``'s positions, or None where it is not defined (shapes that do
    not line up, labels out of range: another ignore value, or not class ids at all)."""
    if rule.shift:
        if logits.dim() < 3 or target.dim() < 2:
            return None
        logits, target = logits[..., :-1, :], target[..., 1:]
    if logits.shape[:-1] != target.shape:
        return None
    kept = target != rule.ignore_index
    if not bool(kept.any()) or int(target[kept].min()) < 0 or int(target[kept].max()) >= logits.shape[-1]:
        return None
    wide = logits.detach()
    wide = wide if wide.dtype == torch.float64 else wide.float()
    return nn.functional.cross_entropy(wide.reshape(-1, wide.shape[-1]), target.reshape(-1),
                                       ignore_index=rule.ignore_index).item()


def choose(model: nn.Module, loss_fn, parts: list, device: torch.device, *, checkable: bool = True
           ) -> tuple[Any, bool]:
    """What a trainer without ``count_fn`` counts: ``(count_fn or None for samples, settled)``.

    A model computing its own loss over ``labels`` is counted by the positions that loss averages
    over, checked against it on the first micro-batch of ``parts`` that can tell (``checkable``
    False, as under FSDP2 whose forward all-gathers, trusts the model's class); until a check
    settles it the class's rule is used and the caller asks again on its next batch. A ``loss_fn``
    of the user's over a batch with ignored labels gets a warning that samples are counted."""
    first = parts[0]
    if loss_fn is not None:
        if ignored_labels(first):
            warn("the batch's labels have ignored positions (-100) but count_fn is not set, so every "
                 "sample counts one item; if loss_fn averages over tokens, pass "
                 "count_fn=autoaccum.count.labels() (shift=True for a causal LM)")
        return None, True
    rule = rule_for(model, first)
    if rule is None:
        log.info("autoaccum: counting samples as the items of each micro-batch")
        return None, True
    if not checkable:
        found, why, settled = rule, "the model's class says so; not checked (its forward communicates)", True
    else:
        part = next((p for p in parts if int(rule(p)) > 0), first)
        try:
            found, why, settled = verify(model, to_device(part, device), rule)
        except Exception as e:  # noqa: BLE001 - an OOM in the check: keep the class's rule unchecked
            if not is_oom_error(e):
                raise
            release_memory(device)
            found, why, settled = rule, "not checked: the check's forward ran out of memory", True
    if found is None:
        warn(f"autoaccum: {why}: the micro-batches are weighted by samples, which is exact only if the loss "
             f"is a mean over samples; pass count_fn= to say what the loss averages over")
    elif settled:
        log.info("autoaccum: counting %s as the items of each micro-batch (%s)", found, why)
    return found, settled


def ignored_labels(micro_batch: Any, ignore_index: int = IGNORE_INDEX) -> bool:
    """Does the batch carry labels with ignored positions (so counting samples is likely wrong)?"""
    return has_labels(micro_batch) and bool((micro_batch["labels"] == ignore_index).any())


def _unwrap(model: nn.Module) -> nn.Module:
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def _cuda_devices(model: nn.Module) -> list[int]:
    return sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
