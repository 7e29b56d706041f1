"""autoaccum.probe on the CPU: real trials measured by the tracker, state restored bitwise, cache."""
import contextlib
import json
import random
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch import nn

import autoaccum
from autoaccum.demo import TinyGPT, lm_loss, make_batch

import ruler
from helpers import ce_loss, convnet, image_batch, mlp, mse_loss, oom_above, regression_batch

MiB = 1 << 20


def wide_mlp():
    """Parameter-heavy: weights, gradients and Adam state dwarf the activations."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 1024), nn.GELU(), nn.Linear(1024, 1024), nn.GELU(), nn.Linear(1024, 10))


CASES = {   # model, sample(n), loss_fn, budget
    "mlp": (lambda: mlp(torch.float32, d_in=256, hidden=512, d_out=256),
            lambda n: regression_batch(n, torch.float32, d_in=256, d_out=256), mse_loss, "24MiB"),
    "wide_mlp": (wide_mlp, lambda n: (torch.randn(n, 64, generator=torch.Generator().manual_seed(n)),
                                      torch.randint(0, 10, (n,), generator=torch.Generator().manual_seed(n))),
                 ce_loss, "28MiB"),
    "transformer": (lambda: TinyGPT(dim=64, layers=2), make_batch, lm_loss, "48MiB"),
    "convnet": (convnet, image_batch, ce_loss, "40MiB"),
}


@pytest.mark.parametrize("name", CASES)
def test_within_5_percent_of_the_real_trainers_maximum_in_at_most_4_trials(name):
    """Judged by the independent ruler (benchmarks/ruler.py): the real Trainer.step in steady state,
    counted by a census that shares no code with the probe's tracker."""
    make_model, make_sample, loss_fn, budget = CASES[name]
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    result = autoaccum.probe(model, make_sample(4), optimizer=opt, loss_fn=loss_fn, memory_budget=budget,
                             cache=False, max_micro_batch=4096)
    setup = ruler.Setup(lambda: (make_model(), lambda params: torch.optim.AdamW(params, lr=1e-3)),
                        make_sample, loss_fn)
    true, peaks = ruler.true_maximum(setup, torch.device("cpu"), result.limit_bytes, cap=4096,
                                     hint=result.max_micro_batch)
    assert 0.95 * true <= result.max_micro_batch <= true, (result.max_micro_batch, true, result.table())
    assert peaks[result.max_micro_batch] <= result.limit_bytes, "the answer's real step fits the budget"
    assert len(result.trials) <= 4, result.table()
    mm = result.memory_model
    assert mm.per_sample_bytes > 0 and mm.fixed_bytes > 0


def test_leaves_model_optimizer_and_rng_exactly_as_they_were():
    model = convnet()   # BatchNorm running stats and Dropout's random stream
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    trainer = autoaccum.fit(model, 16, opt, loss_fn=ce_loss, micro_batch=8, batchnorm="micro")
    trainer.step(image_batch(16))          # optimizer state exists
    model[0].weight.grad = torch.randn_like(model[0].weight)   # a stray gradient must survive too
    torch.manual_seed(123), np.random.seed(5), random.seed(7)
    before_state = {k: v.clone() for k, v in model.state_dict().items()}
    before_opt = {i: {k: (v.clone() if torch.is_tensor(v) else v) for k, v in st.items()}
                  for i, st in opt.state_dict()["state"].items()}
    before_grad = model[0].weight.grad.clone()
    rng = (torch.get_rng_state(), np.random.get_state(), random.getstate())

    result = autoaccum.probe(model, image_batch(4), optimizer=opt, loss_fn=ce_loss, memory_budget="40MiB",
                             cache=False)
    assert result.max_micro_batch > 1 and len(result.trials) >= 2

    for k, v in model.state_dict().items():
        assert torch.equal(v, before_state[k]), k
    for i, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            assert torch.equal(v, before_opt[i][k]) if torch.is_tensor(v) else v == before_opt[i][k]
    assert torch.equal(model[0].weight.grad, before_grad)
    assert all(p.grad is None for n, p in model.named_parameters() if n != "0.weight")
    assert torch.equal(torch.get_rng_state(), rng[0])
    assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state()[1:2], rng[1][1:2]))
    assert random.getstate() == rng[2]


def test_a_fresh_optimizer_stays_fresh():
    model = mlp(torch.float32)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    autoaccum.probe(model, regression_batch(4, torch.float32), optimizer=opt, loss_fn=mse_loss,
                    memory_budget="4MiB", cache=False)
    assert len(opt.state) == 0 and all(p.grad is None for p in model.parameters())


def test_result_serialises_and_plots(tmp_path):
    model = mlp(torch.float32, d_in=256, hidden=512, d_out=256)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    result = autoaccum.probe(model, regression_batch(4, torch.float32, d_in=256, d_out=256), optimizer=opt,
                             loss_fn=mse_loss, memory_budget="16MiB", cache=False)
    d = json.loads(json.dumps(result.to_dict()))
    assert d["max_micro_batch"] == result.max_micro_batch and d["memory_model"]["per_sample_bytes"] > 0
    assert d["device"]["name"] == "cpu" and d["limit_bytes"] == 16 * MiB
    assert [t["micro_batch"] for t in d["trials"]] == [t.micro_batch for t in result.trials]
    assert autoaccum.ProbeResult.from_dict(d).to_dict() == result.to_dict()
    result.plot(tmp_path / "mem.png")
    assert (tmp_path / "mem.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "micro-batch" in result.table()


def test_callable_sample_and_cap():
    model = mlp()
    calls = []

    def sample(n):
        calls.append(n)
        return regression_batch(n)
    result = autoaccum.probe(model, sample, loss_fn=mse_loss, memory_budget="1GiB", max_micro_batch=64,
                             cache=False)
    assert result.max_micro_batch == 64 and len(result.trials) <= 2
    assert 64 in calls and any("max_micro_batch=64 fits" in n for n in result.notes)
    assert any("no optimizer" in n for n in result.notes)


def test_a_callable_sample_that_draws_random_numbers_leaves_the_rng_as_it_was(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOACCUM_CACHE_DIR", str(tmp_path))
    model = mlp()
    for _ in range(2):            # a miss, then a hit: neither moves the stream
        torch.manual_seed(7)
        expected = torch.rand(4)
        torch.manual_seed(7)
        autoaccum.probe(model, lambda n: regression_batch(n, seed=int(torch.randint(100, ())) + n),
                        loss_fn=mse_loss, memory_budget="4MiB")
        assert torch.equal(torch.rand(4), expected)


def test_an_oom_with_an_empty_message_is_a_failed_trial():
    """Python's MemoryError usually carries no message."""
    model = mlp()
    result = autoaccum.probe(model, regression_batch(4), loss_fn=oom_above(40, MemoryError), memory_budget="64MiB", cache=False,
                             max_micro_batch=64, max_trials=10)
    assert 30 <= result.max_micro_batch <= 40
    assert any(t.oom and t.error == "MemoryError" for t in result.trials)


def test_fit_probes_when_micro_batch_is_none():
    model = TinyGPT(dim=32, layers=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    trainer = autoaccum.fit(model, 256, opt, loss_fn=lm_loss, sample=make_batch(8), memory_budget="24MiB")
    r = trainer.probe_result
    assert r is not None and trainer.plan.micro_batch == r.max_micro_batch < 256
    assert trainer.plan.accum_steps == -(-256 // r.max_micro_batch)
    assert not trainer.step(make_batch(256)).skipped
    roomy = autoaccum.fit(model, 64, opt, loss_fn=lm_loss, sample=make_batch(8), memory_budget="1GiB")
    assert roomy.plan.micro_batch == 64 and roomy.probe_result.max_micro_batch == 64, "capped at the target"


def test_not_enough_memory_says_how_much():
    model = mlp(torch.float32, d_in=256, hidden=2048, d_out=256)
    opt = torch.optim.Adam(model.parameters())
    with pytest.raises(autoaccum.NotEnoughMemoryError, match=r"needs .*MiB measured.*usable"):
        autoaccum.probe(model, regression_batch(2, torch.float32, d_in=256, d_out=256), optimizer=opt,
                        loss_fn=mse_loss, memory_budget="1MiB", cache=False)
    assert len(opt.state) == 0


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(sample=(torch.zeros(4, 12), torch.zeros(3, 5))), ValueError, "disagree on dim 0"),
    (dict(sample=None), ValueError, "sample is required"),
    (dict(memory_budget="lots"), ValueError, "memory_budget"),
    (dict(max_micro_batch=0), ValueError, "max_micro_batch"),
    (dict(amp_dtype=torch.int8), ValueError, "amp_dtype"),
    (dict(device="meta"), ValueError, "meta device, which holds no data"),
    (dict(cache="yes"), TypeError, "cache must be True or False"),
    (dict(sample=lambda n: regression_batch(n + 1)), ValueError, r"sample\(2\) returned a batch of 3"),
])
def test_bad_input(kwargs, exc, match):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    args = dict(sample=regression_batch(4), optimizer=opt, loss_fn=mse_loss, memory_budget="4MiB", cache=False)
    args.update(kwargs)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(exc, match=match):
        autoaccum.probe(model, args.pop("sample"), **args)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_errors_that_are_not_oom_are_reraised_unchanged_and_state_restored():
    model = mlp()
    opt = torch.optim.AdamW(model.parameters())
    before = {k: v.clone() for k, v in model.state_dict().items()}

    class Boom(RuntimeError):
        pass
    calls = {"n": 0}

    def loss_fn(m, b):
        calls["n"] += 1
        if calls["n"] == 2:
            raise Boom("shape mismatch in user code")
        return mse_loss(m, b)
    with pytest.raises(Boom, match="shape mismatch"):
        autoaccum.probe(model, regression_batch(4), optimizer=opt, loss_fn=loss_fn, memory_budget="4MiB", cache=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert len(opt.state) == 0


def test_real_out_of_memory_under_an_address_space_limit():
    """A child process with RLIMIT_AS: large trials fail for real inside the allocator; the probe
    must classify them, clean up, and return a size that then trains in the same process.

    oneDNN is off in the child: under the address-space limit, a failed allocation inside oneDNN
    sometimes surfaces as "could not create a primitive", the message oneDNN gives for any failure,
    which autoaccum does not take for out-of-memory (about 1 run in 10 failed that way). With it
    off, every allocation goes through PyTorch's CPU allocator, whose failure this test is about."""
    code = textwrap.dedent("""
        import resource, torch, autoaccum
        from torch import nn
        import torch.nn.functional as F
        torch.set_num_threads(1)
        torch.backends.mkldnn.enabled = False
        model = nn.Sequential(nn.Linear(1024, 1024), nn.GELU(), nn.Linear(1024, 1024), nn.GELU(), nn.Linear(1024, 8))
        opt = torch.optim.AdamW(model.parameters())
        loss_fn = lambda m, b: F.mse_loss(m(b[0]).mean(1), b[1])
        sample = lambda n: (torch.randn(n, 256, 1024), torch.randn(n, 8))
        vm = int(open("/proc/self/status").read().split("VmSize:")[1].split()[0]) * 1024
        resource.setrlimit(resource.RLIMIT_AS, (vm + (700 << 20), resource.RLIM_INFINITY))
        result = autoaccum.probe(model, sample, optimizer=opt, loss_fn=loss_fn, memory_budget="16GiB",
                                 cache=False, max_micro_batch=4096)
        ooms = [t for t in result.trials if t.oom]
        print("RESULT", result.max_micro_batch, len(result.trials), len(ooms), ooms[0].error if ooms else "")
        trainer = autoaccum.fit(model, result.max_micro_batch, opt, loss_fn=loss_fn,
                                micro_batch=result.max_micro_batch)
        print("STEP", trainer.step(sample(result.max_micro_batch)).skipped)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    line = next(l for l in r.stdout.splitlines() if l.startswith("RESULT")).split()
    best, n_ooms = int(line[1]), int(line[3])
    assert best >= 1 and n_ooms >= 1, r.stdout
    assert "can't allocate memory" in r.stdout or "MemoryError" in r.stdout
    assert "STEP False" in r.stdout


def test_notes_tell_the_truth_about_the_limit():
    model = mlp()
    budgeted = autoaccum.probe(model, regression_batch(4), loss_fn=mse_loss, memory_budget="64MiB", cache=False,
                               max_micro_batch=8)
    assert not any("default" in n for n in budgeted.notes), budgeted.notes
    assert any("memory_budget 64.00 MiB caps" in n for n in budgeted.notes)
    default = autoaccum.probe(model, regression_batch(4), loss_fn=mse_loss, cache=False, max_micro_batch=8)
    assert any("50% of available RAM by default" in n for n in default.notes), default.notes


@pytest.mark.parametrize("accum_dtype", [None, torch.float32])
def test_an_allocator_trial_replays_the_real_steps_order_of_events(accum_dtype):
    """On a caching allocator (CUDA) a trial starts with no gradients and runs two micro-batches, as a
    real step does; exercised here with the CPU tracker standing in for the allocator. Its peak must
    equal both the one-micro-batch trial's (live bytes cannot tell them apart) and the ruler's real
    two-micro-batch Trainer.step at the same size."""
    from autoaccum.buffer import GradBuffer
    from autoaccum.tracker import LiveBytes
    from autoaccum.trial import TrackerMeter, TrialRunner, persistent_tensors

    class AllocatorStandIn(TrackerMeter):
        allocator = True

    make_model, make_sample, loss_fn, _ = CASES["mlp"]
    n, peaks = 24, {}
    for meter_type in (TrackerMeter, AllocatorStandIn):
        model = make_model()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        buffer = GradBuffer(list(model.parameters()), accum_dtype) if accum_dtype is not None else None
        seen = []
        model.register_forward_pre_hook(lambda m, args: seen.append(all(p.grad is None for p in m.parameters())))
        tracker = LiveBytes(persistent_tensors(model, opt) + (list(buffer.flat.values()) if buffer else []))
        runner = TrialRunner(model, opt, make_sample, loss_fn, None, torch.device("cpu"), meter_type(tracker), buffer)
        with tracker, (buffer.capturing() if buffer is not None else contextlib.nullcontext()):
            runner(n)            # optimizer state now exists, as in steady state
            seen.clear()
            peaks[meter_type] = runner(n).peak_bytes
        if meter_type is AllocatorStandIn:
            assert seen == [True, accum_dtype is not None], seen   # two forwards; gradients only from the first
        else:
            assert seen == [accum_dtype is not None]
    setup = ruler.Setup(lambda: (make_model(), lambda params: torch.optim.AdamW(params, lr=1e-3)),
                        make_sample, loss_fn)
    real = ruler.step_peak(setup, n, torch.device("cpu"))
    assert peaks[AllocatorStandIn] == peaks[TrackerMeter]
    assert abs(peaks[AllocatorStandIn] - real) <= 0.02 * real, (peaks, real)
