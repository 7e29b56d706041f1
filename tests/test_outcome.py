"""A step's outcome read late (autoaccum.outcome): with a fused optimizer on CUDA the trainer steps
it with the skip flag on the device; counting the step and stepping the scheduler wait until the
outcome is read. Forced here on the CPU (torch's CPU fused AdamW and SGD take found_inf too) and
held to the eager path, bitwise."""
import copy
import dataclasses
import gc
import math
import pickle
import weakref

import pytest
import torch

import autoaccum
from helpers import mlp, mse_loss, regression_batch


def batches(bad_grad=(2,), bad_loss=(4,), n=6):
    out = []
    for i in range(n):
        x, y = regression_batch(16, seed=i + 1)
        if i in bad_grad:
            x = x.clone()
            x[3, 0] = float("inf")      # tanh(inf) is finite, its weight gradient is not: skipped
        if i in bad_loss:
            y = y.clone()
            y[0, 0] = float("inf")      # a non-finite loss: skipped
        out.append((x, y))
    return out


def make(defer: bool, clip: float | None = 1.0, optimizer=None, scheduler=None):
    model = mlp()
    opt = (optimizer or (lambda ps: torch.optim.AdamW(ps, lr=1e-2, fused=True)))(model.parameters())
    sched = (scheduler or (lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0 / (1 + s))))(opt)
    trainer = autoaccum.fit(model, 16, opt, loss_fn=mse_loss, micro_batch=5, scheduler=sched, max_grad_norm=clip)
    trainer._defer = defer
    return model, opt, sched, trainer


def same_run(a, b):
    (m0, o0, s0, t0), (m1, o1, s1, t1) = a, b
    t0.steps, t1.steps          # reading a counter settles a pending step (its scheduler step)
    assert all(torch.equal(p, q) for p, q in zip(m0.parameters(), m1.parameters()))
    assert len(o0.state) == len(o1.state)
    for p0, p1 in zip(m0.parameters(), m1.parameters()):
        assert o0.state[p0].keys() == o1.state[p1].keys()
        assert all(torch.equal(v, o1.state[p1][k]) for k, v in o0.state[p0].items())
    assert s0.state_dict() == s1.state_dict()
    assert [g["lr"] for g in o0.param_groups] == [g["lr"] for g in o1.param_groups]
    assert (t0.steps, t0.skipped_steps) == (t1.steps, t1.skipped_steps)


@pytest.mark.parametrize("clip", [1.0, None])
def test_deferred_outcome_gives_the_eager_run_bitwise(clip):
    runs = {}
    for defer in (False, True):
        model, opt, sched, trainer = make(defer, clip)
        stats = [trainer.step(b) for b in batches()]
        if defer:
            assert not stats[-1].settled and stats[0].settled   # each settled by the next step's update
        runs[defer] = (model, opt, sched, trainer, stats)
    same_run(runs[False][:4], runs[True][:4])
    st0, st1 = runs[False][4], runs[True][4]
    assert (runs[True][3].steps, runs[True][3].skipped_steps) == (4, 2)
    for a, b in zip(st0, st1):
        assert (a.skipped, a.grad_norm, a.events, a.lr) == (b.skipped, b.grad_norm, b.events, b.lr)
        assert a.loss == b.loss or (math.isnan(a.loss) and math.isnan(b.loss))
    assert st1[2].skipped and st1[2].events == ["skipped the update: gradient norm is not finite"]
    assert st1[4].skipped and st1[4].events == ["skipped the update: loss is not finite"]


def test_the_scheduler_steps_when_a_step_settles_and_only_for_a_step_that_stood():
    model, opt, sched, trainer = make(True)
    data = batches(bad_grad=(2,), bad_loss=(), n=4)
    trainer.step(data[0])                       # no optimizer state yet: read at once
    assert sched.last_epoch == 1
    stood = trainer.step(data[1])
    assert not stood.settled and sched.last_epoch == 1       # the scheduler waits for the outcome
    before = [p.detach().clone() for p in model.parameters()]
    skipped = trainer.step(data[2])             # its update settled the previous step first
    assert stood.settled and not stood.skipped and sched.last_epoch == 2 and not skipped.settled
    assert (trainer.steps, trainer.skipped_steps) == (2, 1)  # reading a counter settles: no scheduler step
    assert skipped.skipped and skipped.grad_norm == math.inf and sched.last_epoch == 2
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))   # skipped on the device
    last = trainer.step(data[3])
    assert math.isfinite(last.loss) and sched.last_epoch == 3 and trainer.state_dict()["steps"] == 3


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


@pytest.mark.parametrize("case", ["sgd_momentum_first_step_skipped", "adamw_first_step_skipped", "tensor_lr",
                                  "exponential_lr"])
def test_the_review_cases_end_as_the_eager_run(case):
    """Found by review: a fused optimizer makes state even in a step it skips (SGD's momentum buffer
    uninitialised), so a step whose parameters have no state yet reads its outcome first; a Tensor
    learning rate and ExponentialLR (written in place, compounding) follow the eager schedule."""
    optimizer = scheduler = None
    bad = (0,) if "first_step" in case else (1,)
    if case.startswith("sgd"):
        optimizer = lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, dampening=0.5, fused=True)  # noqa: E731
    if case == "tensor_lr":
        optimizer = lambda ps: torch.optim.AdamW(ps, lr=torch.tensor(1e-2), fused=True)  # noqa: E731
    if case == "exponential_lr":
        scheduler = lambda o: torch.optim.lr_scheduler.ExponentialLR(o, 0.5)  # noqa: E731
    runs = [make(defer, optimizer=optimizer, scheduler=scheduler) for defer in (False, True)]
    for b in batches(bad_grad=bad, bad_loss=(), n=4):
        skipped = [r[3].step(b).skipped for r in runs]
        assert skipped[0] == skipped[1]
    same_run(*runs)


def test_loading_a_checkpoint_over_a_pending_skipped_step_keeps_the_checkpoint():
    _, _, sched0, t0 = make(True)
    for b in batches(bad_grad=(), bad_loss=(), n=2):
        t0.step(b)
    saved = t0.state_dict()
    model, opt, sched, trainer = make(True)
    for b in batches(bad_grad=(3,), bad_loss=(), n=4):
        trainer.step(b)                      # the last one skipped, still pending
    trainer.load_state_dict(saved)
    assert sched.state_dict() == sched0.state_dict() and (trainer.steps, trainer.skipped_steps) == (2, 0)
    assert opt.param_groups[0]["lr"] == sched.get_last_lr()[0]


@pytest.mark.parametrize("fault", ["after_write", "before_write", "interrupt"])
def test_a_fault_in_a_step_that_turns_out_skipped_goes_on_and_the_step_counts_as_skipped(fault, monkeypatch):
    """The eager path does not call the optimizer in a skipped step; the deferred one does, so a
    fault in it (here in torch's fused AdamW) surfaces, as any optimizer fault does. The step then
    counts as skipped and, the fused kernel having skipped its update, the run goes on as eager's."""
    from torch.optim import adam
    real, armed = adam._fused_adam, []

    def fused(*args, **kwargs):
        if armed:
            armed.clear()
            if fault == "before_write":
                raise RuntimeError("optimizer fault")
            real(*args, **kwargs)
            raise KeyboardInterrupt() if fault == "interrupt" else RuntimeError("optimizer fault")
        return real(*args, **kwargs)
    monkeypatch.setattr(adam, "_fused_adam", fused)
    runs = [make(defer) for defer in (False, True)]
    data = batches(bad_grad=(2,), bad_loss=(), n=4)
    for _, _, _, trainer in runs:
        trainer.step(data[0])
        trainer.step(data[1])
        armed.append(1)
        if trainer._defer:
            with pytest.raises(KeyboardInterrupt if fault == "interrupt" else RuntimeError) as raised:
                trainer.step(data[2])
            assert "counts as a skipped step" in "".join(getattr(raised.value, "__notes__", []))
        else:
            assert trainer.step(data[2]).skipped
        armed.clear()
        trainer.step(data[3])
    same_run(*runs)
    assert runs[1][3].skipped_steps == 1


def test_unsettled_stats_copy_pickle_compare_and_free_like_plain_ones():
    model, opt, sched, trainer = make(True)
    data = batches(bad_grad=(1,), bad_loss=(), n=3)
    trainer.step(data[0])
    for how in (copy.copy, copy.deepcopy, lambda s: pickle.loads(pickle.dumps(s))):
        stats = trainer.step(data[1])            # skipped: reading it settles the step once
        assert not stats.settled
        other = how(stats)
        assert type(other) is autoaccum.StepStats and other.skipped and stats.settled and other == stats
        assert (trainer.steps, trainer.skipped_steps) == (1, 1)
        trainer.load_state_dict({**trainer.state_dict(), "steps": 1, "skipped_steps": 0})
    pending = trainer.step(data[2])
    assert repr(pending).startswith("StepStats(") and pending.settled
    last = trainer.step(data[2])
    alive = weakref.ref(opt)
    del trainer, model, opt, sched
    gc.collect()
    assert alive() is None and math.isfinite(last.loss)      # unsettled stats keep nothing alive


def test_events_and_a_last_skipped_step_read_as_the_eager_ones(capsys):
    """``events`` settles like the values (the skip message comes before the empty micro-batches',
    as eager puts it); the progress bar's last line counts a skip in the last step."""
    count = lambda mb: 0.0 if bool((mb[0][:, -1] == 1234.0).all()) else float(mb[0].shape[0])  # noqa: E731
    x, y = regression_batch(16, seed=1)
    x = x.clone()
    x[12:, -1], x[3, 0] = 1234.0, float("inf")
    events = []
    for defer in (False, True):
        model = mlp()
        trainer = autoaccum.fit(model, 16, torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True),
                                loss_fn=mse_loss, micro_batch=5, count_fn=count, max_grad_norm=1.0)
        trainer._defer = defer
        trainer.step(regression_batch(16, seed=2))
        events.append(list(trainer.step((x, y)).events))
    assert events[0] == events[1] and len(events[0]) == 2 and "skipped the update" in events[0][0]
    _, _, _, trainer = make(True)
    trainer.train(batches(bad_grad=(5,), bad_loss=()), progress=True)
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith("skipped 1")


def test_a_read_interrupted_while_waiting_leaves_the_step_pending_for_the_next_reader(monkeypatch):
    from autoaccum import outcome
    runs = [make(defer) for defer in (False, True)]
    data = batches(bad_grad=(1,), bad_loss=(), n=3)
    for r in runs:
        r[3].step(data[0])
        stats = r[3].step(data[1])
    real = outcome.DeviceOutcome.read
    calls = []

    def interrupted(self):
        if not calls:
            calls.append(1)
            raise KeyboardInterrupt()
        return real(self)
    monkeypatch.setattr(outcome.DeviceOutcome, "read", interrupted)
    with pytest.raises(KeyboardInterrupt):
        runs[1][3].state_dict()
    assert not stats.settled and stats.skipped and stats.settled      # the next reader settles it
    for r in runs:
        r[3].step(data[2])
    same_run(*runs)


def test_a_reader_in_another_thread_and_the_next_step_settle_once(monkeypatch):
    """On CUDA the read waits (releasing the GIL): a logging thread reading a skipped step's stats
    while the next step runs must not let that step go on before the previous one is complete."""
    import threading
    import time
    from autoaccum import outcome
    real = outcome.DeviceOutcome.read
    monkeypatch.setattr(outcome.DeviceOutcome, "read", lambda self: (time.sleep(0.05), real(self))[1])
    runs = [make(defer) for defer in (False, True)]
    data = batches(bad_grad=(1,), bad_loss=(), n=4)
    seen = []
    for _, _, _, trainer in runs:
        trainer.step(data[0])
        stats = trainer.step(data[1])
        reader = threading.Thread(target=lambda: seen.append(stats.skipped))
        reader.start()
        time.sleep(0.01)                 # the reader is inside the read
        trainer.step(data[2])
        reader.join()
        trainer.step(data[3])
    assert seen == [True, True]
    same_run(*runs)


def test_a_trainer_dropped_with_a_step_pending_still_completes_it():
    """Re-fitting with the same optimizer and scheduler (a new target batch) drops the old trainer."""
    ends = []
    for defer in (False, True):
        model, opt, sched, trainer = make(defer)
        data = batches(bad_grad=(1,), bad_loss=(), n=3)
        trainer.step(data[0])
        trainer.step(data[1])                     # skipped; pending when deferred
        del trainer
        trainer = autoaccum.fit(model, 16, opt, loss_fn=mse_loss, micro_batch=5, scheduler=sched, max_grad_norm=1.0)
        trainer._defer = defer
        trainer.step(data[2])
        trainer.steps                             # settles it: its scheduler step
        ends.append((sched.last_epoch, opt.param_groups[0]["lr"], [p.detach().clone() for p in model.parameters()]))
    assert ends[0][:2] == ends[1][:2] and all(torch.equal(a, b) for a, b in zip(ends[0][2], ends[1][2]))


@pytest.mark.parametrize("case", ["step_hook", "state_looked_at", "live_scheduler_state", "sgd_no_momentum"])
def test_the_second_review_cases_end_as_the_eager_run(case):
    """Step hooks (an EMA) must not run in a step eager skips, so their optimizer reads its outcome
    first; an empty state entry (made by looking at ``state[p]``) is not state; a custom scheduler
    with live state steps as on the eager path; SGD without momentum has no state to wait for."""
    class Warmup:
        def __init__(self, opt):
            self.optimizer, self.s = opt, {"t": 0}

        def step(self):
            self.s["t"] += 1
            for g in self.optimizer.param_groups:
                g["lr"] = 1e-2 * min(1.0, self.s["t"] / 3)

        def state_dict(self):
            return {"s": self.s}

        def load_state_dict(self, state):
            self.s = state["s"]

    optimizer = scheduler = None
    if case in ("state_looked_at", "sgd_no_momentum"):
        momentum = 0.0 if case == "sgd_no_momentum" else 0.9
        optimizer = lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=momentum, fused=True)  # noqa: E731
    if case == "live_scheduler_state":
        scheduler = Warmup
    runs = [make(defer, optimizer=optimizer, scheduler=scheduler) for defer in (False, True)]
    calls = []
    for model, opt, _, _ in runs:
        if case == "step_hook":
            opt.register_step_post_hook(lambda o, a, k: calls.append(o))
        if case == "state_looked_at":
            assert all(opt.state[p].get("momentum_buffer") is None for p in model.parameters())
    bad = (0,) if case == "state_looked_at" else (1,)
    for b in batches(bad_grad=bad, bad_loss=(), n=4):
        skipped = runs[0][3].step(b).skipped
        stats = runs[1][3].step(b)
        if case == "sgd_no_momentum":
            assert not stats.settled                    # no state to wait for: deferred from the first step
        assert skipped == stats.skipped
    same_run(*runs)
    if case == "step_hook":
        assert calls.count(runs[0][1]) == calls.count(runs[1][1]) == 3
    if case == "live_scheduler_state":
        assert runs[0][2].s == runs[1][2].s


def test_unsettled_stats_replace_and_counters_assign():
    model, opt, sched, trainer = make(True)
    data = batches(bad_grad=(), bad_loss=(), n=2)
    trainer.step(data[0])
    stats = trainer.step(data[1])
    other = dataclasses.replace(stats, loss=1.0, grad_norm=2.0, skipped=False, events=[])
    assert type(other) is autoaccum.StepStats and other.loss == 1.0
    assert type(stats) is autoaccum.StepStats and math.isfinite(stats.loss)
    trainer.steps = 0
    assert trainer.steps == 0


@pytest.mark.parametrize("change", ["unfreeze_a_group", "momentum_on"])
def test_parameters_without_state_after_a_group_changes_read_the_outcome_first(change):
    """Found by the fourth review: "every parameter holds state" was remembered past a new param
    group (gradual unfreezing) and past momentum turned on; the skipped first step of those
    parameters then left fused SGD's uninitialised momentum buffer in the state."""
    runs = []
    for defer in (False, True):
        model = mlp()
        params = list(model.parameters())
        if change == "unfreeze_a_group":
            for p in params[2:]:
                p.requires_grad_(False)
        opt = torch.optim.SGD(params[:2] if change == "unfreeze_a_group" else params, lr=1e-2,
                              momentum=0.9 if change == "unfreeze_a_group" else 0.0, fused=True)
        trainer = autoaccum.fit(model, 16, opt, loss_fn=mse_loss, micro_batch=5, max_grad_norm=1.0)
        trainer._defer = defer
        data = batches(bad_grad=(2,), bad_loss=(), n=5)
        trainer.step(data[0])
        trainer.step(data[1])
        if change == "unfreeze_a_group":
            for p in params[2:]:
                p.requires_grad_(True)
            opt.add_param_group({"params": params[2:]})
        else:
            opt.param_groups[0]["momentum"] = 0.9
        assert trainer.step(data[2]).skipped
        trainer.step(data[3])
        trainer.step(data[4])
        runs.append((model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), trainer))
    same_run(*runs)


def test_a_scheduler_error_surfaces_from_the_next_step_which_stands():
    """Eager raises a scheduler's error from the step whose scheduler call raised, after that step
    stood; deferred makes the call that raises in the next step's update, and raises the error once
    that step stands too. A loop that logs the error and goes on ends as eager's."""
    class Flaky(torch.optim.lr_scheduler.LambdaLR):
        calls = 0

        def step(self, *a, **k):
            self.calls += 1
            if self.calls == 4:             # the call for step 2 (the first is LambdaLR's own, at init)
                raise RuntimeError("scheduler fault")
            return super().step(*a, **k)

    runs = [make(defer, scheduler=lambda o: Flaky(o, lambda s: 1.0 / (1 + s))) for defer in (False, True)]
    raised = []
    for _, _, sched, trainer in runs:
        for i, b in enumerate(batches(bad_grad=(), bad_loss=(), n=6)):
            try:
                trainer.step(b)
            except RuntimeError as e:
                raised.append((trainer._defer, i, "".join(getattr(e, "__notes__", []))))
    assert [r[:2] for r in raised] == [(False, 2), (True, 3)] and "this step's update stands" in raised[1][2]
    same_run(*runs)


def test_the_fifth_review_cases_end_as_the_eager_run():
    """A second trainer over the same optimizer and scheduler (a second phase) completes the first
    one's pending step before reading the lr; an interrupt raised while the previous step completes
    comes after this step stands (a loop that catches it and goes on ends as eager's); ``stats.lr``
    of a Tensor learning rate is that step's value, not the tensor schedulers keep writing."""
    ends, logs = [], []
    for defer in (False, True):
        hit = []

        def rate(s):
            if s == 4 and not hit:
                hit.append(1)
                raise KeyboardInterrupt()
            return 1.0 / (1 + s)
        model = mlp()
        opt = torch.optim.AdamW(model.parameters(), lr=torch.tensor(1e-2), fused=True)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, rate)
        data = batches(bad_grad=(), bad_loss=(), n=7)
        first = autoaccum.fit(model, 16, opt, loss_fn=mse_loss, micro_batch=5, scheduler=sched, max_grad_norm=1.0)
        first._defer = defer
        lrs = [first.step(b).lr for b in data[:3]]
        second = autoaccum.fit(model, 16, opt, loss_fn=mse_loss, micro_batch=8, scheduler=sched, max_grad_norm=1.0)
        second._defer = defer
        for b in data[3:]:
            try:
                lrs.append(second.step(b).lr)
            except KeyboardInterrupt:
                logs.append(defer)
        first.steps, second.steps
        ends.append((model, opt, sched, second))
        assert all(isinstance(lr, float) for lr in lrs) and len(set(lrs)) == len(lrs), lrs
    assert logs == [False, True]
    same_run(*ends)


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
