"""Models, losses and a plain full-batch reference step shared by the tests."""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn


def mlp(dtype=torch.float64, seed=0, d_in=12, hidden=32, d_out=5) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.GELU(),
                         nn.Linear(hidden, d_out)).to(dtype)


def regression_batch(n, dtype=torch.float64, seed=1, d_in=12, d_out=5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d_in, generator=g, dtype=dtype), torch.randn(n, d_out, generator=g, dtype=dtype)


def mse_loss(model, batch):
    x, y = batch
    return F.mse_loss(model(x), y)


def oom_above(limit, error=lambda: torch.OutOfMemoryError("CUDA out of memory (injected above the limit)")):
    """An mse loss_fn that runs out of memory (``error()``) for micro-batches of more than ``limit`` samples."""
    def loss_fn(model, batch):
        if batch[0].shape[0] > limit:
            raise error()
        return mse_loss(model, batch)
    return loss_fn


def params_of(model):
    return [p.detach().clone() for p in model.parameters()]


def max_abs_diff(a, b) -> float:
    pa = a.parameters() if isinstance(a, nn.Module) else a
    pb = b.parameters() if isinstance(b, nn.Module) else b
    return max((x.detach().double() - y.detach().double()).abs().max().item() for x, y in zip(pa, pb))


def twin(model, make_opt, make_sched=None):
    """A deep copy of ``model`` with a fresh optimizer (and scheduler) built the same way."""
    m = copy.deepcopy(model)
    opt = make_opt(m.parameters())
    return m, opt, (make_sched(opt) if make_sched else None)


def reference_step(model, opt, batch, loss_fn, *, max_grad_norm=None, sched=None) -> float:
    """The update autoaccum must reproduce: one plain step on the whole batch."""
    opt.zero_grad(set_to_none=True)
    loss = loss_fn(model, batch)
    loss.backward()
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    opt.step()
    if sched is not None:
        sched.step()
    return loss.item()


def state_snapshot(model, opt):
    """Bitwise copies of parameters, buffers and optimizer state, for "nothing changed" checks."""
    return (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()))


def assert_state_equal(model, opt, snapshot):
    params, ostate = snapshot
    for k, v in model.state_dict().items():
        assert torch.equal(v, params[k]), f"model state {k} changed"
    now = opt.state_dict()
    assert now["param_groups"] == ostate["param_groups"], "optimizer param_groups changed"
    assert now["state"].keys() == ostate["state"].keys(), "optimizer state keys changed"
    for idx, st in ostate["state"].items():
        for key, val in st.items():
            other = now["state"][idx][key]
            if isinstance(val, torch.Tensor):
                assert torch.equal(other, val), f"optimizer state {idx}.{key} changed"
            else:
                assert other == val


def convnet(dtype=torch.float32, seed=0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
                         nn.Dropout(0.1), nn.Linear(32 * 16, 10)).to(dtype)


def image_batch(n, dtype=torch.float32, seed=2, size=32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g, dtype=dtype), torch.randint(0, 10, (n,), generator=g)


def ce_loss(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)
