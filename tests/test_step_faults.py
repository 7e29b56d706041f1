"""A fault inside optimizer.step, on either side of its first write (README, "Reliability").

Before the optimizer writes: the step fails whole; parameters, optimizer state, scheduler, loss
scale, counters, gradients and random streams are as before it, and the next step equals a clean
run's. After it writes: the update stands and the step is completed (counted, scheduler stepped,
gradients freed), so a run that goes on agrees with one that never saw the fault.
"""
import copy

import pytest
import torch
from torch import nn

import autoaccum

FAULTS = {
    "oom": lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB (injected)"),
    "runtime": lambda: RuntimeError("injected failure"),
    "ctrl-c": lambda: KeyboardInterrupt(),
}


class Faulty(torch.optim.AdamW):
    """AdamW that raises once, before calling the real step (``before``), after it (``after``), or in
    the middle: after creating its state but before touching any parameter (``lazy-state``)."""

    def __init__(self, params, where, fault, **kw):
        super().__init__(params, **kw)
        self.where, self.fault, self.armed = where, fault, False

    def step(self, closure=None):
        if not self.armed:
            return super().step(closure)
        self.armed = False
        if self.where == "lazy-state":
            for g in self.param_groups:
                for p in g["params"]:
                    self.state[p]["exp_avg"] = torch.zeros_like(p)
            raise self.fault()
        if self.where == "before":
            raise self.fault()
        out = super().step(closure)
        raise self.fault()
        return out


def setup(where, fault, clip=None):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Dropout(0.2), nn.Linear(8, 3))
    opt = Faulty(model.parameters(), where, FAULTS[fault], lr=0.05)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.9)
    trainer = autoaccum.fit(model, 12, opt, loss_fn=lambda m, b: nn.functional.mse_loss(m(b[0]), b[1]),
                            micro_batch=5, scheduler=sched, max_grad_norm=clip)
    return model, opt, sched, trainer


def data(n):
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(12, 5, generator=g), torch.randn(12, 3, generator=g)) for _ in range(n)]


def twin_step(a, b, batch):
    """One step of each trainer from the same random stream (they share torch's global one)."""
    streams = torch.get_rng_state()
    a.step(batch)
    torch.set_rng_state(streams)
    b.step(batch)


def state_of(model, opt, sched, trainer):
    return {"params": [p.detach().clone() for p in model.parameters()],
            "opt": copy.deepcopy(opt.state_dict()), "sched": sched.state_dict(),
            "steps": trainer.steps, "rng": torch.get_rng_state(), "plan": trainer.plan,
            "grads": [p.grad for p in model.parameters()]}


def same(a, b):
    assert all(torch.equal(x, y) for x, y in zip(a["params"], b["params"]))
    assert a["opt"]["param_groups"] == b["opt"]["param_groups"]
    assert a["opt"]["state"].keys() == b["opt"]["state"].keys()
    for k in a["opt"]["state"]:
        for n, v in a["opt"]["state"][k].items():
            assert torch.equal(v, b["opt"]["state"][k][n]), (k, n)
    assert a["sched"] == b["sched"] and a["steps"] == b["steps"] and a["plan"] == b["plan"]
    assert torch.equal(a["rng"], b["rng"])


@pytest.mark.parametrize("fault", list(FAULTS))
@pytest.mark.parametrize("where", ["before", "lazy-state"])
@pytest.mark.parametrize("first", [True, False], ids=["first-step", "later-step"])
def test_a_fault_before_the_optimizer_writes_leaves_everything_as_it_was(where, fault, first):
    batches = data(3)
    clean = setup(where, fault)
    model, opt, sched, trainer = setup(where, fault)
    if not first:
        twin_step(clean[3], trainer, batches[0])
    before = state_of(model, opt, sched, trainer)
    opt.armed = True
    with pytest.raises(type(FAULTS[fault]())):
        trainer.step(batches[1])
    after = state_of(model, opt, sched, trainer)
    same(before, after)
    assert all(g is None for g in after["grads"]), "gradients (memory) must not stay attached after a fault"
    twin_step(clean[3], trainer, batches[1])       # the retry is the step a clean run takes
    same(state_of(*clean), state_of(model, opt, sched, trainer))


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_fault_after_the_optimizer_wrote_completes_the_step(fault):
    batches = data(3)
    clean = setup("after", fault)
    model, opt, sched, trainer = setup("after", fault)
    opt.armed = True
    streams = torch.get_rng_state()
    with pytest.raises(type(FAULTS[fault]())) as info:
        trainer.step(batches[0])
    assert any("the update stands" in n for n in getattr(info.value, "__notes__", []))
    after = torch.get_rng_state()
    torch.set_rng_state(streams)
    clean[3].step(batches[0])
    assert torch.equal(torch.get_rng_state(), after), "a completed step keeps the draws it made"
    a, b = state_of(*clean), state_of(model, opt, sched, trainer)
    same(a, b)                                     # counted, scheduler stepped: as if it had not raised
    assert all(g is None for g in b["grads"])
    twin_step(clean[3], trainer, batches[1])
    same(state_of(*clean), state_of(model, opt, sched, trainer))


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_a_fused_optimizers_write_is_seen_though_it_moves_no_version_counter(kind):
    """Fused kernels write through raw pointers: the parameters' norms tell instead. An OOM in the
    second group's state allocation, after the first group's update, must commit the step, not roll
    it back (a retry would apply the first group's update twice)."""
    from autoaccum.update import OptimizerWrites
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    make = {"sgd": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, fused=True),
            "adamw": lambda ps: torch.optim.AdamW(ps, lr=0.1, fused=True)}[kind]
    opt = make([{"params": m[0].parameters()}, {"params": m[1].parameters()}])
    m(torch.randn(2, 4)).sum().backward()
    w = OptimizerWrites(opt)
    assert not w.wrote()
    opt.step()
    assert w.wrote(), "a fused step moved the parameters"


@pytest.mark.parametrize("fused", [False, True])
def test_an_oom_in_the_second_groups_state_after_the_first_groups_update_commits(fused, monkeypatch):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 1))
    opt = torch.optim.Adam([{"params": m[0].parameters()}, {"params": m[1].parameters(), "weight_decay": 0.0}],
                           lr=0.1, fused=fused)
    trainer = autoaccum.fit(m, 4, opt, micro_batch=2, loss_fn=lambda mod, b: (mod(b[0]) - b[1]).pow(2).mean())
    real, target, calls = torch.zeros_like, m[1].weight, [0]

    def flaky(t, *a, **k):
        if t is target and not calls[0]:
            calls[0] += 1
            raise torch.OutOfMemoryError("CUDA out of memory (injected while allocating Adam state)")
        return real(t, *a, **k)

    monkeypatch.setattr(torch, "zeros_like", flaky)
    before = [p.detach().clone() for p in m.parameters()]
    with pytest.raises(torch.OutOfMemoryError) as info:
        trainer.step((torch.randn(4, 4), torch.randn(4, 1)))
    moved = [not torch.equal(a, p) for a, p in zip(before, m.parameters())]
    assert moved == [True, True, False, False] and trainer.steps == 1
    assert any("the update stands" in n for n in info.value.__notes__)
