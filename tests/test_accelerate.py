"""autoaccum.fit on what accelerator.prepare returns: the wrapped model, optimizer and scheduler."""
import pytest
import torch
from torch import nn

import autoaccum

accelerate = pytest.importorskip("accelerate")


def twins():
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    b = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    b.load_state_dict(a.state_dict())
    return a, b


def loss(m, b):
    return nn.functional.mse_loss(m(b[0]), b[1])


def test_fit_takes_the_prepared_model_optimizer_and_scheduler():
    plain_model, prepared_model = twins()
    accelerator = accelerate.Accelerator(cpu=True)
    opt = torch.optim.AdamW(prepared_model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    model, opt, sched = accelerator.prepare(prepared_model, opt, sched)
    assert type(opt).__name__ == "AcceleratedOptimizer"
    ours = autoaccum.fit(model, 16, opt, loss_fn=loss, micro_batch=5, scheduler=sched, max_grad_norm=0.5)
    plain_opt = torch.optim.AdamW(plain_model.parameters(), lr=1e-2)
    plain = autoaccum.fit(plain_model, 16, plain_opt, loss_fn=loss, micro_batch=5, max_grad_norm=0.5,
                          scheduler=torch.optim.lr_scheduler.StepLR(plain_opt, step_size=1, gamma=0.5))
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        batch = (torch.randn(16, 4, generator=g), torch.randn(16, 1, generator=g))
        a, b = ours.step(batch), plain.step(batch)
        assert a.loss == b.loss and a.lr == b.lr
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), plain_model.parameters()))


def test_an_fp16_prepared_optimizer_is_refused_in_one_line():
    model, _ = twins()
    wrapped = accelerate.optimizer.AcceleratedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                                        scaler=torch.amp.GradScaler("cpu"))
    with pytest.raises(ValueError, match=r"pass the optimizer it wraps \(optimizer.optimizer\) and amp_dtype"):
        autoaccum.fit(model, 16, wrapped, loss_fn=loss, micro_batch=4)
