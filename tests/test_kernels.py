"""Kernels against float64 references: Triton under TRITON_INTERPRET=1 on the CPU, and the torch path.

Random inputs (never zeros), every gradient dtype, odd sizes, many tensors, None gradients,
non-contiguous gradients, inf/nan, huge and tiny values, chunking independence, poisoned outputs.
"""
import contextlib
import math

import pytest
import torch

from autoaccum import kernels
from autoaccum.kernels import accumulate as tri_acc
from autoaccum.kernels import finalize as tri_fin

BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.interpreter)]
# accumulate_ also through the CUDA extension's binding, built for the host (tests/csrc/host_launchers.cpp):
ACC_BACKENDS = BACKENDS + ["binding"]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
TOL = {torch.bfloat16: 1e-6, torch.float16: 1e-6, torch.float32: 1e-6}   # fp32 arithmetic on exact inputs


def randn(n, dtype, gen, scale=1.0):
    return (torch.randn(n, generator=gen, dtype=torch.float64) * scale + 0.1).to(dtype)


def sizes_many(gen, count=300):
    return [int(s) for s in torch.randint(1, 5000, (count,), generator=gen)]


@pytest.fixture
def via(request, monkeypatch):
    """``via(backend)``: the backend= to pass. "binding" runs the extension's dispatch on CPU tensors: its
    module is the host-built binding, whose accumulate launcher works on host memory."""
    def choose(backend):
        if backend != "binding":
            return backend
        binding = request.getfixturevalue("host_binding")
        monkeypatch.setattr(kernels.cuda_ext, "_module", binding)
        monkeypatch.setattr(kernels, "_cuda", lambda device: contextlib.nullcontext((binding, 0)))
        return "cuda"
    return choose


@pytest.mark.parametrize("backend", ACC_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("assign", [True, False])
@pytest.mark.parametrize("sizes", [[1], [127], [(1 << 20) + 3], "many"], ids=["1", "127", "2^20+3", "many"])
def test_accumulate_matches_float64(backend, dtype, assign, sizes, via):
    backend = via(backend)
    gen = torch.Generator().manual_seed(hash((str(dtype), assign, str(sizes))) % 1000)
    sizes = sizes_many(gen) if sizes == "many" else sizes
    grads = [randn(n, dtype, gen) for n in sizes]
    if assign:
        accs = [torch.full((n,), float("nan")) for n in sizes]     # poison: every element must be written
        start = [torch.zeros(n, dtype=torch.float64) for n in sizes]
    else:
        accs = [randn(n, torch.float32, gen) for n in sizes]
        start = [a.double() for a in accs]
    w = 0.3717
    kernels.accumulate_(accs, grads, w, assign=assign, backend=backend)
    for a, s, g in zip(accs, start, grads):
        expected = s + w * g.double()
        assert not torch.isnan(a).any(), "an element was not written"
        err = (a.double() - expected).abs().max().item()
        assert err <= TOL[dtype] * (expected.abs().max().item() + 1), err


@pytest.mark.parametrize("backend", ACC_BACKENDS)
def test_accumulate_skips_none_and_handles_non_contiguous(backend, via):
    backend = via(backend)
    gen = torch.Generator().manual_seed(3)
    grads = [randn(12 * 7, torch.bfloat16, gen).view(12, 7).t(), None, randn(33, torch.float16, gen)]
    accs = [torch.randn(7, 12, generator=gen), torch.randn(5, generator=gen), torch.randn(33, generator=gen)]
    before = [a.clone() for a in accs]
    kernels.accumulate_(accs, grads, 2.0, backend=backend)
    assert torch.equal(accs[1], before[1]), "a None gradient leaves its accumulator alone"
    assert torch.allclose(accs[0].double(), before[0].double() + 2 * grads[0].double(), atol=1e-6)
    assert torch.allclose(accs[2].double(), before[2].double() + 2 * grads[2].double(), atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dense_accumulators_in_another_memory_order_line_up_with_their_gradients(backend):
    """channels_last or transposed accumulators (laid out like their parameters) are flat memory in
    their own order; a gradient in that order or contiguous is matched element for element."""
    gen = torch.Generator().manual_seed(5)
    shapes = [(3, 5, 7, 2), (9, 4)]
    accs = [torch.randn(shapes[0], generator=gen).contiguous(memory_format=torch.channels_last),
            torch.randn(4, 9, generator=gen).t()]
    grads_same = [randn(3 * 5 * 7 * 2, torch.bfloat16, gen).view(shapes[0]).contiguous(memory_format=torch.channels_last),
                  randn(36, torch.float16, gen).view(4, 9).t()]
    grads_plain = [randn(3 * 5 * 7 * 2, torch.float32, gen).view(shapes[0]), randn(36, torch.float32, gen).view(9, 4)]
    expected = [a.double() + 0.5 * g.double() + 2.0 * h.double() for a, g, h in zip(accs, grads_same, grads_plain)]
    kernels.accumulate_(accs, grads_same, 0.5, backend=backend)
    kernels.accumulate_(accs, grads_plain, 2.0, backend=backend)
    for a, e in zip(accs, expected):
        assert torch.allclose(a.double(), e, atol=1e-5)
    assert accs[0].is_contiguous(memory_format=torch.channels_last), "written in place, layout kept"
    norm, found = kernels.finalize_(accs, 0.5, max_norm=1.0, backend=backend)
    ref = torch.cat([e.flatten() for e in expected]).mul(0.5).norm()
    assert abs(norm.item() - ref.item()) <= 1e-5 * ref.item() and found.item() == 0
    clipped = torch.cat([a.double().flatten() for a in accs]).norm().item()
    assert abs(clipped - 1.0) <= 1e-5


@pytest.mark.interpreter
def test_accumulate_results_do_not_depend_on_chunking(monkeypatch):
    gen = torch.Generator().manual_seed(4)
    sizes = sizes_many(gen, 40) + [70001]
    grads = [randn(n, torch.bfloat16, gen) for n in sizes]
    outs = []
    for block, iters in [(1024, 8), (256, 3), (128, 1)]:
        monkeypatch.setattr(tri_acc, "BLOCK", block)
        monkeypatch.setattr(tri_acc, "ITERS", iters)
        monkeypatch.setattr(tri_acc, "CHUNK", block * iters)
        accs = [torch.full((n,), 0.5) for n in sizes]
        kernels.accumulate_(accs, grads, 0.7, backend="triton")
        outs.append(accs)
    for other in outs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(outs[0], other))


def reference_finalize(grads, inv_scale, max_norm):
    flat = torch.cat([g.double().flatten() for g in grads])
    finite = bool(torch.isfinite(flat).all())
    norm = flat.norm().item() * inv_scale if finite else math.inf
    scale = inv_scale * (min(1.0, max_norm / (norm + 1e-6)) if max_norm is not None else 1.0)
    return norm, finite, scale


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtypes", [[torch.float32], [torch.bfloat16], [torch.float16],
                                    [torch.float32, torch.bfloat16, torch.float16]], ids=["f32", "bf16", "f16", "mixed"])
@pytest.mark.parametrize("max_norm", [None, 0.5, 1e9])
def test_finalize_norm_and_scale(backend, dtypes, max_norm):
    gen = torch.Generator().manual_seed(len(dtypes) * 10 + (0 if max_norm is None else int(math.log10(max_norm) + 5)))
    sizes = [1, 127, 4099, (1 << 16) + 3] + sizes_many(gen, 30)
    grads = [randn(n, dtypes[i % len(dtypes)], gen, scale=3.0) for i, n in enumerate(sizes)]
    before = [g.clone() for g in grads]
    inv_scale = 1 / 1024
    norm, found = kernels.finalize_(grads, inv_scale, max_norm, backend=backend)
    ref_norm, finite, scale = reference_finalize(before, inv_scale, max_norm)
    assert found.item() == 0.0 and finite
    assert abs(norm.item() - ref_norm) <= 2e-6 * ref_norm
    for g, b in zip(grads, before):
        expected = b.double() * scale
        tol = {torch.float32: 1e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}[b.dtype]
        atol = 6e-8 if b.dtype == torch.float16 else 1e-30   # float16 results below 6e-5 are subnormal
        assert torch.allclose(g.double(), expected, rtol=tol, atol=atol), b.dtype


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("poison", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("where", [0, 2])
def test_finalize_finds_inf_and_nan_and_writes_nothing(backend, poison, where):
    gen = torch.Generator().manual_seed(5)
    grads = [randn(100, torch.float32, gen), randn(5000, torch.bfloat16, gen), randn(77, torch.float16, gen)]
    grads[where][where * 13 + 1] = poison
    before = [g.clone() for g in grads]
    norm, found = kernels.finalize_(grads, 0.5, 1.0, backend=backend)
    assert found.item() == 1.0 and math.isinf(norm.item())
    for g, b in zip(grads, before):
        assert torch.equal(g.view(torch.uint8), b.view(torch.uint8)), "gradients must be untouched on inf/nan"


@pytest.mark.parametrize("backend", BACKENDS)
def test_finalize_without_scaling_writes_nothing(backend):
    gen = torch.Generator().manual_seed(6)
    grads = [randn(1000, torch.float32, gen) for _ in range(3)]
    before = [g.clone() for g in grads]
    norm, found = kernels.finalize_(grads, 1.0, None, backend=backend)
    assert all(torch.equal(g, b) for g, b in zip(grads, before))
    assert abs(norm.item() - torch.cat(before).double().norm().item()) <= 1e-6 * norm.item()
    norm2, _ = kernels.finalize_(grads, 1.0, 1e-3, apply=False, backend=backend)
    assert all(torch.equal(g, b) for g, b in zip(grads, before)), "apply=False only measures"
    assert norm2.item() == norm.item()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("magnitude", [1e-30, 1e30])
def test_finalize_norm_survives_huge_and_tiny_values(backend, magnitude):
    gen = torch.Generator().manual_seed(7)
    grads = [randn(3000, torch.float32, gen, scale=magnitude), randn(10, torch.float32, gen, scale=magnitude)]
    exact = torch.cat([g.double() for g in grads]).norm().item()
    norm, found = kernels.finalize_(grads, 1.0, None, backend=backend)
    assert found.item() == 0.0
    assert abs(norm.item() - exact) <= 2e-6 * exact, (norm.item(), exact)


@pytest.mark.interpreter
def test_finalize_is_deterministic_and_chunking_independent(monkeypatch):
    gen = torch.Generator().manual_seed(8)
    grads = [randn(n, torch.float32, gen) for n in sizes_many(gen, 50)]
    first = kernels.finalize_([g.clone() for g in grads], 1.0, None, backend="triton")[0].item()
    again = kernels.finalize_([g.clone() for g in grads], 1.0, None, backend="triton")[0].item()
    assert first == again, "same input, same bits"
    monkeypatch.setattr(tri_fin, "BLOCK", 128)
    monkeypatch.setattr(tri_fin, "ITERS", 2)
    monkeypatch.setattr(tri_fin, "CHUNK", 256)
    other = kernels.finalize_([g.clone() for g in grads], 1.0, None, backend="triton")[0].item()
    assert abs(other - first) <= 1e-6 * first


def test_finalize_accepts_a_tensor_inv_scale_and_empty_lists():
    g = [torch.randn(10) + 1]
    norm, _ = kernels.finalize_(g, torch.tensor(0.25), None)
    assert norm.item() > 0
    norm, found = kernels.finalize_([None], 1.0)
    assert norm.item() == 0 and found.item() == 0


@pytest.mark.parametrize("call, exc, match", [
    (lambda a, g: kernels.accumulate_(a, g[:1], 1.0), ValueError, "pair up"),
    (lambda a, g: kernels.accumulate_([a[0].half(), a[1]], g, 1.0), TypeError, "accs\\[0\\] is torch.float16"),
    (lambda a, g: kernels.accumulate_(a, [g[0].long(), g[1]], 1.0), TypeError, "grads\\[0\\] is torch.int64"),
    (lambda a, g: kernels.accumulate_(a, [g[0].double(), g[1]], 1.0), TypeError, "would round it"),
    (lambda a, g: kernels.accumulate_(a, [g[0][:5], g[1]], 1.0), ValueError, "shape"),
    (lambda a, g: kernels.accumulate_([torch.zeros(10, 2).t()[0], a[1]], g, 1.0), ValueError, "gaps or overlaps"),
    (lambda a, g: kernels.accumulate_([a[1], a[1]], [g[1], g[1]], 1.0), ValueError, "overlap"),
    (lambda a, g: kernels.accumulate_(a, g, float("nan")), ValueError, "weight"),
    (lambda a, g: kernels.accumulate_(a, g, 1.0, backend="fpga"), ValueError, "backend"),
    (lambda a, g: kernels.accumulate_("a", g, 1.0), TypeError, "lists"),
    (lambda a, g: kernels.finalize_(g, 0.0), ValueError, "inv_scale"),
    (lambda a, g: kernels.finalize_(g, 1.0, max_norm=-1), ValueError, "max_norm"),
    (lambda a, g: kernels.finalize_([g[0], "x"]), TypeError, "grads\\[1\\]"),
    (lambda a, g: kernels.accumulate_(a, g, 1e300), ValueError, "beyond float32's range"),
    (lambda a, g: kernels.accumulate_(a, g, -1e39, assign=True), ValueError, "beyond float32's range"),
    (lambda a, g: kernels.finalize_([g[0], g[1], g[0]], 0.5), ValueError, "grads\\[0\\] and grads\\[2\\] are the same"),
    (lambda a, g: kernels.finalize_([None, g[1], None, g[1]], 0.5), ValueError, "grads\\[1\\] and grads\\[3\\]"),
    (lambda a, g: kernels.accumulate_(a, [g[0], g[1].to_sparse()], 1.0), TypeError, "grads\\[1\\] is a torch.sparse_coo"),
    (lambda a, g: kernels.accumulate_(a, [g[0], g[1].to_sparse()], 0.5, assign=True), TypeError, "dense \\(strided\\)"),
    (lambda a, g: kernels.finalize_([g[0], g[1].to_sparse()]), TypeError, "grads\\[1\\] is a torch.sparse_coo"),
])
def test_bad_input_is_rejected_before_anything_is_written(call, exc, match):
    accs = [torch.randn(10), torch.randn(20)]
    grads = [torch.randn(10), torch.randn(20)]
    before = [a.clone() for a in accs] + [g.clone() for g in grads]
    with pytest.raises(exc, match=match):
        call(accs, grads)
    assert all(torch.equal(x, y) for x, y in zip(accs + grads, before))


def _fake(t):
    from torch._subclasses.fake_tensor import FakeTensorMode
    return FakeTensorMode().from_tensor(t)


@pytest.mark.filterwarnings("ignore:Accessing the data pointer of FakeTensor")
@pytest.mark.parametrize("bad, exc, match", [
    (lambda g: [g[0], g[1][:7]], ValueError, r"accs\[1\] has shape \(20,\) but grads\[1\] has \(7,\)"),
    (lambda g: [g[0], _fake(g[1])], TypeError, r"grads\[1\] is not plain memory"),
    (lambda g: [g[0], torch._efficientzerotensor(20)], TypeError, r"grads\[1\] is not plain memory"),
    (lambda g: [g[0], torch._neg_view(g[1])], TypeError, r"grads\[1\] is not plain memory"),
    (lambda g: [g[0].long(), g[1]], TypeError, r"grads\[0\] is torch.int64"),
    (lambda g: [g[0], g[1].double()], TypeError, "would round it"),
    (lambda g: [g[0], g[1].to("meta")], ValueError, r"accs\[1\] is on cpu but grads\[1\] is on meta"),
    (lambda g: [g[0], g[1].to_sparse()], TypeError, r"grads\[1\] is a torch.sparse_coo"),
    (lambda g: [g[0], "x"], TypeError, r"accs\[1\] and grads\[1\] must be tensors"),
])
def test_the_binding_leaves_gradients_it_does_not_take_to_the_named_checks(bad, exc, match, via):
    """accumulate_lists checks every pair before it launches anything: a bad pair after good ones
    writes nothing, and Python's checks name it."""
    backend = via("binding")
    accs = [torch.randn(10), torch.randn(20)]
    for _ in range(3):
        kernels.accumulate_(accs, [torch.randn(10), torch.randn(20)], 1.0, backend=backend)   # accs cached
    before = [a.clone() for a in accs]
    with pytest.raises(exc, match=match):
        kernels.accumulate_(accs, bad([torch.randn(10), torch.randn(20)]), 1.0, backend=backend)
    assert all(torch.equal(a, b) for a, b in zip(accs, before))


@pytest.mark.parametrize("case, exc, match", [
    ("overlapping accumulators", ValueError, r"accs\[0\] and accs\[1\] overlap"),
    ("weight beyond float32", ValueError, "beyond float32's range"),
    ("empty, another shape", ValueError, r"accs\[1\] has shape \(2, 0\) but grads\[1\] has \(0, 2\)"),
    ("accumulator grown in place", ValueError, r"accs\[0\] has shape \(4,\) but grads\[0\] has \(8,\)"),
])
def test_the_binding_path_keeps_the_accumulator_checks(case, exc, match, via):
    backend = via("binding")
    flat = torch.zeros(16)
    accs, grads, weight = [flat[:4], flat[4:8]], [torch.randn(4), torch.randn(4)], 1.0
    if case == "overlapping accumulators":
        accs = [flat[:4], flat[2:6]]
    if case == "empty, another shape":
        accs, grads = [flat[:4], torch.zeros(2, 0)], [torch.randn(4), torch.randn(0, 2)]
    for _ in range(3 if case == "accumulator grown in place" else 0):   # cached as they were
        kernels.accumulate_(accs, [torch.randn(4), torch.randn(4)], 1.0, backend=backend)
    if case == "accumulator grown in place":
        accs[0].as_strided_((8,), (1,))                # same object and address, now over accs[1]
        grads = [torch.randn(8), torch.randn(4)]
    if case == "weight beyond float32":
        weight = 1e39
    before = flat.clone()
    with pytest.raises(exc, match=match):
        kernels.accumulate_(accs, grads, weight, backend=backend)
    assert torch.equal(flat, before)


def test_the_binding_hands_non_contiguous_gradients_to_the_layout_copy(via):
    backend = via("binding")
    gen = torch.Generator().manual_seed(12)
    accs = [torch.randn(7, 12, generator=gen), torch.randn(33, generator=gen)]
    grads = [randn(84, torch.bfloat16, gen).view(12, 7).t(), randn(33, torch.float16, gen)]
    want = [a.double() for a in accs]
    for _ in range(3):                                 # fresh, then cached accumulators
        kernels.accumulate_(accs, grads, 0.5, backend=backend)
        want = [w + 0.5 * g.double() for w, g in zip(want, grads)]
    for a, w in zip(accs, want):
        torch.testing.assert_close(a.double(), w, rtol=1e-6, atol=1e-6)


@pytest.mark.interpreter
def test_the_kernels_refuse_what_is_not_plain_memory():
    """A lazily negated view's memory holds -t: read as plain memory it would be added with the
    wrong sign (the torch path adds it right; torch itself refuses to scale one in place)."""
    g = torch._neg_view(torch.randn(300))
    acc = torch.zeros(300)
    with pytest.raises(TypeError, match=r"grads\[0\] is not plain memory"):
        kernels.accumulate_([acc], [g], 1.0, backend="triton")
    with pytest.raises(TypeError, match=r"grads\[0\] is not plain memory"):
        kernels.finalize_([g], 0.5, 1.0, backend="triton")
    assert not acc.any()
    kernels.accumulate_([acc], [g], 1.0, backend="torch")
    torch.testing.assert_close(acc, g.resolve_neg())


@pytest.mark.interpreter
def test_another_backend_asked_for_is_not_overruled_by_the_binding(via, monkeypatch):
    backend = via("binding")
    called = []
    real = kernels.cuda_ext._module.accumulate_lists
    monkeypatch.setattr(kernels.cuda_ext._module, "accumulate_lists", lambda *a: called.append(1) or real(*a))
    accs, grads = [torch.zeros(5), torch.zeros(9)], [torch.randn(5), torch.randn(9)]
    for chosen in ("triton", "torch"):
        kernels.accumulate_(accs, grads, 1.0, backend=chosen)
    monkeypatch.setenv("AUTOACCUM_BACKEND", "torch")
    kernels.accumulate_(accs, grads, 1.0)
    assert not called
    kernels.accumulate_(accs, grads, 1.0, backend=backend)
    assert called == [1]
    torch.testing.assert_close(accs[1], 4 * grads[1])


def test_the_binding_takes_fresh_gradients_without_python_facts(via, monkeypatch):
    """Autograd's new gradients every micro-batch: one C++ call, no per-tensor work in Python."""
    from autoaccum.kernels import group
    backend = via("binding")
    gen = torch.Generator().manual_seed(11)
    flat = torch.zeros(300)
    accs = list(torch.split(flat, [7, 93, 200]))
    kernels.accumulate_(accs, [randn(a.numel(), torch.bfloat16, gen) for a in accs], 1.0, backend=backend)
    built, calls = [], []
    real_facts, real_lists = group.Facts.__init__, kernels.cuda_ext._module.accumulate_lists
    monkeypatch.setattr(group.Facts, "__init__", lambda self, ts: built.append(len(ts)) or real_facts(self, ts))
    monkeypatch.setattr(kernels.cuda_ext._module, "accumulate_lists", lambda *a: calls.append(1) or real_lists(*a))
    want = flat.double().clone()
    for step in range(5):
        grads = [randn(a.numel(), dtype, gen) for a, dtype in zip(accs, DTYPES)]   # bf16, fp16, fp32 at once
        if step == 4:
            grads[1] = None                            # skipped in C++ too
        kernels.accumulate_(list(accs), grads, 0.25, backend=backend)
        want += 0.25 * torch.cat([g.double() if g is not None else torch.zeros(a.numel(), dtype=torch.float64)
                                  for a, g in zip(accs, grads)])
    assert calls == [1] * 5 and built == [3], "only the accumulators' facts (second sighting), none for gradients"
    torch.testing.assert_close(flat.double(), want, rtol=1e-6, atol=1e-6)


@pytest.mark.interpreter
def test_a_gradient_list_repeating_a_tensor_is_refused_by_finalize_even_once_cached():
    """accumulate_ reads its gradients, so one tensor twice is fine there, and the list is cached
    on its second sighting; finalize_ writes them, and must still refuse that list."""
    gen = torch.Generator().manual_seed(5)
    g = randn(33, torch.float32, gen)
    grads = [g, randn(7, torch.float32, gen), g]
    accs = [torch.zeros(33), torch.zeros(7), torch.zeros(33)]
    for _ in range(3):
        kernels.accumulate_(accs, grads, 1.0, backend="triton")
    before = g.clone()
    with pytest.raises(ValueError, match="same tensor"):
        kernels.finalize_(grads, 0.5, backend="triton")
    assert torch.equal(g, before)


def test_dispatch_prefers_torch_on_the_cpu_and_obeys_the_environment(monkeypatch):
    cpu = [torch.zeros(3)]
    assert kernels.backend_for(cpu) == "torch"
    monkeypatch.setenv("AUTOACCUM_BACKEND", "triton")
    assert kernels.backend_for(cpu) == "triton"
    assert kernels.backend_for(cpu, fast_ok=False) == "torch", "float64 always takes the torch path"
    monkeypatch.setenv("AUTOACCUM_BACKEND", "cuda")
    if not kernels.cuda_ext.available():
        with pytest.raises(RuntimeError, match="CUDA extension is unavailable"):
            kernels.backend_for(cpu)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_kernels_match_the_reference(backend):
    from autoaccum.kernels import cuda_ext
    if backend == "cuda" and cuda_ext.load(jit=True) is None:
        pytest.fail(f"the CUDA extension did not build: {cuda_ext.reason()}")
    gen = torch.Generator().manual_seed(9)
    sizes = [1, 127, (1 << 20) + 3] + sizes_many(gen, 500)
    for dtype in DTYPES:
        grads = [randn(n, dtype, gen).cuda() for n in sizes]
        for assign in (True, False):
            accs = [torch.full((n,), float("nan") if assign else 0.25, device="cuda") for n in sizes]
            ref = [torch.full((n,), 0.0 if assign else 0.25, dtype=torch.float64) for n in sizes]
            kernels.accumulate_(accs, grads, 0.37, assign=assign, backend=backend)
            for a, r, g in zip(accs, ref, grads):
                assert torch.allclose(a.cpu().double(), r + 0.37 * g.cpu().double(), rtol=1e-6, atol=1e-6)
        before = [g.clone() for g in grads]
        norm, found = kernels.finalize_(grads, 1 / 8, 0.5, backend=backend)
        ref_norm, _, scale = reference_finalize([b.cpu() for b in before], 1 / 8, 0.5)
        assert found.item() == 0 and abs(norm.item() - ref_norm) <= 2e-6 * ref_norm
        tol = {torch.float32: 1e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}[dtype]
        for g, b in zip(grads, before):
            assert torch.allclose(g.cpu().double(), b.cpu().double() * scale, rtol=tol, atol=6e-8)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_the_torch_path_adds_a_narrower_gradient_as_widening_it_first_would(dtype):
    """The add takes mixed lists in one foreach call; each element must round exactly as
    ``acc.add_(g.to(acc.dtype), alpha=w)``, in float32 and float64 accumulators."""
    gen = torch.Generator().manual_seed(21)
    for acc_dtype in (torch.float32, torch.float64):
        if dtype.itemsize > acc_dtype.itemsize:
            continue
        accs = [randn(n, acc_dtype, gen) for n in (1, 129, 4099)]
        grads = [randn(n, dtype, gen, scale=3.0) for n in (1, 129, 4099)]
        expected = [a.clone().add_(g.to(acc_dtype), alpha=0.3712) for a, g in zip(accs, grads)]
        kernels.accumulate_(accs, grads, 0.3712, backend="torch")
        assert all(torch.equal(a, e) for a, e in zip(accs, expected)), (dtype, acc_dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_the_torch_path_scales_as_a_multiply_by_the_python_number_would(dtype):
    """Assign and finalize multiply many tensors at once (by a 0-dim float32 tensor, float64 for
    float64, which PyTorch's CPU foreach runs in one kernel); every element must come out as
    ``t.mul_(number)`` would make it."""
    gen = torch.Generator().manual_seed(22)
    sizes = (1, 31, 4097)
    acc_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    grads = [randn(n, dtype, gen, scale=5.0) for n in sizes]
    accs = [torch.empty(n, dtype=acc_dtype) for n in sizes]
    kernels.accumulate_(accs, grads, 0.0123457, assign=True, backend="torch")
    assert all(torch.equal(a, g.to(acc_dtype).mul_(0.0123457)) for a, g in zip(accs, grads))
    before = [g.clone() for g in grads]
    host = kernels.reference.host_norm(before, 0.731)        # the float the clip factor is made from
    kernels.finalize_(grads, 0.731, max_norm=1.0, backend="torch")
    assert abs(host - math.sqrt(sum(float(b.double().square().sum()) for b in before)) * 0.731) <= 1e-5 * host
    factor = 0.731 * min(1.0, 1.0 / (host + 1e-6))
    assert factor < 0.731, "the case must clip"
    assert all(torch.equal(g, b.mul_(factor)) for g, b in zip(grads, before)), dtype


def test_the_torch_path_writes_nothing_when_nothing_is_clipped_or_unscaled():
    gen = torch.Generator().manual_seed(12)
    grads = [randn(n, torch.float32, gen) for n in (5, 3000)]
    versions = [g._version for g in grads]
    norm, _ = kernels.finalize_(grads, 1.0, max_norm=1e6, backend="torch")
    assert [g._version for g in grads] == versions, "a x1.0 multiply was run"
    kernels.finalize_(grads, 1.0, max_norm=norm.item() / 2, backend="torch")
    assert [g._version for g in grads] != versions


def test_the_torch_path_rescues_tensors_whose_float32_squares_underflow_or_overflow():
    gen = torch.Generator().manual_seed(13)
    tiny = (torch.randn(4000, generator=gen) * 1e-25).float()          # squares far below fp32's range
    small = (torch.randn(7, generator=gen) * 1e-24).float()
    huge = (torch.randn(100, generator=gen) * 1e25).bfloat16()          # squares far above it
    for g in ([tiny, small], [tiny, small, huge]):
        exact = torch.linalg.vector_norm(torch.cat([x.double() for x in g])).item()
        norm, found = kernels.finalize_([x.clone() for x in g], 1.0, None, backend="torch")
        assert found.item() == 0 and abs(norm.item() - exact) <= 2e-6 * exact, (norm.item(), exact)


@pytest.mark.parametrize("combine", ["host", "device"])
def test_small_tensors_beside_a_normal_one_are_not_read_again(monkeypatch, combine):
    """Vanishing gradients in early layers (norms of 1e-13) cannot move a total of order 1 by
    underflow: the float64 re-read is for gradients that are tiny as a whole."""
    from autoaccum.kernels import reference
    gen = torch.Generator().manual_seed(21)
    grads = [(torch.randn(256, generator=gen) * 1e-14) for _ in range(20)] + [torch.randn(300, generator=gen)]
    real = torch.linalg.vector_norm
    reads = []
    monkeypatch.setattr(torch.linalg, "vector_norm", lambda *a, **k: reads.append(1) or real(*a, **k))

    def norm_of(gs):
        if combine == "host":
            return kernels.finalize_(gs, 1.0, None, backend="torch")[0].item()
        return reference.device_norm_and_flag(gs, 1.0, torch.device("cpu"))[0].item()

    exact = real(torch.cat([g.double() for g in grads])).item()
    reads.clear()
    assert abs(norm_of(grads) - exact) <= 1e-6 * exact
    assert len(reads) <= (1 if combine == "device" else 0), "no tensor may be read again in float64"
    tiny = [g * 1e-30 for g in grads]                  # now underflow can matter: re-read
    exact = real(torch.cat([g.double() for g in tiny])).item()
    reads.clear()
    assert abs(norm_of(tiny) - exact) <= 2e-6 * exact
    assert len(reads) >= 21


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_accumulate_through_every_path_of_the_dispatch(backend):
    """Fresh gradients (the extension checks them in C++), a list with a transposed gradient (the
    layout copy, Python's launch tables) seen often enough to be cached, and None entries."""
    from autoaccum.kernels import cuda_ext
    if backend == "cuda" and cuda_ext.load(jit=True) is None:
        pytest.fail(f"the CUDA extension did not build: {cuda_ext.reason()}")
    gen = torch.Generator().manual_seed(15)
    accs = [torch.randn(7, 12, generator=gen).cuda(), torch.randn(5, generator=gen).cuda(),
            torch.randn(70001, generator=gen).cuda()]
    want = [a.cpu().double() for a in accs]
    odd = [randn(84, torch.bfloat16, gen).view(12, 7).t().cuda(), None, randn(70001, torch.float16, gen).cuda()]
    for step in range(6):
        grads = odd if step % 2 else [randn(a.numel(), torch.bfloat16, gen).view(a.shape).cuda() for a in accs]
        kernels.accumulate_(accs, grads, 0.5, backend=backend)
        want = [w + 0.5 * g.cpu().double() if g is not None else w for w, g in zip(want, grads)]
    for a, w in zip(accs, want):
        assert torch.allclose(a.cpu().double(), w, rtol=1e-6, atol=1e-6)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_kernel_calls_never_wait_for_the_device(backend):
    """A float inv_scale once became a blocking host-to-device copy every step; CUDA's sync debug
    mode turns any synchronising call into an error."""
    from autoaccum.kernels import cuda_ext
    if backend == "cuda" and cuda_ext.load(jit=True) is None:
        pytest.fail(f"the CUDA extension did not build: {cuda_ext.reason()}")
    gen = torch.Generator().manual_seed(14)
    grads = [randn(n, torch.bfloat16, gen).cuda() for n in (7, 5000, 70001)]
    accs = [torch.zeros(g.shape, device="cuda") for g in grads]
    kernels.accumulate_(accs, grads, 0.5, backend=backend)          # warm: compile, build launch tables
    kernels.finalize_(accs, 1.0, 1.0, backend=backend)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        kernels.accumulate_(accs, grads, 0.5, backend=backend)
        kernels.finalize_(accs, 0.5, 1.0, backend=backend)
        kernels.finalize_(accs, 1.0, None, apply=False, backend=backend)
    finally:
        torch.cuda.set_sync_debug_mode("default")
