"""Runtime out-of-memory recovery in one process, through fault injection in the public API."""
import gc
import logging
import tracemalloc
import warnings

import pytest
import torch
from torch import nn

import autoaccum
from helpers import (assert_state_equal, max_abs_diff, mlp, mse_loss, oom_above, regression_batch, state_snapshot,
                     twin)


class Injector:
    """A loss_fn that raises torch.OutOfMemoryError at chosen (call number) points, in forward or backward."""

    def __init__(self, base=mse_loss, at=(), in_backward=False):
        self.base, self.at, self.in_backward = base, set(at), in_backward
        self.calls = 0

    def __call__(self, model, batch):
        self.calls += 1
        if self.calls in self.at:
            if not self.in_backward:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB (injected)")
            loss = self.base(model, batch)
            return loss + _raise_in_backward(loss)
        return self.base(model, batch)


def _raise_in_backward(x):
    class Boom(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            return t * 0

        @staticmethod
        def backward(ctx, g):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected in backward)")
    return Boom.apply(x)


def trainers(micro_clean, micro_faulty, injector, make_model=mlp, **kw):
    model = make_model()
    make_opt = lambda ps: torch.optim.AdamW(ps, lr=1e-2)
    clean_m, clean_opt, _ = twin(model, make_opt)
    fault_m, fault_opt, _ = twin(model, make_opt)
    clean = autoaccum.fit(clean_m, 64, clean_opt, loss_fn=mse_loss, micro_batch=micro_clean, **kw)
    faulty = autoaccum.fit(fault_m, 64, fault_opt, loss_fn=injector, micro_batch=micro_faulty, **kw)
    return clean, faulty


@pytest.mark.parametrize("in_backward", [False, True])
@pytest.mark.parametrize("accum_dtype", [None, torch.float64])
def test_retry_with_the_same_split_is_bit_identical(in_backward, accum_dtype):
    injector = Injector(at={4 + 2}, in_backward=in_backward)   # step 2 (4 micro-batches per step), micro-batch 1
    clean, faulty = trainers(8, 16, injector, accum_dtype=accum_dtype)
    faulty.set_micro_batch(16)
    for s in range(3):
        batch = regression_batch(64, seed=s)
        clean.step(batch)
        stats = faulty.step(batch)
        if s == 1:
            assert stats.oom_retries == 1 and stats.micro_batch_limit == 8
            assert "out of memory in micro-batch 1 (16 samples)" in stats.events[0]
            assert stats.micro_batches == [8] * 8
    # step 0 ran [16 x4] against [8 x8] (equal to rounding); from the retry on both run [8 x8]
    for p, q in zip(clean.model.parameters(), faulty.model.parameters()):
        assert (p - q).abs().max().item() <= 1e-12


def test_retry_with_a_different_split_matches_to_rounding():
    injector = Injector(at={3})
    clean, faulty = trainers(8, 12, injector)
    for s in range(3):
        batch = regression_batch(64, seed=s)
        clean.step(batch)
        faulty.step(batch)
    assert faulty.plan.micro_batch == 5 and faulty.oom_retries == 1   # 64 = [11 x4, 10 x2]; half of 11
    assert max_abs_diff(clean.model, faulty.model) <= 1e-12


def test_same_split_bitwise():
    injector = Injector(at={2})
    clean, faulty = trainers(8, 16, injector)
    batch = regression_batch(64, seed=0)
    clean.step(batch)
    faulty.step(batch)
    assert all(torch.equal(p, q) for p, q in zip(clean.model.parameters(), faulty.model.parameters()))


def test_retry_sees_the_random_stream_a_first_attempt_would():
    """Dropout: the retry at micro-batch 4 must equal a fresh run at micro-batch 4 from the same RNG state."""
    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(12, 32), nn.Dropout(0.3), nn.Tanh(), nn.Linear(32, 5)).double()
    fresh_m = model()
    retry_m = model()
    fresh = autoaccum.fit(fresh_m, 32, torch.optim.SGD(fresh_m.parameters(), lr=0.1), loss_fn=mse_loss, micro_batch=4)
    injector = Injector(at={3})     # the first attempt draws dropout masks for two micro-batches, then fails
    retry = autoaccum.fit(retry_m, 32, torch.optim.SGD(retry_m.parameters(), lr=0.1), loss_fn=injector, micro_batch=8)
    batch = regression_batch(32)
    torch.manual_seed(123)
    fresh.step(batch)
    after_fresh = torch.rand(3)
    torch.manual_seed(123)
    stats = retry.step(batch)
    after_retry = torch.rand(3)
    assert stats.oom_retries == 1 and retry.plan.micro_batch == 4
    assert all(torch.equal(p, q) for p, q in zip(fresh_m.parameters(), retry_m.parameters()))
    assert torch.equal(after_fresh, after_retry), "the stream continues exactly as after a clean step"


def test_one_sample_out_of_memory_is_a_clear_error_and_changes_nothing():
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1)
    trainer = autoaccum.fit(model, 8, opt, loss_fn=mse_loss, micro_batch=4, scheduler=sched)
    trainer.step(regression_batch(8))
    before = state_snapshot(model, opt)
    trainer.loss_fn = Injector(at=set(range(1, 100)))
    with pytest.raises(autoaccum.NotEnoughMemoryError, match=r"micro-batch of 1 sample\(s\) ran out of memory.*usable"):
        trainer.step(regression_batch(8, seed=3))
    assert_state_equal(model, opt, before)
    assert sched.last_epoch == 1 and all(p.grad is None for p in model.parameters())
    assert trainer.plan.micro_batch == 4, "a step that failed leaves the plan as it found it"


def test_other_errors_are_reraised_unchanged():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = autoaccum.fit(model, 16, opt, loss_fn=mse_loss, micro_batch=4)
    before = state_snapshot(model, opt)

    class DataError(Exception):
        pass

    def bad(m, b):
        if b[0].shape[0] and bad.n == 2:
            raise DataError("corrupt record 17")
        bad.n += 1
        return mse_loss(m, b)
    bad.n = 0
    trainer.loss_fn = bad
    model.append(nn.Dropout(0.5))             # the micro-batches before the error draw random numbers
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    with pytest.raises(DataError, match="corrupt record 17"):
        trainer.step(regression_batch(16))
    assert torch.equal(torch.rand(3), expected), "the random streams are as before the failed step"
    assert_state_equal(model, opt, before)
    assert trainer.plan.micro_batch == 4 and trainer.oom_retries == 0


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\n"
                                                           "PYTORCH_CUDA_ALLOC_CONF hint"), MemoryError()])
def test_oom_retry_off_propagates_the_error_itself(error):
    model = mlp()

    def loss_fn(m, b):
        raise error
    trainer = autoaccum.fit(model, 16, torch.optim.SGD(model.parameters(), lr=0.1), loss_fn=loss_fn,
                            micro_batch=4, oom_retry=False)
    with pytest.raises(type(error)) as raised:
        trainer.step(regression_batch(16))
    assert raised.value is error, "the allocator's whole message (sizes, hints) reaches the user"


def test_an_oom_with_an_empty_message_is_recovered():
    """Python's own MemoryError often has no message at all."""
    model = mlp()
    trainer = autoaccum.fit(model, 16, torch.optim.SGD(model.parameters(), lr=0.1), loss_fn=oom_above(4, MemoryError),
                            micro_batch=16)
    st = trainer.step(regression_batch(16))
    assert st.micro_batch_limit == 4 and "MemoryError" in st.events[0]


def test_batchnorm_stats_are_not_counted_twice():
    def bn():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(12, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 5)).double()
    clean_m, faulty_m = bn(), bn()
    clean = autoaccum.fit(clean_m, 32, torch.optim.SGD(clean_m.parameters(), lr=0.1), loss_fn=mse_loss,
                          micro_batch=8, batchnorm="micro")
    faulty = autoaccum.fit(faulty_m, 32, torch.optim.SGD(faulty_m.parameters(), lr=0.1),
                           loss_fn=Injector(at={2}), micro_batch=16, batchnorm="micro")
    batch = regression_batch(32)
    clean.step(batch)
    faulty.step(batch)
    assert int(faulty_m[1].num_batches_tracked) == 4 == int(clean_m[1].num_batches_tracked)
    assert torch.equal(clean_m[1].running_mean, faulty_m[1].running_mean)


def test_regrow_after_clean_steps_and_back_off():
    model = mlp()
    trainer = autoaccum.fit(model, 64, torch.optim.SGD(model.parameters(), lr=0.01), loss_fn=oom_above(8),
                            micro_batch=32, regrow_after=2)
    limits, events, steps = [], [], []
    for s in range(12):
        st = trainer.step(regression_batch(64, seed=s))
        limits.append(st.micro_batch_limit)
        events += st.events
        steps.append(st)
    assert limits[0] == 8                                     # 32 -> 16 -> 8 in the first step
    # one accumulation step fewer: 8 micro-batches of 8 -> 7 of at most 10
    assert any("regrowing the micro-batch from 8 to 10" in e for e in events)
    # 10 fails -> back to 8, which ran cleanly (not 10 // 2); the wait doubles
    assert limits == [8] * 12, limits
    regrows = [i for i, st in enumerate(steps) if any("regrowing" in e for e in st.events)]
    assert len(regrows) >= 2 and regrows[1] - regrows[0] > regrows[0] - 0


def test_regrowth_climbs_one_accumulation_step_at_a_time_up_to_what_fits():
    model = mlp()
    trainer = autoaccum.fit(model, 64, torch.optim.SGD(model.parameters(), lr=0.01), loss_fn=oom_above(12),
                            micro_batch=32, regrow_after=1)
    limits = [trainer.step(regression_batch(64, seed=s)).micro_batch_limit for s in range(12)]
    assert limits[0] == 8 and 10 in limits and limits[-1] == 11   # 8 -> 10 (7 steps) -> 11 (6); 13 fails -> 11
    assert min(limits[1:]) >= 8


def test_a_thousand_recoveries_do_not_grow_memory(caplog):
    model = mlp(torch.float32, hidden=64)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    injector = Injector()
    trainer = autoaccum.fit(model, 16, opt, loss_fn=injector, micro_batch=8)
    batch = regression_batch(16, torch.float32)

    def run(steps):
        for _ in range(steps):
            trainer.set_micro_batch(8)
            injector.at = {injector.calls + 1}          # the first micro-batch of the first attempt fails
            st = trainer.step(batch)
            assert st.oom_retries == 1 and st.micro_batch_limit == 4

    def live_tensors():
        gc.collect()
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))

    # Keep the 1,050 warnings out of pytest's log capture, which would grow by design.
    caplog.set_level(logging.ERROR, logger="autoaccum")   # restored (and logging's cache cleared) after the test
    gc.freeze()   # each recovery runs gc.collect(); freezing the objects that exist already keeps it cheap
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run(50)                                           # warm up caches (tables, allocator)
        tracemalloc.start()
        tensors_before = live_tensors()
        snap_before = tracemalloc.take_snapshot()
        run(1000)
        tensors_after = live_tensors()
        snap_after = tracemalloc.take_snapshot()
        tracemalloc.stop()
    gc.unfreeze()
    growth = sum(s.size_diff for s in snap_after.compare_to(snap_before, "filename"))
    assert trainer.oom_retries == 1050
    assert tensors_after <= tensors_before + 2, (tensors_before, tensors_after)
    assert growth < 256 * 1024, f"python memory grew by {growth} bytes over 1000 recoveries"
