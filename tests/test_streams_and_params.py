"""The list of trained tensors (re-made only when something that decides it changed) and the
random-stream snapshots a retried or rolled-back step restores."""
import random

import numpy as np
import pytest
import torch
from torch import nn

from autoaccum import rng
from autoaccum.trainable import Trainable


def make():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def test_an_unchanged_model_gives_the_same_list_without_walking_it(monkeypatch):
    model, opt = make()
    watch = Trainable(model, opt)
    first = watch.current()
    assert first == list(model.parameters())
    walked = []
    real = nn.Module.parameters
    monkeypatch.setattr(nn.Module, "parameters", lambda self, *a, **k: walked.append(1) or real(self, *a, **k))
    for _ in range(3):
        assert watch.current() is first
    assert not walked, "an unchanged model must not be walked again"


def test_freezing_and_unfreezing_are_seen():
    model, opt = make()
    watch = Trainable(model, opt)
    model[0].requires_grad_(False)
    assert watch.current() == list(model[1].parameters())
    assert [id(p) for p in watch.frozen_held] == [id(p) for p in model[0].parameters()]
    model[0].requires_grad_(True)
    assert watch.current() == list(model.parameters()) and not watch.frozen_held


def test_a_replaced_layer_and_a_new_param_group_are_seen():
    model, opt = make()
    watch = Trainable(model, opt)
    old = list(model[1].parameters())
    model[1] = nn.Linear(4, 2)                        # registered through torch: counted
    now = {id(p) for p in watch.current()}
    assert {id(p) for p in model.parameters()} <= now
    assert {id(p) for p in old} <= now, "the optimizer still holds the old layer's parameters"
    temperature = nn.Parameter(torch.ones(()))
    opt.add_param_group({"params": [temperature]})
    assert watch.current()[-1] is temperature
    opt.param_groups[-1]["params"][0] = other = nn.Parameter(torch.ones(()))   # edited in place
    assert watch.current()[-1] is other


def test_a_parameter_put_behind_torchs_back_needs_rescan():
    model, opt = make()
    watch = Trainable(model, opt)
    model[0]._parameters["extra"] = extra = nn.Parameter(torch.ones(2))
    assert all(p is not extra for p in watch.current())   # documented: not seen by itself
    watch.rescan()
    assert any(p is extra for p in watch.current())


def test_numpy_snapshots_restore_exactly_whatever_ran_between():
    np.random.seed(5)
    for draw in (lambda: np.random.rand(3), lambda: np.random.randn(3), lambda: np.random.randint(0, 9, 700)):
        state = rng.capture()
        again = rng.capture()
        first = draw()
        rng.restore(again)
        assert np.array_equal(first, draw())
        rng.restore(state)
        assert np.array_equal(first, draw())


def test_a_used_up_cached_gaussian_is_not_mistaken_for_an_unchanged_stream():
    """Legacy randn caches a second value: using it up changes the state without a draw."""
    np.random.seed(11)
    np.random.randn()                                  # one value cached now
    rng.capture()
    state = rng.capture()
    cached = np.random.randn()                         # uses the cache: the generator did not move
    later = rng.capture()
    assert later.numpy[3] == 0, "the snapshot after must say the cache is empty"
    rng.restore(state)
    assert np.random.randn() == cached


@pytest.mark.parametrize("kind", ["PCG64", "Philox", "SFC64"])
def test_other_bit_generators_survive_a_weights_only_checkpoint(tmp_path, kind):
    if not hasattr(np.random, "set_bit_generator"):
        pytest.skip("numpy without set_bit_generator")
    old = np.random.get_bit_generator()
    try:
        np.random.set_bit_generator(getattr(np.random, kind)(5))
        np.random.standard_normal()
        path = tmp_path / "rng.pt"
        torch.save(rng.to_dict(rng.capture()), path)
        x = np.random.rand(4)
        rng.restore(rng.from_dict(torch.load(path, weights_only=True)))
        assert np.array_equal(x, np.random.rand(4))
        np.random.set_bit_generator(np.random.MT19937(1))      # another kind: refused before anything
        before = np.random.get_state()[1].copy()
        with pytest.raises(ValueError, match="set the same generator"):
            rng.from_dict(torch.load(path, weights_only=True))
        assert np.array_equal(before, np.random.get_state()[1])
    finally:
        np.random.set_bit_generator(old)


def test_a_checkpoint_of_a_cached_gaussian_comes_back_after_a_rollback():
    """The reviewer's case: a checkpoint taken while numpy holds a cached Gaussian, loaded again
    in the same process after steps that used it up, is saved again with the cache."""
    np.random.seed(0)
    np.random.normal()
    saved = rng.to_dict(rng.capture())
    assert saved["numpy"][3] == 1
    np.random.normal()                                  # uses the cache up: the generator did not move
    rng.capture()
    rng.restore(rng.from_dict(saved))
    assert rng.to_dict(rng.capture())["numpy"][3] == 1


def test_reseeding_and_other_bit_generators_are_followed():
    np.random.seed(1)
    a = rng.capture()
    np.random.seed(2)
    b = rng.capture()
    assert not np.array_equal(a.numpy[1], b.numpy[1])
    if not hasattr(np.random, "set_bit_generator"):
        pytest.skip("numpy without set_bit_generator")
    old = np.random.get_bit_generator()
    try:
        np.random.set_bit_generator(np.random.PCG64(3))
        state = rng.capture()
        x = np.random.rand(4)
        rng.restore(state)
        assert np.array_equal(x, np.random.rand(4))
        back = rng.from_dict(rng.to_dict(state))        # a checkpoint of it
        rng.restore(back)
        assert np.array_equal(x, np.random.rand(4))
    finally:
        np.random.set_bit_generator(old)


def test_python_and_torch_streams_still_come_back():
    random.seed(3), torch.manual_seed(3)
    state = rng.capture()
    x = (random.random(), torch.rand(2))
    rng.restore(state)
    assert x[0] == random.random() and torch.equal(x[1], torch.rand(2))


def test_a_deleted_frozen_module_is_freed_and_seen():
    import gc
    import weakref
    model, opt = make()
    model.teacher = nn.Linear(3, 3).requires_grad_(False)
    watch = Trainable(model, opt)
    gone = weakref.ref(model.teacher.weight)
    del model.teacher
    gc.collect()
    assert gone() is None, "a frozen module must not be kept alive by the watch"
    assert watch.current() == list(model.parameters())


def test_rescan_finds_a_prebuilt_module_inserted_behind_torchs_back():
    import autoaccum
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    prebuilt = nn.Linear(3, 3)                           # registered before the trainer exists
    trainer = autoaccum.fit(model, 8, torch.optim.SGD(model.parameters(), lr=0.1),
                            loss_fn=lambda m, b: m(b).square().mean(), micro_batch=4)
    batch = torch.randn(8, 3)
    trainer.step(batch)
    model.insert(0, prebuilt)                            # writes _modules directly: no hook fires
    trainer.rescan()
    trainer.step(batch)
    assert prebuilt.weight.grad is None, "a trained tensor's gradient is cleared after the step"
    assert any(p is prebuilt.weight for p in trainer._trainable.current())


def test_an_optimizer_with_its_own_zero_grad_gets_it_called():
    """apex's DistributedFusedAdam resets its buckets in zero_grad: the trainer must not skip it."""
    import autoaccum

    class Bucketed(torch.optim.SGD):
        resets = 0

        def zero_grad(self, set_to_none=True):
            Bucketed.resets += 1
            super().zero_grad(set_to_none=set_to_none)

    model = nn.Linear(3, 2)
    trainer = autoaccum.fit(model, 8, Bucketed(model.parameters(), lr=0.1),
                            loss_fn=lambda m, b: m(b).square().mean(), micro_batch=4)
    trainer.step(torch.randn(8, 3))
    assert Bucketed.resets >= 1


def test_zero_grad_overrides_without_the_keyword_and_forwarding_wrappers_work():
    """Review: a zero_grad(self) override, and a wrapper forwarding attributes to an optimizer,
    both broke the step after the optimizer had written."""
    import autoaccum

    class NoKeyword(torch.optim.SGD):
        def zero_grad(self):
            super().zero_grad()

    class Forwarding:
        def __init__(self, opt):
            self.opt = opt

        def __getattr__(self, name):
            return getattr(self.opt, name)

    for make in (lambda ps: NoKeyword(ps, lr=0.1), lambda ps: Forwarding(torch.optim.SGD(ps, lr=0.1))):
        model = nn.Linear(3, 2)
        trainer = autoaccum.fit(model, 8, make(model.parameters()),
                                loss_fn=lambda m, b: m(b).square().mean(), micro_batch=4)
        for _ in range(2):
            trainer.step(torch.randn(8, 3))
        assert trainer.steps == 2 and all(p.grad is None for p in model.parameters())


def test_a_scheduler_raising_after_the_update_leaves_a_completed_step():
    """The optimizer wrote: the update stands, the step is counted, the gradients are freed and the
    random streams are not rewound; the error goes on (before, the step rolled the streams back as
    if nothing had happened, though the parameters had moved)."""
    import autoaccum

    class Broken(torch.optim.lr_scheduler.LambdaLR):
        def step(self, *a, **k):
            if getattr(self, "armed", False):
                raise RuntimeError("scheduler broke")
            super().step(*a, **k)

    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = Broken(opt, lambda s: 1.0)
    noisy = lambda m, b: (m(b) * (1 + 0 * torch.rand(()))).square().mean()   # draws from the stream  # noqa: E731
    trainer = autoaccum.fit(model, 8, opt, loss_fn=noisy, micro_batch=4, scheduler=sched)
    batch = torch.randn(8, 3)
    before = [p.detach().clone() for p in model.parameters()]
    sched.armed = True
    stream = torch.get_rng_state()
    with pytest.raises(RuntimeError, match="scheduler broke"):
        trainer.step(batch)
    assert trainer.steps == 1
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters())), "the update stands"
    assert all(p.grad is None for p in model.parameters())
    assert not torch.equal(stream, torch.get_rng_state()), "a completed step's draws are not rewound"
