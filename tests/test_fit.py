"""``autoaccum.fit(model, target_batch=256)`` as written: a default optimizer, and the micro-batch
probed on the first batch given to ``step``."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import autoaccum
from helpers import max_abs_diff


class OwnLoss(nn.Module):
    """A model that returns its own loss, as Hugging Face models do."""

    def __init__(self, dtype=torch.float64):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(32, 256), nn.GELU(), nn.Linear(256, 10)).to(dtype)

    def forward(self, x, y):
        return {"loss": F.cross_entropy(self.body(x), y)}


def batch(n=256, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 32, generator=g, dtype=dtype), torch.randint(0, 10, (n,), generator=g)


def full_batch_adamw(model, data):
    """The reference: one plain AdamW step (torch's defaults) on the whole batch."""
    model = copy.deepcopy(model)
    opt = torch.optim.AdamW(model.parameters())
    model(*data)["loss"].backward()
    opt.step()
    return model


def test_fit_as_written_probes_the_first_batch_and_trains():
    model = OwnLoss()
    trainer = autoaccum.fit(model, target_batch=256)
    assert trainer.plan is None and "probed on the first batch" in repr(trainer)
    assert isinstance(trainer.optimizer, torch.optim.AdamW) and trainer.default_optimizer
    assert "AdamW(lr=0.001, weight_decay=0.01, default)" in repr(trainer)
    expected = full_batch_adamw(model, batch())
    stats = trainer.step(batch())
    assert trainer.plan is not None and trainer.probe_result is not None
    assert stats.micro_batches == [256], "plenty of memory: one micro-batch"
    assert all(t.micro_batch <= 256 for t in trainer.probe_result.trials), "never more than the per-rank batch"
    assert max_abs_diff(model, expected) <= 1e-12
    assert "target 256 = 1 micro-batch" in repr(trainer)


def test_a_small_budget_splits_the_batch_and_the_update_is_still_exact():
    model = OwnLoss()
    trainer = autoaccum.fit(model, target_batch=256, memory_budget="640KiB")
    expected = full_batch_adamw(model, batch())
    stats = trainer.step(batch())
    assert len(stats.micro_batches) > 1 and sum(stats.micro_batches) == 256, trainer.probe_result.table()
    assert trainer.plan.micro_batch == trainer.probe_result.max_micro_batch < 256
    assert max_abs_diff(model, expected) <= 1e-12
    second = trainer.step(batch(seed=2))            # later steps keep the plan: no second probe
    assert second.micro_batches == stats.micro_batches and trainer.probe_result is not None


def test_a_bad_first_batch_is_rejected_before_anything_runs_and_sizing_waits_for_a_good_one():
    model = OwnLoss()
    trainer = autoaccum.fit(model, target_batch=128)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="share of target_batch=128 is 128"):
        trainer.step(batch(200))
    assert trainer.plan is None and len(trainer.optimizer.state) == 0
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert trainer.step(batch(128)).micro_batches == [128]


def test_the_probe_leaves_the_random_stream_the_step_would_have_seen():
    """Dropout draws the same numbers whether or not the first step probed."""
    class Dropping(OwnLoss):
        def forward(self, x, y):
            return {"loss": F.cross_entropy(F.dropout(self.body(x), 0.5), y)}
    a, b = Dropping(), Dropping()
    lazy = autoaccum.fit(a, target_batch=64)
    fixed = autoaccum.fit(b, target_batch=64, optimizer=torch.optim.AdamW(b.parameters()), micro_batch=64)
    torch.manual_seed(5)
    lazy.step(batch(64))
    torch.manual_seed(5)
    fixed.step(batch(64))
    assert max_abs_diff(a, b) == 0


def test_a_micro_batch_set_by_hand_before_the_first_step_skips_the_probe():
    trainer = autoaccum.fit(OwnLoss(), target_batch=256)
    assert trainer.set_micro_batch(64).micro_batches == [64] * 4
    assert trainer.step(batch()).micro_batches == [64] * 4 and trainer.probe_result is None


def test_default_optimizer_arguments():
    model = OwnLoss()
    with pytest.raises(ValueError, match="scheduler needs the optimizer it was built for"):
        other = torch.optim.SGD(model.parameters(), lr=0.1)
        autoaccum.fit(model, 256, scheduler=torch.optim.lr_scheduler.StepLR(other, 1))
    with pytest.raises(ValueError, match="memory_budget"):
        autoaccum.fit(model, 256, memory_budget="lots")
    with pytest.raises(TypeError, match="probe_cache"):
        autoaccum.fit(model, 256, probe_cache="no")
    given = autoaccum.fit(model, 256, micro_batch=32)
    assert isinstance(given.optimizer, torch.optim.AdamW) and given.plan.micro_batch == 32


@pytest.mark.cuda
def test_the_default_optimizer_is_fused_on_cuda():
    model = OwnLoss(torch.float32).cuda()
    trainer = autoaccum.fit(model, 64, micro_batch=16)
    assert trainer.optimizer.param_groups[0]["fused"] is True
    trainer.step(tuple(t.cuda() for t in batch(64, torch.float32)))
