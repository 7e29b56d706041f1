"""Bad input: a clear error naming the argument, raised before any state changes."""
import pytest
import torch

import autoaccum
from helpers import assert_state_equal, mlp, mse_loss, regression_batch, state_snapshot


@pytest.fixture
def setup():
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    trainer = autoaccum.fit(model, 40, opt, loss_fn=mse_loss, micro_batch=9)
    trainer.step(regression_batch(40))  # optimizer state exists
    return model, opt, trainer


def fit_kwargs(model, opt, **over):
    kw = dict(loss_fn=mse_loss, micro_batch=9)
    kw.update(over)
    return kw


@pytest.mark.parametrize("target, over, exc, match", [
    (0, {}, ValueError, "target_batch"),
    (-4, {}, ValueError, "target_batch"),
    (40, dict(micro_batch=0), ValueError, "micro_batch"),
    (40, dict(micro_batch=2.5), TypeError, "micro_batch"),
    (40, dict(amp_dtype=torch.float64), ValueError, "amp_dtype"),
    (40, dict(amp_dtype="fp8"), ValueError, "amp_dtype"),
    (40, dict(max_grad_norm=0), ValueError, "max_grad_norm"),
    (40, dict(max_grad_norm=float("nan")), ValueError, "max_grad_norm"),
    (40, dict(loss_fn=3), TypeError, "loss_fn"),
    (40, dict(count_fn="tokens"), TypeError, "count_fn"),
    (40, dict(batchnorm="sync"), ValueError, "batchnorm"),
    (40, dict(device="gpu7"), ValueError, "device"),
    (40, dict(micro_batch=None, probe_cache="no"), TypeError, "probe_cache"),
    (40, dict(micro_batch=None, memory_budget="lots"), ValueError, "memory_budget"),
    (40, dict(accum_dtype=torch.bfloat16), ValueError, "accum_dtype"),
    (40, dict(accum_dtype="fp32"), ValueError, "accum_dtype"),
    (40, dict(master_weights=True), ValueError, "master_weights=True .* needs"),
    (40, dict(master_weights="yes"), TypeError, "master_weights"),
])
def test_fit_rejects_bad_arguments_without_touching_anything(setup, target, over, exc, match):
    model, opt, _ = setup
    before = state_snapshot(model, opt)
    with pytest.raises(exc, match=match):
        autoaccum.fit(model, target, opt, **fit_kwargs(model, opt, **over))
    assert_state_equal(model, opt, before)


def test_fit_rejects_mismatched_optimizer_and_scheduler(setup):
    model, opt, _ = setup
    other = torch.optim.SGD(mlp().parameters(), lr=0.1)
    with pytest.raises(ValueError, match="optimizer holds none of the model's parameters"):
        autoaccum.fit(model, 40, other, loss_fn=mse_loss, micro_batch=9)
    with pytest.raises(TypeError, match="optimizer must be"):
        autoaccum.fit(model, 40, "adam", loss_fn=mse_loss, micro_batch=9)
    with pytest.raises(ValueError, match="scheduler was built for a different optimizer"):
        autoaccum.fit(model, 40, opt, loss_fn=mse_loss, micro_batch=9,
                      scheduler=torch.optim.lr_scheduler.StepLR(other, 1))
    with pytest.raises(TypeError, match="ReduceLROnPlateau"):
        autoaccum.fit(model, 40, opt, loss_fn=mse_loss, micro_batch=9,
                      scheduler=torch.optim.lr_scheduler.ReduceLROnPlateau(opt))
    with pytest.raises(TypeError, match="model must be"):
        autoaccum.fit(lambda x: x, 40, opt, micro_batch=9)


def test_fit_leaves_model_and_optimizer_untouched(setup):
    model, opt, _ = setup
    before = state_snapshot(model, opt)
    autoaccum.fit(model, 40, opt, loss_fn=mse_loss, micro_batch=9, amp_dtype=torch.bfloat16,
                  max_grad_norm=1.0, batchnorm="step")
    assert_state_equal(model, opt, before)


def test_micro_batch_above_target_is_clamped(setup):
    model, opt, _ = setup
    trainer = autoaccum.fit(model, 40, opt, loss_fn=mse_loss, micro_batch=100)
    assert trainer.plan.micro_batch == 40 and trainer.plan.accum_steps == 1 and trainer.plan.notes


x, y = regression_batch(40)


def count_calls_returning(values):
    it = iter(values)
    return lambda mb: next(it)


@pytest.mark.parametrize("batch, over, exc, match", [
    ((x, y[:39]), {}, ValueError, "disagree on dim 0"),
    ((x[:0], y[:0]), {}, ValueError, "empty"),
    ({}, {}, ValueError, "no tensors"),
    ((x, y, "meta"), {}, TypeError, r"batch\[2\] is a str"),
    (regression_batch(41), {}, ValueError, "batch has 41 samples but .* 40"),
    ((x, y), dict(loss_fn=lambda m, b: (m(b[0]) - b[1]).pow(2).mean(1)), ValueError, "MEAN loss"),
    ((x, y), dict(loss_fn=lambda m, b: mse_loss(m, b).detach()), ValueError, "does not require grad"),
    ((x, y), dict(loss_fn=lambda m, b: 1.0), TypeError, "returned float"),
    ((x, y), dict(loss_fn=lambda m, b: torch.tensor(1, requires_grad=False)), TypeError, "floating point"),
    ((x, y), dict(count_fn=lambda mb: 0), ValueError, "0 items for every micro-batch"),
    ((x, y), dict(count_fn=count_calls_returning([3, 4, -1, 5, 5])), ValueError, r"count_fn\(micro_batch 2\) returned -1.0"),
    ((x, y), dict(count_fn=lambda mb: torch.ones(2)), ValueError, "one number"),
    ((x, y), dict(count_fn=lambda mb: "many"), TypeError, "count_fn"),
])
def test_step_rejects_bad_input_without_touching_anything(setup, batch, over, exc, match):
    model, opt, trainer = setup
    for k, v in over.items():
        setattr(trainer, k, v)
    before = state_snapshot(model, opt)
    with pytest.raises(exc, match=match):
        trainer.step(batch)
    assert_state_equal(model, opt, before)
    assert all(p.grad is None for p in model.parameters())


def test_loss_fn_failure_on_a_later_micro_batch_leaves_no_partial_gradients(setup):
    model, opt, trainer = setup
    calls = {"n": 0}

    def flaky(m, b):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("data pipeline broke")
        return mse_loss(m, b)

    trainer.loss_fn = flaky
    before = state_snapshot(model, opt)
    with pytest.raises(RuntimeError, match="data pipeline broke"):
        trainer.step((x, y))
    assert_state_equal(model, opt, before)
    assert all(p.grad is None for p in model.parameters())
