"""The fp32 gradient buffer: hooks, views, precision, and the trainer on top of it."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import autoaccum
from autoaccum import update
from autoaccum.buffer import ALIGN, GradBuffer
from helpers import max_abs_diff, mlp, mse_loss, reference_step, regression_batch, twin


def test_views_share_one_aligned_buffer_and_hooks_fold_gradients():
    model = mlp(torch.float32)
    params = list(model.parameters())
    buf = GradBuffer(params, torch.float32)
    flat = buf.flat[(torch.device("cpu"), torch.float32)]
    for p in params:
        v = buf.views[id(p)]
        assert v.shape == p.shape and v.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()
        assert v.storage_offset() % ALIGN == 0
    x, y = regression_batch(8, torch.float32)
    buf.begin_step()
    for w in (0.25, 0.75):
        buf.weight = w
        with buf.capturing():
            mse_loss(model, (x, y)).backward()
        assert all(p.grad is None for p in params), "the hook frees autograd's gradient at once"
    ref = copy.deepcopy(model)
    mse_loss(ref, (x, y)).backward()
    for (p, view), q in zip(buf.written(), ref.parameters()):
        assert torch.allclose(view, q.grad, atol=1e-6)
    buf.remove()


def test_hooks_are_inert_outside_capturing_and_go_with_the_buffer():
    """A backward the user runs outside a step sees plain autograd; a dropped buffer frees itself."""
    import gc
    import weakref
    model = mlp(torch.float32)
    buf = GradBuffer(list(model.parameters()), torch.float32)
    buf.begin_step()
    mse_loss(model, regression_batch(4, torch.float32)).backward()
    assert all(p.grad is not None for p in model.parameters())
    assert buf.written() == []
    gone = weakref.ref(buf)
    del buf
    gc.collect()
    assert gone() is None, "the parameters' hooks must not keep the buffer (and its memory) alive"
    assert not any(p._post_accumulate_grad_hooks for p in model.parameters())


def test_a_second_trainer_on_the_same_model_trains_like_the_first():
    """fit() twice on one model (e.g. a new run after a probe or a restart): the old trainer's
    hooks must not take the new one's gradients."""
    make = lambda: mlp(torch.bfloat16)
    opt_for = lambda m: torch.optim.SGD(m.parameters(), lr=0.1)
    model = make()
    fresh = copy.deepcopy(model)
    old = autoaccum.fit(model, 16, opt_for(model), loss_fn=mse_loss, micro_batch=8)
    old.step(regression_batch(16, torch.bfloat16, seed=0))
    fresh.load_state_dict(model.state_dict())
    batch = regression_batch(16, torch.bfloat16, seed=1)
    new = autoaccum.fit(model, 16, opt_for(model), loss_fn=mse_loss, micro_batch=8)
    stats = new.step(batch)
    ref = autoaccum.fit(fresh, 16, opt_for(fresh), loss_fn=mse_loss, micro_batch=8).step(batch)
    assert stats.loss == ref.loss and max_abs_diff(model, fresh) == 0
    old.close()
    assert new.step(batch).loss < stats.loss
    with pytest.raises(RuntimeError, match="closed"):
        old.step(batch)


def test_a_parameter_without_gradient_gets_none_and_the_first_contribution_assigns():
    model = nn.ModuleDict({"used": nn.Linear(4, 4), "unused": nn.Linear(4, 4)})
    buf = GradBuffer(list(model.parameters()), torch.float32)
    for step in range(2):
        buf.begin_step()
        buf.weight = 1.0
        with buf.capturing():
            model["used"](torch.randn(3, 4)).sum().backward()
        written = {id(p) for p, _ in buf.written()}
        assert written == {id(p) for p in model["used"].parameters()}
        # the second step's values are that step's gradient only: assign, not add
        assert torch.allclose(buf.views[id(model["used"].bias)], torch.full((4,), 3.0))


def test_small_buckets_flush_during_backward_with_the_same_result():
    model = mlp(torch.float32)
    x, y = regression_batch(8, torch.float32)
    results = []
    for bucket in (1 << 30, 64):
        buf = GradBuffer(list(model.parameters()), torch.float32, bucket_bytes=bucket)
        buf.begin_step()
        buf.weight = 0.5
        with buf.capturing():
            mse_loss(model, (x, y)).backward()
        results.append([v.clone() for _, v in buf.written()])
        buf.remove()
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_bf16_model_64_micro_batches_fp32_buffer_beats_autograd_accumulation():
    """The reason the buffer exists: bf16 .grad accumulation rounds small contributions away.

    The reference sums the very same bf16 micro-batch gradients in float64, so what is measured
    is the accumulation alone (the bf16 forward/backward is identical in all three).
    """
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 64)).to(torch.bfloat16)
    gen = torch.Generator().manual_seed(1)
    xs = [torch.randn(4, 64, generator=gen).bfloat16() for _ in range(64)]
    ys = [torch.randn(4, 64, generator=gen).bfloat16() for _ in range(64)]
    w = 1 / 64   # a power of two: scaling the loss by it is exact in bf16, so every path sees the same grads

    exact = copy.deepcopy(model)
    ref = [torch.zeros(p.shape, dtype=torch.float64) for p in exact.parameters()]
    for x, y in zip(xs, ys):
        exact.zero_grad(set_to_none=True)
        F.mse_loss(exact(x), y).backward()
        for r, p in zip(ref, exact.parameters()):
            r += w * p.grad.double()

    auto = copy.deepcopy(model)
    for x, y in zip(xs, ys):
        (F.mse_loss(auto(x), y) * w).backward()

    buffered = copy.deepcopy(model)
    buf = GradBuffer(list(buffered.parameters()), torch.float32)
    buf.begin_step()
    buf.weight = w
    with buf.capturing():
        for x, y in zip(xs, ys):
            F.mse_loss(buffered(x), y).backward()

    def rel_err(grads):
        num = sum((g.double() - r).norm() ** 2 for g, r in zip(grads, ref)) ** 0.5
        return (num / sum(r.norm() ** 2 for r in ref) ** 0.5).item()
    err_auto = rel_err([p.grad for p in auto.parameters()])
    err_buf = rel_err([v for _, v in buf.written()])
    assert err_buf < 1e-6, err_buf                     # float32 rounding
    assert err_auto > 100 * err_buf, (err_auto, err_buf)   # bf16 accumulation: orders of magnitude worse


def run_pair(make_model, target, micro, make_opt=lambda ps: torch.optim.AdamW(ps, lr=1e-2), **fit_kw):
    model = make_model()
    ref, ref_opt, _ = twin(model, make_opt)
    acc, acc_opt, _ = twin(model, make_opt)
    trainer = autoaccum.fit(acc, target, acc_opt, loss_fn=mse_loss, micro_batch=micro, **fit_kw)
    for s in range(3):
        batch = regression_batch(target, dtype=next(model.parameters()).dtype, seed=s)
        reference_step(ref, ref_opt, batch, mse_loss, max_grad_norm=fit_kw.get("max_grad_norm"))
        trainer.step(batch)
    return ref, acc, trainer


def test_float64_buffer_keeps_the_exactness_guarantee():
    ref, acc, trainer = run_pair(mlp, 100, 7, accum_dtype=torch.float64, max_grad_norm=0.05)
    assert trainer.buffer is not None and trainer.buffer.dtype == torch.float64
    assert max_abs_diff(ref, acc) <= 1e-12
    assert all(p.grad is None for p in acc.parameters())


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_float32_buffer_through_each_backend_matches_the_full_batch(monkeypatch, backend):
    monkeypatch.setenv("AUTOACCUM_BACKEND", backend)
    ref, acc, trainer = run_pair(lambda: mlp(torch.float32), 40, 9, accum_dtype=torch.float32, max_grad_norm=0.5)
    assert max_abs_diff(ref, acc) <= 1e-5


def test_auto_uses_the_buffer_for_low_precision_parameters_only():
    bf16 = mlp(torch.bfloat16)
    assert autoaccum.fit(bf16, 8, torch.optim.SGD(bf16.parameters(), lr=0.1), loss_fn=mse_loss,
                         micro_batch=4).buffer is not None
    f32 = mlp(torch.float32)
    assert autoaccum.fit(f32, 8, torch.optim.SGD(f32.parameters(), lr=0.1), loss_fn=mse_loss,
                         micro_batch=4).buffer is None


@pytest.mark.parametrize("master", [False, True])
def test_bf16_parameters_update_by_cast_or_fp32_masters(master):
    torch.manual_seed(0)
    model = mlp(torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    trainer = autoaccum.fit(model, 32, opt, loss_fn=mse_loss, micro_batch=8, master_weights=master)
    before = [p.detach().clone() for p in model.parameters()]
    for s in range(3):
        stats = trainer.step(regression_batch(32, torch.bfloat16, seed=s))
        assert not stats.skipped
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    state_dtypes = {v.dtype for st in opt.state.values() for v in st.values() if v.dim() > 0}
    if master:
        assert state_dtypes == {torch.float32}, "the optimizer sees fp32 weights and keeps fp32 state"
        masters = trainer.updater.masters()
        for p in model.parameters():
            assert torch.equal(p, masters[id(p)].to(torch.bfloat16)), "the model holds the rounded master"
    else:
        assert state_dtypes == {torch.bfloat16}


def test_master_weights_follow_a_parameter_changed_outside_training():
    model = mlp(torch.bfloat16)
    trainer = autoaccum.fit(model, 16, torch.optim.SGD(model.parameters(), lr=0.0), loss_fn=mse_loss,
                            micro_batch=8, master_weights=True)
    trainer.step(regression_batch(16, torch.bfloat16))
    with torch.no_grad():
        model[0].weight.fill_(0.5)           # e.g. a checkpoint load
    trainer.step(regression_batch(16, torch.bfloat16))
    assert torch.all(model[0].weight == 0.5), "lr=0 keeps the loaded value, not the stale master"


def test_fused_optimizer_takes_the_scale_instead_of_a_write_pass(monkeypatch):
    """Clipping folded into fused AdamW (grad_scale, found_inf) equals the write pass it replaces."""
    make_model = lambda: mlp(torch.float32)
    fused = lambda ps: torch.optim.AdamW(ps, lr=1e-2, fused=True)
    ref, folded, trainer = run_pair(make_model, 40, 9, make_opt=fused, accum_dtype=torch.float32, max_grad_norm=0.05)
    opt = trainer.optimizer
    assert update.can_fold(opt, [torch.zeros(1)], 1.0, 0.05)
    assert not update.can_fold(opt, [torch.zeros(1, dtype=torch.float64)], 1.0, 0.05)
    assert not update.can_fold(opt, [torch.zeros(1)], 1.0, None), "nothing to fold: no factor"
    calls = []
    monkeypatch.setattr(update, "can_fold", lambda *args: calls.append(1) and False)
    _, written, _ = run_pair(make_model, 40, 9, make_opt=fused, accum_dtype=torch.float32, max_grad_norm=0.05)
    assert calls, "the second run took the write pass"
    assert max_abs_diff(written, folded) <= 1e-6 and max_abs_diff(ref, folded) <= 1e-5
    assert not hasattr(trainer.optimizer, "grad_scale") and not hasattr(trainer.optimizer, "found_inf")


def test_fp16_parameters_with_fp16_autocast_train_and_skip_on_overflow():
    model = mlp(torch.float16)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    trainer = autoaccum.fit(model, 32, opt, loss_fn=mse_loss, micro_batch=8, amp_dtype=torch.float16)
    assert trainer.buffer is not None and trainer.scaler is not None
    losses = [trainer.step(regression_batch(32, torch.float16, seed=0)).loss for _ in range(5)]
    assert losses[-1] < losses[0]
    scale = trainer.scaler.get_scale()
    trainer.loss_fn = lambda m, b: mse_loss(m, b) * float("inf")
    before = [p.detach().clone() for p in model.parameters()]
    assert trainer.step(regression_batch(32, torch.float16)).skipped
    assert trainer.scaler.get_scale() == scale / 2
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_probe_counts_the_buffer_and_master_weights():
    model = mlp(torch.bfloat16, hidden=256)
    opt = torch.optim.AdamW(model.parameters())
    fixed = {}
    for accum, master in [(None, False), ("auto", False), ("auto", True)]:
        r = autoaccum.probe(model, regression_batch(4, torch.bfloat16), optimizer=opt, loss_fn=mse_loss,
                            memory_budget="8MiB", cache=False, accum_dtype=accum, master_weights=master)
        fixed[(accum, master)] = r.trials[-1].base_bytes
    assert fixed[(None, False)] < fixed[("auto", False)] < fixed[("auto", True)]
    assert all(p.grad is None for p in model.parameters()) and len(opt.state) == 0
    assert not any(p._post_accumulate_grad_hooks for p in model.parameters()), "hooks removed"
