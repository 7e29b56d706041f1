"""Worker processes for tests/test_distributed.py: 2 ranks on the CPU with gloo.

Each worker runs a list of scenarios in one process group and saves what it saw to
``outdir/<scenario>-<rank>.pt``; the test compares that with single-process references.
"""
from __future__ import annotations

import os
import traceback

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel as DDP

import autoaccum
from autoaccum.demo import TinyGPT, count_tokens, lm_loss, make_batch

PER_RANK = 16
STEPS = 3


def global_batch(step: int, per_rank: int = PER_RANK) -> dict:
    """Sorted by real tokens, so rank 0 holds the long sentences and rank 1 the short ones."""
    b = make_batch(2 * per_rank, seq_len=40, seed=1000 + step)
    order = torch.argsort((b["targets"] != -100).sum(1), descending=True)
    return {k: v[order] for k, v in b.items()}


def rank_batch(step: int, rank: int, per_rank: int = PER_RANK) -> dict:
    b = global_batch(step, per_rank)
    return {k: v[rank * per_rank:(rank + 1) * per_rank] for k, v in b.items()}


def make_model(kind: str = "gpt") -> nn.Module:
    torch.manual_seed(0)
    if kind == "gpt":
        return TinyGPT(dim=32, layers=2, heads=4).double()
    return nn.Sequential(nn.Embedding(30, 16), nn.Flatten(), nn.Linear(16 * 40, 32), nn.BatchNorm1d(32),
                         nn.Tanh(), nn.Linear(32, 40 * 30), nn.Unflatten(1, (40, 30))).double()


def make_opt(params):
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01)


class OOMAt:
    """loss_fn that raises torch.OutOfMemoryError on ``rank`` at the given call numbers."""

    def __init__(self, rank: int, calls: set[int], base=lm_loss):
        self.rank, self.calls, self.base, self.n = rank, calls, base, 0

    def __call__(self, model, batch):
        self.n += 1
        if dist.get_rank() == self.rank and self.n in self.calls:
            raise torch.OutOfMemoryError(f"CUDA out of memory (injected on rank {self.rank}, call {self.n})")
        return self.base(model, batch)


def count_comm_hook(counter):
    def hook(state, bucket):
        counter["calls"] += 1
        return default_hooks.allreduce_hook(state, bucket)
    return hook


def train(trainer, rank, steps=STEPS, after_step=None) -> list[dict]:
    stats = []
    for s in range(steps):
        st = trainer.step(rank_batch(s, rank))
        stats.append({"loss": st.loss, "items": st.items, "skipped": st.skipped, "retries": st.oom_retries,
                      "limit": st.micro_batch_limit, "micro_batches": st.micro_batches, "events": st.events})
        if after_step is not None:
            after_step()
    return stats


def trained(model, trainer, rank, **extra) -> dict:
    """Train first, then read the parameters (a dict literal would read them before training)."""
    stats = train(trainer, rank)
    return {"params": params_of(model), "stats": stats, **extra}


def params_of(module) -> list[torch.Tensor]:
    return [(p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone() for p in module.parameters()]


# ---------------------------------------------------------------------------- scenarios
def ddp_deferred(rank):
    model = DDP(make_model())
    counter = {"calls": 0}
    model.register_comm_hook(None, count_comm_hook(counter))
    trainer = autoaccum.fit(model, 2 * PER_RANK, make_opt(model.parameters()), loss_fn=lm_loss, micro_batch=5,
                            count_fn=count_tokens, max_grad_norm=1.0)
    per_step = []
    last = {"n": 0}

    def count():
        per_step.append(trainer.topology.allreduces - last["n"])
        last["n"] = trainer.topology.allreduces
    stats = train(trainer, rank, after_step=count)
    return {"params": params_of(model.module), "stats": stats, "ddp_hook_calls": counter["calls"],
            "buffer_allreduces_per_step": per_step, "buffer_bytes": trainer.buffer.nbytes}


def ddp_overlap(rank):
    # A throwaway DDP model with the same buckets tells how many all-reduces one synced backward makes.
    probe_model = DDP(make_model(), bucket_cap_mb=0.02)
    probe_counter = {"calls": 0}
    probe_model.register_comm_hook(None, count_comm_hook(probe_counter))
    per_iteration = []
    for s in range(2):
        before = probe_counter["calls"]
        lm_loss(probe_model, rank_batch(s, rank)).backward()
        per_iteration.append(probe_counter["calls"] - before)

    model = DDP(make_model(), bucket_cap_mb=0.02)
    counter = {"calls": 0}
    model.register_comm_hook(None, count_comm_hook(counter))
    trainer = autoaccum.fit(model, 2 * PER_RANK, make_opt(model.parameters()), loss_fn=lm_loss, micro_batch=5,
                            count_fn=count_tokens, max_grad_norm=1.0, sync="overlap")
    per_step = []
    last = {"n": 0}

    def count():
        per_step.append(counter["calls"] - last["n"])
        last["n"] = counter["calls"]
    stats = train(trainer, rank, after_step=count)
    return {"params": params_of(model.module), "stats": stats, "hook_calls_per_step": per_step,
            "buckets_per_backward": per_iteration}


def fsdp2(rank):
    from torch.distributed.fsdp import fully_shard
    model = make_model()
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    trainer = autoaccum.fit(model, 2 * PER_RANK, make_opt(model.parameters()), loss_fn=lm_loss, micro_batch=5,
                            count_fn=count_tokens, max_grad_norm=1.0)
    return trained(model, trainer, rank, kind=trainer.topology.kind)


def ddp_trained(rank, loss_fn, micro_batch):
    model = DDP(make_model())
    trainer = autoaccum.fit(model, 2 * PER_RANK, make_opt(model.parameters()), count_fn=count_tokens,
                            loss_fn=loss_fn, micro_batch=micro_batch, max_grad_norm=1.0)
    return trained(model.module, trainer, rank)


def ddp_oom_step0(rank):
    """OOM on rank 1 only, first attempt of step 0: both ranks retry at micro-batch 4."""
    return ddp_trained(rank, OOMAt(rank=1, calls={2}), micro_batch=8)


def ddp_clean_micro4(rank):
    return ddp_trained(rank, lm_loss, micro_batch=4)


def ddp_oom_step1(rank):
    """OOM on rank 0 at step 1 (its second micro-batch): a different split from then on; equal to rounding."""
    return ddp_trained(rank, OOMAt(rank=0, calls={4}), micro_batch=8)


def ddp_bn_oom(rank):
    """A model with BatchNorm, whose buffers DDP would broadcast inside a forward, and OOMs on rank 1
    raised in loss_fn *before* the model is called (as when moving inputs), where rank 0 would
    otherwise sit in DDP's broadcast (or its bucket rebuild, in overlap) and never come back.

    cases: (sync, OOM call on rank 1, micro-batch limit per step of the clean twin)."""
    def loss(model, batch):
        logits = model(batch["input_ids"])
        return nn.functional.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten(), ignore_index=-100)
    cases = {"deferred_first": ("deferred", 1, [4, 4, 4]),       # step 0, micro-batch 0: DDP's first forward
             "overlap_step1": ("overlap", 3, [8, 4, 4]),         # step 1, micro-batch 0: after a synced backward
             "overlap_last": ("overlap", 2, [4, 4, 4])}          # step 0, the last micro-batch, before its forward
    out = {}
    for case, (sync, call, limits) in cases.items():
        for label in ("clean", "faulty"):
            model = DDP(make_model("bn"))
            injector = OOMAt(rank=1, calls={call} if label == "faulty" else set(), base=loss)
            trainer = autoaccum.fit(model, 2 * PER_RANK, make_opt(model.parameters()), count_fn=count_tokens,
                                    loss_fn=injector, micro_batch=8 if label == "faulty" else limits[0],
                                    batchnorm="micro", sync=sync)
            first_forward = []
            model.module.register_forward_pre_hook(
                lambda m, a: first_forward.append(m[3].running_mean.clone()) if injector.n in starts else None)
            stats = []
            for s in range(STEPS):
                if label == "clean":
                    trainer.set_micro_batch(limits[s])
                starts = {injector.n + 1}      # the first loss_fn call of this step
                st = trainer.step(rank_batch(s, rank))
                stats.append({"retries": st.oom_retries, "limit": st.micro_batch_limit, "events": st.events})
            out[(case, label)] = {"params": params_of(model.module), "stats": stats, "lockstep": trainer.topology.lockstep,
                                  "running_mean": model.module[3].running_mean.clone(),
                                  "step_start_running_mean": first_forward}
    return out


def tempered_loss(temperature):
    return lambda model, batch: lm_loss(model, batch) / temperature


def optimizer_only_tensor(rank):
    """A temperature the optimizer trains but no wrapper owns: equal on both ranks, equal to one process."""
    from torch.distributed.fsdp import fully_shard
    out = {}
    for mode in ("deferred", "overlap", "fsdp2"):
        base = make_model()
        temperature = nn.Parameter(torch.tensor(1.5, dtype=torch.float64))
        if mode == "fsdp2":
            fully_shard(base)
            model, module = base, base
        else:
            model = DDP(base)
            module = model.module
        trainer = autoaccum.fit(model, 2 * PER_RANK, make_opt([*model.parameters(), temperature]),
                                loss_fn=tempered_loss(temperature), micro_batch=5, count_fn=count_tokens,
                                max_grad_norm=1.0, **({} if mode == "fsdp2" else {"sync": mode}))
        train(trainer, rank)
        out[mode] = {"params": params_of(module), "temperature": temperature.detach().clone()}
    return out


def peer_error(rank):
    def loss_fn(model, batch):
        if dist.get_rank() == 0 and loss_fn.n == 1:
            raise ValueError("corrupt sample on rank 0")
        loss_fn.n += 1
        return lm_loss(model, batch)
    loss_fn.n = 0
    model = DDP(make_model())
    trainer = autoaccum.fit(model, 2 * PER_RANK, make_opt(model.parameters()), loss_fn=loss_fn, micro_batch=4,
                            count_fn=count_tokens)
    before = params_of(model.module)
    return {"error": _error_of(lambda: trainer.step(rank_batch(0, rank))),
            "unchanged": all(torch.equal(a, b) for a, b in zip(before, params_of(model.module)))}


def bad_batch(rank):
    model = DDP(make_model())
    trainer = autoaccum.fit(model, 2 * PER_RANK, make_opt(model.parameters()), loss_fn=lm_loss, micro_batch=4,
                            count_fn=count_tokens)
    batch = rank_batch(0, rank)
    if rank == 1:
        batch["targets"] = batch["targets"][:-1]
    first = _error_of(lambda: trainer.step(batch))
    second = trainer.step(rank_batch(1, rank))      # the group is still usable afterwards
    return {"error": first, "then": second.loss}


def probe_agree(rank):
    model = DDP(make_model())
    trainer = autoaccum.fit(model, 2 * PER_RANK, make_opt(model.parameters()), loss_fn=lm_loss,
                            count_fn=count_tokens, sample=rank_batch(0, rank),
                            memory_budget="6MiB" if rank == 0 else "64MiB", probe_cache=False)
    return {"limit": trainer.plan.micro_batch, "own": trainer.probe_result.max_micro_batch,
            "loss": trainer.step(rank_batch(0, rank)).loss}


def probe_lazy(rank):
    """fit(model, target_batch) as written: no optimizer, no micro_batch, no sample; the first batch
    given to step() is probed on every rank, and all take the smallest answer."""
    model = DDP(make_model())
    trainer = autoaccum.fit(model, 2 * PER_RANK, loss_fn=lm_loss, count_fn=count_tokens,
                            memory_budget="6MiB" if rank == 0 else "64MiB", probe_cache=False)
    pending = repr(trainer)
    loss = trainer.step(rank_batch(0, rank)).loss
    return {"pending": pending, "limit": trainer.plan.micro_batch, "own": trainer.probe_result.max_micro_batch,
            "loss": loss, "optimizer": type(trainer.optimizer).__name__}


def probe_fails_on_one_rank(rank):
    """Rank 0's probe cannot fit one sample: it raises, and rank 1 is told instead of waiting."""
    model = DDP(make_model())
    trainer = autoaccum.fit(model, 2 * PER_RANK, loss_fn=lm_loss, probe_cache=False,
                            memory_budget="64KiB" if rank == 0 else "64MiB")
    return {"error": _error_of(lambda: trainer.step(rank_batch(0, rank)))}


def fsdp2_oom(rank):
    from torch.distributed.fsdp import fully_shard
    model = make_model()
    fully_shard(model)
    trainer = autoaccum.fit(model, 2 * PER_RANK, make_opt(model.parameters()), loss_fn=OOMAt(rank=rank, calls={2}),
                            micro_batch=4, count_fn=count_tokens)
    return {"error": _error_of(lambda: trainer.step(rank_batch(0, rank)))}


def plain_model(rank):
    model = make_model()
    return {"error": _error_of(lambda: autoaccum.fit(model, 32, make_opt(model.parameters()), loss_fn=lm_loss,
                                                     micro_batch=4))}


def _error_of(fn) -> tuple[str, str] | None:
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the scenario reports what was raised
        return type(e).__name__, str(e)
    return None


SCENARIOS = {f.__name__: f for f in (ddp_deferred, ddp_overlap, fsdp2, ddp_oom_step0, ddp_clean_micro4,
                                      ddp_oom_step1, ddp_bn_oom, optimizer_only_tensor, peer_error, bad_batch, probe_agree,
                                      probe_lazy, probe_fails_on_one_rank, fsdp2_oom, plain_model)}


def worker(rank: int, world: int, port: int, names: list[str], outdir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    os.environ["AUTOACCUM_CACHE_DIR"] = os.path.join(outdir, f"cache-{rank}")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for name in names:
            try:
                result = SCENARIOS[name](rank)
            except Exception:  # noqa: BLE001 - a crash is a result the test reports
                result = {"crash": traceback.format_exc()}
            torch.save(result, os.path.join(outdir, f"{name}-{rank}.pt"))
            dist.barrier()
    finally:
        dist.destroy_process_group()
