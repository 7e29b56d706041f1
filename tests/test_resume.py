"""A resume is the uninterrupted run: N steps, save, load into fresh objects, M steps == N + M steps, bitwise."""
import io
import random

import numpy as np
import pytest
import torch
from torch import nn

import autoaccum

SCHEDULERS = {
    "none": None,
    "step": lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5),
    "lambda": lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s)),
    "cosine": lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10),
    "onecycle": lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=20),
}


def build(seed, scheduler, oom_at=None, micro_batch=4):
    """A model with dropout (so the random stream matters), its optimizer and trainer; ``oom_at``
    makes the loss raise an out-of-memory error at that call (once), as a real OOM would."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 16), nn.Dropout(0.3), nn.Tanh(), nn.Linear(16, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    sched = SCHEDULERS[scheduler](opt) if SCHEDULERS[scheduler] else None
    calls = [0]

    def loss_fn(m, b):
        calls[0] += 1
        if oom_at is not None and calls[0] == oom_at:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        noise = torch.randn(()) * 1e-3 + np.random.rand() * 1e-3 + random.random() * 1e-3   # every stream drawn
        return nn.functional.mse_loss(m(b[0]), b[1]) + noise

    trainer = autoaccum.fit(model, 16, opt, loss_fn=loss_fn, micro_batch=micro_batch, scheduler=sched)
    return model, trainer


def batches(n):
    g = torch.Generator().manual_seed(123)
    return [(torch.randn(16, 6, generator=g), torch.randn(16, 2, generator=g)) for _ in range(n)]


def seed_all(seed):
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
@pytest.mark.parametrize("oom", [False, True], ids=["clean", "after-oom"])
def test_save_load_continue_equals_the_uninterrupted_run(scheduler, oom):
    data = batches(10)
    oom_at = 9 if oom else None              # in step 3: the micro-batch drops from 4 for the rest of the run
    model, trainer = build(0, scheduler, oom_at)
    seed_all(7)
    for b in data:
        trainer.step(b)
    reference = [p.detach().clone() for p in model.parameters()]
    if oom:
        assert trainer.plan.micro_batch < 4 and trainer.oom_retries == 1

    model, trainer = build(0, scheduler, oom_at)
    seed_all(7)
    for b in data[:5]:
        trainer.step(b)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "trainer": trainer.state_dict()}, buf)
    seed_all(99)                              # whatever happens between save and resume
    buf.seek(0)
    saved = torch.load(buf)                   # torch's default, weights_only=True

    model2, trainer2 = build(1, scheduler)   # fresh objects, other initial weights
    model2.load_state_dict(saved["model"])
    trainer2.load_state_dict(saved["trainer"])
    assert trainer2.plan == trainer.plan and trainer2.steps == 5
    for b in data[5:]:
        trainer2.step(b)
    for p, r in zip(model2.parameters(), reference):
        assert torch.equal(p, r), (p - r).abs().max()
    assert trainer2.steps == 10


def test_state_dict_without_random_streams_and_a_checkpoint_that_does_not_fit():
    model, trainer = build(0, "none")
    trainer.step(batches(1)[0])
    assert trainer.state_dict(rng=False)["rng"] is None
    with pytest.raises(TypeError, match="rng must be True or False"):
        trainer.state_dict(rng="yes")
    sd = trainer.state_dict()
    other = autoaccum.fit(model, 32, torch.optim.AdamW(model.parameters()), loss_fn=lambda m, b: m(b[0]).sum(),
                          micro_batch=4)
    before = (other.steps, other.plan, torch.get_rng_state())
    with pytest.raises(ValueError, match="target_batch=16 on 1 rank.*target_batch=32"):
        other.load_state_dict(sd)
    assert (other.steps, other.plan) == before[:2] and torch.equal(torch.get_rng_state(), before[2])
    sd["rng"]["torch_cuda"] = [torch.zeros(16, dtype=torch.uint8)] * 3
    with pytest.raises(ValueError, match="random streams for 3 CUDA device"):
        trainer.load_state_dict(sd)


def test_a_lazily_sized_trainer_adopts_the_saved_plan_without_probing():
    model, trainer = build(0, "none", micro_batch=3)
    trainer.step(batches(1)[0])
    sd = trainer.state_dict()
    model2 = nn.Sequential(nn.Linear(6, 16), nn.Dropout(0.3), nn.Tanh(), nn.Linear(16, 2))
    lazy = autoaccum.fit(model2, 16, torch.optim.AdamW(model2.parameters(), lr=0.01),
                         loss_fn=lambda m, b: nn.functional.mse_loss(m(b[0]), b[1]))
    assert lazy.plan is None
    lazy.load_state_dict(sd)
    assert lazy.plan.micro_batch == 3 and lazy.plan.micro_batches == trainer.plan.micro_batches
