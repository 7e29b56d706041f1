"""Every bad input across the API: the exception type, a message that names the argument, and
nothing changed: model, optimizer, scheduler, random streams and trainer state are bitwise as before.

One table, one fresh world per case (a model with dropout, an optimizer with state, a scheduler and a
trainer that has taken a step). No case may end in an internal error (an exception type or message
that does not come from autoaccum's checks).
"""
import copy
import random

import numpy as np
import pytest
import torch
from torch import nn

import autoaccum
from autoaccum import kernels


class World:
    def __init__(self):
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Linear(6, 8), nn.Dropout(0.2), nn.Linear(8, 2))
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.1, momentum=0.9)
        self.sched = torch.optim.lr_scheduler.StepLR(self.opt, step_size=1, gamma=0.5)
        self.loss = lambda m, b: nn.functional.mse_loss(m(b[0]), b[1])
        self.trainer = autoaccum.fit(self.model, 16, self.opt, loss_fn=self.loss, micro_batch=4, scheduler=self.sched)
        self.batch = (torch.randn(16, 6), torch.randn(16, 2))
        self.trainer.step(self.batch)
        self.sample = (torch.randn(8, 6), torch.randn(8, 2))

    def fit(self, **kw):
        args = dict(optimizer=self.opt, loss_fn=self.loss, micro_batch=4)
        args.update(kw)
        target = args.pop("target_batch", 16)
        return autoaccum.fit(args.pop("model", self.model), target, args.pop("optimizer"), **args)

    def probe(self, **kw):
        args = dict(loss_fn=self.loss, memory_budget="64MiB", cache=False)
        args.update(kw)
        return autoaccum.probe(args.pop("model", self.model), args.pop("sample", self.sample), **args)

    def estimate(self, **kw):
        args = dict(loss_fn=self.loss, device_memory="1GiB")
        args.update(kw)
        return autoaccum.estimate(args.pop("model", self.model), args.pop("sample", self.sample), **args)

    def step_with(self, **kw):
        """A second trainer on the same model and optimizer (counting or loss functions under test)."""
        args = dict(micro_batch=4, scheduler=None)
        args.update(kw)
        return autoaccum.fit(self.model, 16, self.opt, **{"loss_fn": self.loss, **args}).step(self.batch)


def snapshot(w: World) -> dict:
    t = w.trainer
    return {"model": {k: v.clone() for k, v in w.model.state_dict().items()},
            "opt": copy.deepcopy(w.opt.state_dict()), "sched": copy.deepcopy(w.sched.state_dict()),
            "rng": (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()),
            "trainer": (t.steps, t.skipped_steps, t.oom_retries, t.plan, t.max_micro_batch, t._regrow.state_dict()),
            "grads": [p.grad for p in w.model.parameters()]}


def assert_same(a: dict, b: dict) -> None:
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["opt"]["param_groups"] == b["opt"]["param_groups"]
    sa, sb = a["opt"]["state"], b["opt"]["state"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k][n], sb[k][n]) for k in sa for n in sa[k])
    assert a["sched"] == b["sched"] and a["trainer"] == b["trainer"]
    assert torch.equal(a["rng"][0], b["rng"][0]) and np.array_equal(a["rng"][1], b["rng"][1])
    assert a["rng"][2] == b["rng"][2]
    assert all(g is None for g in b["grads"])


nan, inf = float("nan"), float("inf")


def unseeded(make):
    """Build a case's object without drawing from the random stream the case checks."""
    def build():
        with torch.random.fork_rng(devices=[]):
            return make()
    return build


meta_model = unseeded(lambda: nn.Linear(2, 2, device="meta"))
frozen = unseeded(lambda: nn.Linear(2, 2).requires_grad_(False))
other_opt = unseeded(lambda: torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1))
sparse = unseeded(lambda: nn.Embedding(4, 2, sparse=True))
x16, y16, x32, y32, y15 = torch.randn(16, 6), torch.randn(16, 2), torch.randn(32, 6), torch.randn(32, 2), torch.randn(15, 2)
NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present, so 'cuda' is valid")
strings = np.array(["a"] * 16)
objects = np.array([object()] * 16, dtype=object)


def counting(value):
    return lambda w: w.step_with(count_fn=lambda mb: value(mb) if callable(value) else value)


def losing(value):
    return lambda w: w.step_with(loss_fn=lambda m, b: value(m, b) if callable(value) else value)


CASES = [
    # ---------------------------------------------------------------- plan
    ("plan target 0", lambda w: autoaccum.plan(0, 4), ValueError, "target_batch"),
    ("plan target -1", lambda w: autoaccum.plan(-1, 4), ValueError, "target_batch"),
    ("plan target float", lambda w: autoaccum.plan(16.0, 4), TypeError, "target_batch"),
    ("plan target str", lambda w: autoaccum.plan("16", 4), TypeError, "target_batch"),
    ("plan target bool", lambda w: autoaccum.plan(True, 4), TypeError, "target_batch"),
    ("plan target None", lambda w: autoaccum.plan(None, 4), TypeError, "target_batch"),
    ("plan target 1e30", lambda w: autoaccum.plan(10**30, 1), ValueError, "target_batch.*largest supported"),
    ("plan target nan", lambda w: autoaccum.plan(nan, 1), TypeError, "target_batch"),
    ("plan 2^40 steps", lambda w: autoaccum.plan(2**40, 1), ValueError, "micro_batch.*at most"),
    ("plan micro 0", lambda w: autoaccum.plan(16, 0), ValueError, "micro_batch"),
    ("plan micro -3", lambda w: autoaccum.plan(16, -3), ValueError, "micro_batch"),
    ("plan micro float", lambda w: autoaccum.plan(16, 2.0), TypeError, "micro_batch"),
    ("plan micro bool", lambda w: autoaccum.plan(16, True), TypeError, "micro_batch"),
    ("plan micro str", lambda w: autoaccum.plan(16, "4"), TypeError, "micro_batch"),
    ("plan micro None", lambda w: autoaccum.plan(16, None), TypeError, "micro_batch"),
    ("plan world 0", lambda w: autoaccum.plan(16, 4, 0), ValueError, "world_size"),
    ("plan world bool", lambda w: autoaccum.plan(16, 4, True), TypeError, "world_size"),
    ("plan world str", lambda w: autoaccum.plan(16, 4, "2"), TypeError, "world_size"),
    ("plan world indivisible", lambda w: autoaccum.plan(16, 4, 3), ValueError, "world_size=3"),
    ("plan world huge", lambda w: autoaccum.plan(2**30, 4, 2**30), ValueError, "world_size.*largest supported"),
    # ---------------------------------------------------------------- fit
    ("fit model str", lambda w: w.fit(model="x"), TypeError, "model must be a torch.nn.Module"),
    ("fit model None", lambda w: w.fit(model=None), TypeError, "model must be a torch.nn.Module"),
    ("fit model frozen", lambda w: w.fit(model=frozen(), optimizer=None), ValueError, "model has no parameter"),
    ("fit model meta", lambda w: w.fit(model=meta_model(), optimizer=None), ValueError, "meta device"),
    ("fit target 0", lambda w: w.fit(target_batch=0), ValueError, "target_batch"),
    ("fit target bool", lambda w: w.fit(target_batch=True), TypeError, "target_batch"),
    ("fit target float", lambda w: w.fit(target_batch=10.5), TypeError, "target_batch"),
    ("fit target str", lambda w: w.fit(target_batch="16"), TypeError, "target_batch"),
    ("fit target huge", lambda w: w.fit(target_batch=2**70), ValueError, "target_batch.*largest supported"),
    ("fit optimizer str", lambda w: w.fit(optimizer="adam"), TypeError, "optimizer must be"),
    ("fit optimizer other", lambda w: w.fit(optimizer=other_opt()), ValueError, "optimizer holds none"),
    ("fit optimizer lbfgs", lambda w: w.fit(optimizer=torch.optim.LBFGS(w.model.parameters())), ValueError,
     "optimizer is LBFGS"),
    ("fit loss_fn int", lambda w: w.fit(loss_fn=3), TypeError, "loss_fn must be callable"),
    ("fit count_fn str", lambda w: w.fit(count_fn="tokens"), TypeError, "count_fn must be callable"),
    ("fit micro 0", lambda w: w.fit(micro_batch=0), ValueError, "micro_batch"),
    ("fit micro bool", lambda w: w.fit(micro_batch=True), TypeError, "micro_batch"),
    ("fit micro float", lambda w: w.fit(micro_batch=2.5), TypeError, "micro_batch"),
    ("fit micro str", lambda w: w.fit(micro_batch="4"), TypeError, "micro_batch"),
    ("fit scheduler object", lambda w: w.fit(scheduler=object()), TypeError, "scheduler must have a step"),
    ("fit scheduler plateau", lambda w: w.fit(scheduler=torch.optim.lr_scheduler.ReduceLROnPlateau(w.opt)),
     TypeError, "ReduceLROnPlateau"),
    ("fit scheduler other opt", lambda w: w.fit(scheduler=unseeded(
        lambda: torch.optim.lr_scheduler.StepLR(other_opt(), 1))()),
     ValueError, "scheduler was built for a different optimizer"),
    ("fit scheduler without optimizer", lambda w: w.fit(optimizer=None, scheduler=w.sched), ValueError,
     "scheduler needs the optimizer"),
    ("fit clip 0", lambda w: w.fit(max_grad_norm=0), ValueError, "max_grad_norm"),
    ("fit clip -1", lambda w: w.fit(max_grad_norm=-1.0), ValueError, "max_grad_norm"),
    ("fit clip nan", lambda w: w.fit(max_grad_norm=nan), ValueError, "max_grad_norm"),
    ("fit clip inf", lambda w: w.fit(max_grad_norm=inf), ValueError, "max_grad_norm"),
    ("fit clip bool", lambda w: w.fit(max_grad_norm=True), ValueError, "max_grad_norm"),
    ("fit clip str", lambda w: w.fit(max_grad_norm="1"), ValueError, "max_grad_norm"),
    ("fit amp float32", lambda w: w.fit(amp_dtype=torch.float32), ValueError, "amp_dtype"),
    ("fit amp str", lambda w: w.fit(amp_dtype="float32"), ValueError, "amp_dtype"),
    ("fit amp int", lambda w: w.fit(amp_dtype=3), ValueError, "amp_dtype"),
    ("fit batchnorm", lambda w: w.fit(batchnorm="maybe"), ValueError, "batchnorm"),
    ("fit batchnorm bool", lambda w: w.fit(batchnorm=True), ValueError, "batchnorm"),
    ("fit device bogus", lambda w: w.fit(device="bogus"), ValueError, "device must be"),
    ("fit device float", lambda w: w.fit(device=3.5), ValueError, "device must be"),
    ("fit device meta", lambda w: w.fit(device="meta"), ValueError, "device is the meta device"),
    ("fit device cuda", lambda w: w.fit(device="cuda"), ValueError, "device is 'cuda'", NO_GPU),
    ("fit budget nan", lambda w: w.fit(micro_batch=None, memory_budget=nan), ValueError, "memory_budget"),
    ("fit budget inf", lambda w: w.fit(micro_batch=None, memory_budget=inf), ValueError, "memory_budget"),
    ("fit budget negative", lambda w: w.fit(micro_batch=None, memory_budget=-5), ValueError, "memory_budget"),
    ("fit budget text", lambda w: w.fit(micro_batch=None, memory_budget="abc"), ValueError, "memory_budget"),
    ("fit budget bool", lambda w: w.fit(micro_batch=None, memory_budget=True), TypeError, "memory_budget"),
    ("fit budget list", lambda w: w.fit(micro_batch=None, memory_budget=[]), TypeError, "memory_budget"),
    ("fit budget unit", lambda w: w.fit(micro_batch=None, memory_budget="8 parsecs"), ValueError, "memory_budget"),
    ("fit budget ignored", lambda w: w.fit(memory_budget="1GiB"), ValueError, "memory_budget.*micro_batch=4"),
    ("fit sample ignored", lambda w: w.fit(sample=w.sample), ValueError, "sample.*micro_batch=4"),
    ("fit probe_cache str", lambda w: w.fit(probe_cache="no"), TypeError, "probe_cache"),
    ("fit probe_cache int", lambda w: w.fit(probe_cache=1), TypeError, "probe_cache"),
    ("fit accum int32", lambda w: w.fit(accum_dtype=torch.int32), ValueError, "accum_dtype"),
    ("fit accum str", lambda w: w.fit(accum_dtype="fp32"), ValueError, "accum_dtype"),
    ("fit master str", lambda w: w.fit(master_weights="yes"), TypeError, "master_weights"),
    ("fit master without buffer", lambda w: w.fit(master_weights=True), ValueError, "master_weights=True"),
    ("fit sync", lambda w: w.fit(sync="sometimes"), ValueError, "sync"),
    ("fit oom_retry str", lambda w: w.fit(oom_retry="yes"), TypeError, "oom_retry"),
    ("fit oom_retry int", lambda w: w.fit(oom_retry=1), TypeError, "oom_retry"),
    ("fit regrow 0", lambda w: w.fit(regrow_after=0), ValueError, "regrow_after"),
    ("fit regrow bool", lambda w: w.fit(regrow_after=True), TypeError, "regrow_after"),
    ("fit regrow float", lambda w: w.fit(regrow_after=2.5), TypeError, "regrow_after"),
    ("fit sparse embedding", lambda w: w.fit(model=sparse(), optimizer=None), ValueError,
     "sparse"),
    # ---------------------------------------------------------------- probe
    ("probe model str", lambda w: w.probe(model="x"), TypeError, "model must be a torch.nn.Module"),
    ("probe model meta", lambda w: w.probe(model=meta_model()), ValueError, "meta device"),
    ("probe device bogus", lambda w: w.probe(device="bogus"), ValueError, "device must be"),
    ("probe device meta", lambda w: w.probe(device="meta"), ValueError, "device is the meta device"),
    ("probe device cuda", lambda w: w.probe(device="cuda:0"), ValueError, "device is 'cuda:0'", NO_GPU),
    ("probe world 0", lambda w: w.probe(world_size=0), ValueError, "world_size"),
    ("probe world str", lambda w: w.probe(world_size="x"), TypeError, "world_size"),
    ("probe world bool", lambda w: w.probe(world_size=True), TypeError, "world_size"),
    ("probe cache str", lambda w: w.probe(cache="yes"), TypeError, "cache"),
    ("probe budget nan", lambda w: w.probe(memory_budget=nan), ValueError, "memory_budget"),
    ("probe budget inf", lambda w: w.probe(memory_budget=inf), ValueError, "memory_budget"),
    ("probe budget text", lambda w: w.probe(memory_budget="lots"), ValueError, "memory_budget"),
    ("probe budget zero", lambda w: w.probe(memory_budget=0), ValueError, "memory_budget"),
    ("probe headroom negative", lambda w: w.probe(headroom=-1), ValueError, "headroom"),
    ("probe headroom nan", lambda w: w.probe(headroom=nan), ValueError, "headroom"),
    ("probe max_micro 0", lambda w: w.probe(max_micro_batch=0), ValueError, "max_micro_batch"),
    ("probe max_micro float", lambda w: w.probe(max_micro_batch=1.5), TypeError, "max_micro_batch"),
    ("probe max_trials 0", lambda w: w.probe(max_trials=0), ValueError, "max_trials"),
    ("probe max_trials bool", lambda w: w.probe(max_trials=True), TypeError, "max_trials"),
    ("probe amp", lambda w: w.probe(amp_dtype=torch.int8), ValueError, "amp_dtype"),
    ("probe loss_fn", lambda w: w.probe(loss_fn=5), TypeError, "loss_fn must be callable"),
    ("probe count_fn", lambda w: w.probe(count_fn=5), TypeError, "count_fn must be callable"),
    ("probe accum", lambda w: w.probe(accum_dtype="half"), ValueError, "accum_dtype"),
    ("probe master", lambda w: w.probe(master_weights="x"), TypeError, "master_weights"),
    ("probe optimizer str", lambda w: w.probe(optimizer="adam"), TypeError, "optimizer must be"),
    ("probe optimizer other", lambda w: w.probe(optimizer=other_opt()), ValueError, "optimizer holds none"),
    ("probe optimizer lbfgs", lambda w: w.probe(optimizer=unseeded(
        lambda: torch.optim.LBFGS(w.model.parameters()))()), ValueError, "optimizer is LBFGS"),
    ("probe sample str", lambda w: w.probe(sample="abc"), TypeError, "sample"),
    ("probe sample empty", lambda w: w.probe(sample=(torch.zeros(0, 6), torch.zeros(0, 2))), ValueError, "empty"),
    # ---------------------------------------------------------------- estimate
    ("estimate model str", lambda w: w.estimate(model="x"), TypeError, "model must be a torch.nn.Module"),
    ("estimate optimizer str", lambda w: w.estimate(optimizer="adam"), TypeError, "optimizer must be"),
    ("estimate optimizer other", lambda w: w.estimate(optimizer=other_opt()), ValueError, "optimizer holds none"),
    ("estimate memory nan", lambda w: w.estimate(device_memory=nan), ValueError, "device_memory"),
    ("estimate memory text", lambda w: w.estimate(device_memory="big"), ValueError, "device_memory"),
    ("estimate context negative", lambda w: w.estimate(context_bytes=-1), ValueError, "context_bytes"),
    ("estimate workspace inf", lambda w: w.estimate(workspace_bytes=inf), ValueError, "workspace_bytes"),
    ("estimate max_runs 0", lambda w: w.estimate(max_runs=0), ValueError, "max_runs"),
    ("estimate max_micro bool", lambda w: w.estimate(max_micro_batch=True), TypeError, "max_micro_batch"),
    ("estimate kind", lambda w: w.estimate(device_kind="tpu"), ValueError, "device_kind"),
    ("estimate amp", lambda w: w.estimate(amp_dtype="fp8"), ValueError, "amp_dtype"),
    # ---------------------------------------------------------------- step: the batch
    ("step batch None", lambda w: w.trainer.step(None), ValueError, "batch holds no tensors"),
    ("step batch str", lambda w: w.trainer.step("abc"), TypeError, "batch is a str"),
    ("step batch int", lambda w: w.trainer.step(3), TypeError, "batch is a int"),
    ("step batch too long", lambda w: w.trainer.step((x32, y32)), ValueError,
     "batch has 32 samples"),
    ("step batch rows disagree", lambda w: w.trainer.step((x16, y15)), ValueError,
     r"batch\[0\] has 16 rows but batch\[1\] has 15"),
    ("step batch empty", lambda w: w.trainer.step((torch.randn(0, 6), torch.randn(0, 2))), ValueError,
     "batch is empty"),
    ("step batch 0-dim leaf", lambda w: w.trainer.step((x16, torch.tensor(1.0))), TypeError,
     r"batch\[1\] is a 0-dim"),
    ("step batch numpy strings", lambda w: w.trainer.step((x16, strings)), TypeError,
     r"batch\[1\] is a numpy array of <U1"),
    ("step batch numpy objects", lambda w: w.trainer.step((x16, objects)), TypeError,
     r"batch\[1\] is a numpy array of object"),
    ("step batch dict str leaf", lambda w: w.trainer.step({"x": x16, "tag": "a"}), TypeError,
     r"batch\['tag'\] is a str"),
    ("step batch nested int", lambda w: w.trainer.step([x16, [y16, 7]]), TypeError,
     r"batch\[1\]\[1\] is a int"),
    # ---------------------------------------------------------------- step: what count_fn returns
    ("count True", counting(True), TypeError, r"count_fn\(micro_batch 0\) returned bool"),
    ("count any()", counting(lambda mb: (mb[1] >= 0).any()), TypeError, r"count_fn.*torch.bool tensor.*\.sum\(\)"),
    ("count str", counting("4"), TypeError, r"count_fn.*returned str"),
    ("count None", counting(None), TypeError, r"count_fn.*returned NoneType"),
    ("count nan", counting(nan), ValueError, r"count_fn.*returned nan"),
    ("count inf", counting(inf), ValueError, r"count_fn.*returned inf"),
    ("count negative", counting(-2), ValueError, r"count_fn.*returned -2"),
    ("count vector", counting(lambda mb: torch.ones(2)), ValueError, r"count_fn.*shape \(2,\)"),
    ("count numpy bool", counting(np.bool_(True)), TypeError, r"count_fn.*returned bool"),
    ("count huge int", counting(10**400), ValueError, r"count_fn.*returned inf"),
    ("count meta tensor", counting(lambda mb: torch.tensor(2.0, device="meta")), ValueError, r"count_fn.*meta"),
    ("count sum overflows", counting(1e308), ValueError, r"count_fn's counts add up to inf"),
    ("count all zero", counting(0), ValueError, r"count_fn returned 0 items for every micro-batch"),
    # ---------------------------------------------------------------- step: what loss_fn returns
    ("loss float", losing(1.0), TypeError, "loss_fn returned float"),
    ("loss vector", losing(lambda m, b: (m(b[0]) - b[1]) ** 2), ValueError, r"loss_fn returned a tensor of shape"),
    ("loss int tensor", losing(lambda m, b: torch.tensor(3)), TypeError, "loss_fn returned a torch.int64"),
    ("loss no grad", losing(lambda m, b: torch.tensor(1.0)), ValueError, "loss_fn returned a tensor that does not"),
    ("loss None", losing(None), TypeError, "loss_fn returned NoneType"),
    ("loss raises", losing(lambda m, b: {}["nope"]), KeyError, "nope"),
    # ---------------------------------------------------------------- train, set_micro_batch, state dicts
    ("train None", lambda w: w.trainer.train(None), TypeError, "loader must be an iterable"),
    ("train int", lambda w: w.trainer.train(5), TypeError, "loader must be an iterable"),
    ("train str", lambda w: w.trainer.train("batches"), TypeError, "loader must be an iterable"),
    ("train max_steps True", lambda w: w.trainer.train([w.batch], max_steps=True), TypeError, "max_steps"),
    ("train max_steps 0", lambda w: w.trainer.train([w.batch], max_steps=0), ValueError, "max_steps"),
    ("train max_steps float", lambda w: w.trainer.train([w.batch], max_steps=1.5), TypeError, "max_steps"),
    ("train epochs 0", lambda w: w.trainer.train([w.batch], epochs=0), ValueError, "epochs"),
    ("train epochs bool", lambda w: w.trainer.train([w.batch], epochs=True), TypeError, "epochs"),
    ("train epochs str", lambda w: w.trainer.train([w.batch], epochs="2"), TypeError, "epochs"),
    ("train progress str", lambda w: w.trainer.train([w.batch], progress="no"), TypeError, "progress"),
    ("train first batch too long", lambda w: w.trainer.train([(x32, y32), w.batch]), ValueError, "batch has 32"),
    ("set_micro 0", lambda w: w.trainer.set_micro_batch(0), ValueError, "micro_batch"),
    ("set_micro bool", lambda w: w.trainer.set_micro_batch(True), TypeError, "micro_batch"),
    ("set_micro float", lambda w: w.trainer.set_micro_batch(2.5), TypeError, "micro_batch"),
    ("set_micro str", lambda w: w.trainer.set_micro_batch("4"), TypeError, "micro_batch"),
    ("state_dict rng str", lambda w: w.trainer.state_dict(rng="yes"), TypeError, "rng must be True or False"),
    ("load_state_dict None", lambda w: w.trainer.load_state_dict(None), TypeError, "state must be a dict"),
    ("load_state_dict other batch", lambda w: w.trainer.load_state_dict(
        {**w.trainer.state_dict(), "plan": autoaccum.plan(32, 4).to_dict()}), ValueError, "target_batch=32"),
    ("load_state_dict no scheduler", lambda w: w.trainer.load_state_dict(
        {**w.trainer.state_dict(), "scheduler": None}), ValueError, "has no scheduler state"),
    ("load_state_dict masters", lambda w: w.trainer.load_state_dict(
        {**w.trainer.state_dict(), "masters": [None]}), ValueError, "master weights for 1 parameters"),
    ("load_state_dict bad cpu stream", lambda w: w.trainer.load_state_dict(
        {**w.trainer.state_dict(), "rng": {**w.trainer.state_dict()["rng"], "torch_cpu": torch.zeros(3)}}),
     ValueError, "'rng' entry"),
    ("load_state_dict bad python stream", lambda w: w.trainer.load_state_dict(
        {**w.trainer.state_dict(), "rng": {**w.trainer.state_dict()["rng"], "python": (3, (1, 2), None)}}),
     ValueError, "'rng' entry"),
    ("load_state_dict regrow", lambda w: w.trainer.load_state_dict({**w.trainer.state_dict(), "regrow": {}}),
     ValueError, "'regrow' entry"),
    ("load_state_dict plan malformed", lambda w: w.trainer.load_state_dict({**w.trainer.state_dict(), "plan": {"x": 1}}),
     ValueError, "'plan' entry"),
    ("load_state_dict max_micro str", lambda w: w.trainer.load_state_dict(
        {**w.trainer.state_dict(), "max_micro_batch": "8"}), TypeError, "'max_micro_batch'"),
    ("load_state_dict steps str", lambda w: w.trainer.load_state_dict({**w.trainer.state_dict(), "steps": "x"}),
     TypeError, "'steps'"),
    ("load_state_dict rng", lambda w: w.trainer.load_state_dict(
        {**w.trainer.state_dict(), "rng": {"torch_cpu": 1}}), ValueError, "'rng' entry"),
    # ---------------------------------------------------------------- kernels
    ("accumulate weight nan", lambda w: kernels.accumulate_([torch.zeros(3)], [torch.ones(3)], nan), ValueError,
     "weight"),
    ("accumulate weight bool", lambda w: kernels.accumulate_([torch.zeros(3)], [torch.ones(3)], True), ValueError,
     "weight"),
    ("accumulate not lists", lambda w: kernels.accumulate_(torch.zeros(3), [torch.ones(3)], 1.0), TypeError,
     "accs and grads must be lists"),
    ("accumulate pairs", lambda w: kernels.accumulate_([torch.zeros(3)], [], 1.0), ValueError, "pair up"),
    ("accumulate int acc", lambda w: kernels.accumulate_([torch.zeros(3, dtype=torch.int32)], [torch.ones(3)], 1.0),
     TypeError, r"accs\[0\] is torch.int32"),
    ("accumulate shape", lambda w: kernels.accumulate_([torch.zeros(3)], [torch.ones(4)], 1.0), ValueError,
     r"accs\[0\] has shape"),
    ("accumulate device", lambda w: kernels.accumulate_([torch.zeros(3)], [torch.ones(3, device="meta")], 1.0),
     ValueError, r"accs\[0\] is on cpu"),
    ("accumulate str grad", lambda w: kernels.accumulate_([torch.zeros(3)], ["g"], 1.0), TypeError,
     r"accs\[0\] and grads\[0\] must be tensors"),
    ("finalize inv_scale 0", lambda w: kernels.finalize_([torch.ones(3)], 0.0), ValueError, "inv_scale"),
    ("finalize inv_scale nan", lambda w: kernels.finalize_([torch.ones(3)], nan), ValueError, "inv_scale"),
    ("finalize max_norm bool", lambda w: kernels.finalize_([torch.ones(3)], 1.0, True), ValueError, "max_norm"),
    ("finalize not a list", lambda w: kernels.finalize_(torch.ones(3)), TypeError, "grads must be a list"),
    ("finalize int grads", lambda w: kernels.finalize_([torch.ones(3, dtype=torch.int64)]), TypeError,
     r"grads\[0\] is torch.int64"),
    ("kernels backend", lambda w: kernels.finalize_([torch.ones(3)], backend="fpga"), ValueError, "backend"),
]


def test_the_table_is_large_enough():
    assert len(CASES) >= 120, len(CASES)


@pytest.mark.parametrize("call, exc, match", [pytest.param(*c[1:4], id=c[0], marks=c[4:]) for c in CASES])
def test_bad_input_is_a_clear_error_that_changes_nothing(call, exc, match):
    w = World()
    seeds = (torch.get_rng_state(), np.random.get_state(), random.getstate())
    before = snapshot(w)
    with pytest.raises(exc, match=match):
        call(w)
    assert_same(before, snapshot(w))
    torch.set_rng_state(seeds[0])
    np.random.set_state(seeds[1])
    random.setstate(seeds[2])
