"""A step's outcome read late (autoaccum.outcome): with a fused optimizer on CUDA the trainer steps
it with the skip flag on the device, counts and schedules as if the step stood, and takes that back
when the outcome, read later, says it was skipped. Forced here on the CPU (torch's CPU fused AdamW
takes found_inf too) and held to the eager path, bitwise."""
import gc
import math

import pytest
import torch

import autoaccum
from helpers import mlp, mse_loss, regression_batch


def batches():
    out = []
    for i in range(6):
        x, y = regression_batch(16, seed=i + 1)
        if i == 2:
            x = x.clone()
            x[3, 0] = float("inf")      # tanh(inf) is finite, its weight gradient is not: skipped
        if i == 4:
            y = y.clone()
            y[0, 0] = float("inf")      # a non-finite loss: skipped
        out.append((x, y))
    return out


def make(defer: bool, clip: float | None = 1.0):
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    trainer = autoaccum.fit(model, 16, opt, loss_fn=mse_loss, micro_batch=5, scheduler=sched, max_grad_norm=clip)
    trainer._defer = defer
    return model, opt, sched, trainer


@pytest.mark.parametrize("clip", [1.0, None])
def test_deferred_outcome_gives_the_eager_run_bitwise(clip):
    runs = {}
    for defer in (False, True):
        model, opt, sched, trainer = make(defer, clip)
        stats = [trainer.step(b) for b in batches()]
        if defer:
            assert not stats[-1].settled and stats[0].settled   # each settled by the next step's update
        runs[defer] = (model, opt, sched, trainer, stats)
    (m0, o0, s0, t0, st0), (m1, o1, s1, t1, st1) = runs[False], runs[True]
    assert all(torch.equal(a, b) for a, b in zip(m0.parameters(), m1.parameters()))
    for p0, p1 in zip(m0.parameters(), m1.parameters()):
        assert all(torch.equal(v, o1.state[p1][k]) for k, v in o0.state[p0].items())
    assert s0.state_dict() == s1.state_dict() and s0.get_last_lr() == s1.get_last_lr()
    assert (t0.steps, t0.skipped_steps) == (t1.steps, t1.skipped_steps) == (4, 2)
    for a, b in zip(st0, st1):
        assert (a.skipped, a.grad_norm, a.events, a.lr) == (b.skipped, b.grad_norm, b.events, b.lr)
        assert a.loss == b.loss or (math.isnan(a.loss) and math.isnan(b.loss))
    assert st1[2].skipped and st1[2].events == ["skipped the update: gradient norm is not finite"]
    assert st1[4].skipped and st1[4].events == ["skipped the update: loss is not finite"]


def test_a_skipped_step_is_taken_back_when_first_read_keeping_a_hand_set_learning_rate():
    model, opt, sched, trainer = make(True)
    data = batches()
    trainer.step(data[0])
    trainer.step(data[1])
    before = [p.detach().clone() for p in model.parameters()]
    epoch = sched.last_epoch
    stats = trainer.step(data[2])
    assert not stats.settled and sched.last_epoch == epoch + 1      # scheduled as if it stood
    opt.param_groups[0]["weight_decay"] = 0.5                         # set by hand after the step
    assert trainer.steps == 2 and trainer.skipped_steps == 1          # reading a counter settles it
    assert stats.settled and stats.skipped and stats.grad_norm == math.inf
    assert sched.last_epoch == epoch and opt.param_groups[0]["lr"] == sched.get_last_lr()[0]
    assert opt.param_groups[0]["weight_decay"] == 0.5
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))   # skipped on the device
    assert trainer.state_dict()["steps"] == 2


def test_stats_read_after_the_trainer_is_gone_and_a_checkpoint_settles_first():
    model, opt, sched, trainer = make(True)
    data = batches()
    trainer.step(data[0])
    trainer.step(data[1])
    skipped = trainer.step(data[2])
    state = trainer.state_dict()
    assert skipped.settled and state["steps"] == 2 and state["skipped_steps"] == 1
    last = trainer.step(data[3])
    del trainer
    gc.collect()
    assert not last.skipped and math.isfinite(last.loss) and last.grad_norm > 0


def test_train_shows_the_latest_loss_on_the_host_and_counts_skips(capsys):
    model, opt, sched, trainer = make(True)
    history = trainer.train(batches(), progress=True)
    err = capsys.readouterr().err
    assert "step 6/6" in err and "skipped 2" in err
    assert [s.skipped for s in history] == [False, False, True, False, True, False]


@pytest.mark.cuda
def test_a_fused_optimizer_step_never_waits_for_the_device():
    """On the GPU: after the first step (sizing, counting), steps with AdamW(fused=True) make no
    implicit host-device synchronisation (CUDA's sync-debug mode raises on one)."""
    dev = torch.device("cuda")
    model = mlp(torch.float32).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    trainer = autoaccum.fit(model, 64, opt, loss_fn=mse_loss, micro_batch=16, max_grad_norm=1.0)
    assert trainer._defer
    batch = tuple(t.to(dev) for t in regression_batch(64, torch.float32))
    trainer.step(batch)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        stats = [trainer.step(batch) for _ in range(3)]
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert not stats[-1].settled and all(math.isfinite(s.loss) for s in stats)
