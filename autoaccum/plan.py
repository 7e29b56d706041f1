"""Pure arithmetic: target batch, micro-batch limit and world size -> a balanced split.

Nothing here touches torch, so the plan can be computed (and tested) anywhere.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .checks import MAX_ACCUM_STEPS, check_int, check_positive_int


@dataclass(frozen=True)
class Plan:
    """How one optimizer step of ``target_batch`` samples is run.

    ``micro_batches`` are the sizes one rank runs for a full batch: ``accum_steps`` of them,
    each at most ``micro_batch``, differing by at most one, summing to ``per_rank_batch``.
    Balanced sizes keep the peak memory of every micro-batch the same and, because each
    micro-batch's loss is weighted by its share of the items, they do not change the update.
    """

    target_batch: int
    micro_batch: int
    world_size: int
    accum_steps: int
    micro_batches: list[int]
    notes: tuple[str, ...] = field(default=())

    @property
    def per_rank_batch(self) -> int:
        return self.target_batch // self.world_size

    def check_batch(self, n: int) -> None:
        """A rank's batch for one step may be shorter than its share (the last of an epoch), not longer."""
        if n > self.per_rank_batch:
            raise ValueError(
                f"batch has {n} samples but this rank's share of target_batch={self.target_batch} "
                f"is {self.per_rank_batch}; give step() one optimizer step of samples "
                f"(e.g. DataLoader(batch_size={self.per_rank_batch}))")

    def split(self, n: int) -> list[int]:
        """Sizes for a batch of ``n`` samples on one rank under this plan's micro-batch limit.

        The last batch of an epoch is usually short; it is split with the same limit.
        """
        return balanced_split(n, self.micro_batch)

    def to_dict(self) -> dict:
        return {
            "target_batch": self.target_batch,
            "micro_batch": self.micro_batch,
            "world_size": self.world_size,
            "accum_steps": self.accum_steps,
            "micro_batches": list(self.micro_batches),
            "notes": list(self.notes),
        }

    def __str__(self) -> str:
        sizes = _compact(self.micro_batches)
        ranks = f" x {self.world_size} ranks" if self.world_size > 1 else ""
        noun = "micro-batch" if self.accum_steps == 1 else "micro-batches"
        return (f"target {self.target_batch} = {self.accum_steps} {noun} {sizes}{ranks} "
                f"(micro-batch limit {self.micro_batch})")


def balanced_split(n: int, limit: int) -> list[int]:
    """Split ``n`` samples into the fewest parts of at most ``limit``, sizes differing by at most 1."""
    check_positive_int("n", n, "the number of samples to split")
    check_positive_int("limit", limit, "the largest micro-batch")
    parts = -(-n // limit)          # integer arithmetic: exact for any size (a float division is not)
    if parts > MAX_ACCUM_STEPS:
        raise ValueError(f"{n} samples in micro-batches of at most {limit} would take {parts:,} micro-batches "
                         f"per step; at most {MAX_ACCUM_STEPS:,} are supported: raise the micro-batch")
    base, extra = divmod(n, parts)
    return [base + 1] * extra + [base] * (parts - extra)


def plan(target_batch: int, micro_batch: int, world_size: int = 1) -> Plan:
    """Derive accumulation steps and a balanced micro-batch split for one optimizer step.

    ``target_batch`` is the effective (global) batch; each of ``world_size`` ranks runs
    ``target_batch // world_size`` samples per step in micro-batches of at most ``micro_batch``.
    A ``micro_batch`` larger than the per-rank batch is clamped to it (recorded in ``notes``):
    a limit above what a step needs is not an error, e.g. when the probe finds room for more.
    """
    check_int("target_batch", target_batch, "the effective batch size of one optimizer step")
    check_int("micro_batch", micro_batch, "the largest micro-batch that fits in memory")
    check_int("world_size", world_size, "the number of data-parallel ranks", maximum=1 << 20)
    if target_batch % world_size:
        lower = target_batch - target_batch % world_size
        upper = lower + world_size
        nearest = f"{lower} or {upper}" if lower > 0 else f"{upper}"
        raise ValueError(
            f"target_batch={target_batch} is not divisible by world_size={world_size}, so ranks would "
            f"hold different numbers of samples; use target_batch={nearest}")
    per_rank = target_batch // world_size
    notes: tuple[str, ...] = ()
    if micro_batch > per_rank:
        notes = (f"micro_batch={micro_batch} exceeds the per-rank batch {per_rank}; "
                 f"clamped to {per_rank}",)
        micro_batch = per_rank
    steps = -(-per_rank // micro_batch)
    if steps > MAX_ACCUM_STEPS:
        raise ValueError(f"target_batch={target_batch} in micro-batches of micro_batch={micro_batch} takes {steps:,} "
                         f"micro-batches per step; at most {MAX_ACCUM_STEPS:,} are supported: raise micro_batch")
    sizes = balanced_split(per_rank, micro_batch)
    return Plan(target_batch=target_batch, micro_batch=micro_batch, world_size=world_size,
                accum_steps=len(sizes), micro_batches=sizes, notes=notes)


def _compact(sizes: list[int]) -> str:
    """``[43, 43, 43, 43, 42, 42]`` -> ``'[43 x4, 42 x2]'`` for readable logs."""
    runs: list[tuple[int, int]] = []
    for s in sizes:
        if runs and runs[-1][0] == s:
            runs[-1] = (s, runs[-1][1] + 1)
        else:
            runs.append((s, 1))
    return "[" + ", ".join(f"{s} x{k}" if k > 1 else f"{s}" for s, k in runs) + "]"
