import copy
import warnings

import pytest
import torch
from torch import nn

import autoaccum
from helpers import mse_loss, regression_batch


def bn_model(momentum=0.1):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16), nn.BatchNorm1d(16, momentum=momentum), nn.ReLU(),
                         nn.Linear(16, 5)).double()


def conv_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 6 * 6, 5)).double()


def image_batch(n):
    g = torch.Generator().manual_seed(2)
    return torch.randn(n, 3, 8, 8, generator=g, dtype=torch.float64), torch.randn(n, 5, generator=g, dtype=torch.float64)


def stats_of(model):
    bn = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)][0]
    return bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked)


def make(model, mode, target=40, micro=9, lr=0.1):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    return autoaccum.fit(model, target, opt, loss_fn=mse_loss, micro_batch=micro, batchnorm=mode)


def test_default_warns_once_when_accumulating():
    trainer = make(bn_model(), None)
    with pytest.warns(UserWarning, match="1 BatchNorm layer"):
        trainer.step(regression_batch(40))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trainer.step(regression_batch(40))
        make(bn_model(), "micro").step(regression_batch(40))
        make(bn_model(), None, micro=40).step(regression_batch(40))  # one micro-batch: nothing to warn


def test_micro_mode_updates_running_stats_once_per_micro_batch():
    model = bn_model()
    make(model, "micro").step(regression_batch(40))
    assert stats_of(model)[2] == 5


def test_freeze_mode_keeps_running_stats():
    model = bn_model()
    before = stats_of(model)
    w0 = model[0].weight.detach().clone()
    make(model, "freeze").step(regression_batch(40))
    after = stats_of(model)
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1]) and before[2] == after[2]
    assert not torch.equal(model[0].weight, w0), "the parameters still train"


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("kind", ["1d", "2d"])
def test_step_mode_running_stats_equal_a_full_batch_forward(momentum, kind):
    model = bn_model(momentum) if kind == "1d" else conv_model()
    if momentum is None:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.momentum = None
    batch = regression_batch(40) if kind == "1d" else image_batch(40)
    full = copy.deepcopy(model)
    trainer = make(model, "step", lr=0.0)  # parameters stay put, so both see the same activations
    for _ in range(2):  # twice, so the second update starts from non-initial stats
        full(batch[0])
        trainer.step(batch)
    f, a = stats_of(full), stats_of(model)
    assert (f[0] - a[0]).abs().max() <= 1e-12 and (f[1] - a[1]).abs().max() <= 1e-12 and f[2] == a[2] == 2
    bn = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)][0]
    assert bn.momentum == momentum, "the layer's momentum is restored after the step"


def test_a_failed_step_restores_running_stats():
    model = bn_model()
    trainer = make(model, "micro")
    before = stats_of(model)
    calls = {"n": 0}

    def flaky(m, b):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("boom")
        return mse_loss(m, b)

    trainer.loss_fn = flaky
    with pytest.raises(RuntimeError), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.step(regression_batch(40))
    after = stats_of(model)
    assert torch.equal(before[0], after[0]) and before[2] == after[2]


def test_eval_mode_layers_are_left_alone():
    model = bn_model().eval()
    before = stats_of(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make(model, None).step(regression_batch(40))
    assert torch.equal(stats_of(model)[0], before[0])


def test_step_mode_rejects_sync_batchnorm():
    model = nn.Sequential(nn.Linear(4, 4), nn.SyncBatchNorm(4))
    with pytest.raises(ValueError, match="SyncBatchNorm"):
        make(model, "step")
