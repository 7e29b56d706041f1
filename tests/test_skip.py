"""Non-finite values: the step is skipped and nothing is corrupted."""
import math

import pytest
import torch

import autoaccum
from helpers import assert_state_equal, mlp, mse_loss, regression_batch, state_snapshot


def poisoned_loss(bad_value, at_call):
    calls = {"n": 0}

    def loss_fn(model, batch):
        calls["n"] += 1
        loss = mse_loss(model, batch)
        return loss * bad_value if calls["n"] == at_call else loss
    return loss_fn


def trained(amp_dtype=None, loss_fn=mse_loss, dtype=torch.float64):
    model = mlp(dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    trainer = autoaccum.fit(model, 40, opt, loss_fn=loss_fn, micro_batch=9, scheduler=sched,
                            amp_dtype=amp_dtype, max_grad_norm=1.0)
    trainer.step(regression_batch(40, dtype=dtype, seed=5))  # optimizer state exists from here on
    return model, opt, sched, trainer


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_loss_skips_the_update(bad):
    model, opt, sched, trainer = trained(loss_fn=poisoned_loss(bad, at_call=5 + 3))
    before, lr_epoch = state_snapshot(model, opt), sched.last_epoch
    stats = trainer.step(regression_batch(40, seed=6))
    assert stats.skipped and not math.isfinite(stats.loss)
    assert "not finite" in stats.events[0]
    assert_state_equal(model, opt, before)
    assert sched.last_epoch == lr_epoch and trainer.skipped_steps == 1
    assert all(p.grad is None for p in model.parameters())
    # the next step trains normally
    stats = trainer.step(regression_batch(40, seed=7))
    assert not stats.skipped and math.isfinite(stats.loss) and sched.last_epoch == lr_epoch + 1


def test_fp16_overflow_skips_and_lowers_the_scale():
    def exploding(model, batch):
        x, y = batch
        out = model(x)
        if x.shape[0] == 8:  # the last micro-batch of 40 = 5 x 8
            out = out * 1e30
        return torch.nn.functional.mse_loss(out.float(), y)

    model = mlp(torch.float32)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1)
    trainer = autoaccum.fit(model, 40, opt, loss_fn=exploding, micro_batch=8, scheduler=sched,
                            amp_dtype=torch.float16)
    before = state_snapshot(model, opt)
    scale = trainer.scaler.get_scale()
    stats = trainer.step(regression_batch(40, dtype=torch.float32))
    assert stats.skipped
    assert_state_equal(model, opt, before)
    assert sched.last_epoch == 0
    assert trainer.scaler.get_scale() < scale


def test_losses_of_inf_and_minus_inf_skip_the_step():
    """+inf and -inf losses make a nan step loss: skipped like any other non-finite step, not an
    error from the summation (math.fsum raises on inf - inf)."""
    values = (math.inf, -math.inf)
    calls = {"n": 0}

    def loss_fn(model, batch):
        calls["n"] += 1
        loss = mse_loss(model, batch)
        k = calls["n"] - 5          # the second step's micro-batches (the first step ran 5)
        return loss * 0 + values[k - 1] if k in (1, 2) else loss
    model, opt, sched, trainer = trained(loss_fn=loss_fn)
    before = state_snapshot(model, opt)
    stats = trainer.step(regression_batch(40, dtype=torch.float64, seed=6))
    assert stats.skipped and not math.isfinite(stats.loss)
    assert_state_equal(model, opt, before)
