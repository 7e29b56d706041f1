"""autoaccum.estimate: dry runs on fake tensors, compared with the CPU tracker and (on a GPU) the allocator."""
import json

import pytest
import torch
from torch import nn

import autoaccum
from autoaccum.batch import to_device
from autoaccum.demo import TinyGPT, lm_loss, make_batch
from autoaccum.probe import StateGuard, TrialRunner, _TrackerMeter, _persistent_tensors, sample_factory
from autoaccum.tracker import LiveBytes, storage_bytes
from helpers import ce_loss, convnet, image_batch, mlp, mse_loss, regression_batch

CASES = {
    "mlp": (lambda: mlp(torch.float32, d_in=256, hidden=512, d_out=256),
            lambda: regression_batch(4, torch.float32, d_in=256, d_out=256), mse_loss),
    "transformer": (lambda: TinyGPT(dim=64, layers=2), lambda: make_batch(4), lm_loss),
    "convnet": (convnet, lambda: image_batch(4), ce_loss),
}


def measured_peaks(model, opt, sample, loss_fn, sizes):
    """Real CPU steps measured by the tracker, in steady state (gradients and optimizer state exist)."""
    guard = StateGuard(model, opt)
    make, _ = sample_factory(sample)
    tracker = LiveBytes(baseline=storage_bytes(_persistent_tensors(model, opt)))
    run = TrialRunner(model, opt, make, loss_fn, None, torch.device("cpu"), _TrackerMeter(tracker))
    with tracker:
        run(2)
        peaks = {n: run(n).peak_bytes for n in sizes}
    guard.restore()
    return peaks


@pytest.mark.parametrize("name", CASES)
def test_estimate_matches_the_cpu_tracker(name):
    make_model, make_sample, loss_fn = CASES[name]
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    est = autoaccum.estimate(model, make_sample(), optimizer=opt, loss_fn=loss_fn, device_memory="96MiB",
                             context_bytes=0, workspace_bytes=0)
    sizes = [3, 17, est.max_micro_batch]
    real = measured_peaks(model, opt, make_sample(), loss_fn, sizes)
    for n in sizes:
        assert abs(est.peak_bytes(n) - real[n]) <= 0.10 * real[n], (n, est.peak_bytes(n), real[n])
    assert est.max_micro_batch > 17 and len(est.runs) <= 8
    assert all(p.device.type == "cpu" for p in model.parameters()) and len(opt.state) == 0


def test_meta_model_is_sized_without_allocating():
    with torch.device("meta"):
        model = TinyGPT(dim=512, layers=8, heads=8)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    est = autoaccum.estimate(model, make_batch(8), optimizer=opt, loss_fn=lm_loss, device_memory="16GiB")
    params = sum(p.numel() for p in model.parameters())
    assert est.memory_model.fixed_bytes > 4 * 4 * params     # weights, grads, two Adam moments
    assert 1 < est.max_micro_batch < 1 << 16
    assert est.peak_bytes(est.max_micro_batch) <= est.usable_bytes - est.headroom_bytes
    assert est.peak_bytes(est.max_micro_batch + 1) > est.usable_bytes - est.headroom_bytes - 2 * est.memory_model.per_sample_bytes
    assert all(p.is_meta for p in model.parameters())
    d = json.loads(json.dumps(est.to_dict()))
    assert d["device_memory_bytes"] == 16 << 30 and d["runs"]


def test_cuda_modelling_adds_rounding_workspace_and_context():
    model, sample = mlp(torch.float32), regression_batch(4, torch.float32)
    plain = autoaccum.estimate(model, sample, loss_fn=mse_loss, device_memory="1GiB", context_bytes=0,
                               workspace_bytes=0)
    cuda = autoaccum.estimate(model, sample, loss_fn=mse_loss, device_memory="1GiB")
    assert cuda.peak_bytes(8) >= plain.peak_bytes(8) + (32 << 20)
    assert cuda.usable_bytes == (1 << 30) - (512 << 20)


def test_value_dependent_forward_gets_a_clear_error():
    class Gate(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            h = self.lin(x)
            return h[h > 0].sum()   # the output's shape depends on the values
    with pytest.raises(RuntimeError, match="depends on tensor values"):
        autoaccum.estimate(Gate(), torch.randn(4, 4), loss_fn=lambda m, x: m(x), device_memory="1GiB")


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(device_memory="256MiB"), ValueError, "leaves nothing after the CUDA context"),
    (dict(device_memory="big"), ValueError, "device_memory"),
    (dict(max_micro_batch=-1), ValueError, "max_micro_batch"),
    (dict(loss_fn="mse"), TypeError, "loss_fn"),
])
def test_bad_input(kwargs, exc, match):
    args = dict(loss_fn=mse_loss, device_memory="1GiB")
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        autoaccum.estimate(mlp(), regression_batch(4), **args)


@pytest.mark.cuda
@pytest.mark.parametrize("name", CASES)
def test_estimate_is_within_10_percent_of_the_gpu_allocator(name):
    make_model, make_sample, loss_fn = CASES[name]
    model = make_model().cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    est = autoaccum.estimate(model, make_sample(), optimizer=opt, loss_fn=loss_fn, device_memory="80GiB",
                             max_micro_batch=4096)
    n = 256
    sample = sample_factory(make_sample())[0]
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    step = lambda b: (loss_fn(model, b).backward(), opt.step())
    step(to_device(sample(2), torch.device("cuda")))   # optimizer state and cuBLAS workspace exist
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step(to_device(sample(n), torch.device("cuda")))
    measured = torch.cuda.max_memory_allocated()
    assert abs(est.peak_bytes(n) - measured) <= 0.10 * measured, (est.peak_bytes(n), measured)
