"""Host time of one kernel call: the Python work autoaccum does before the device sees a launch.

Why it matters: the bf16 accumulate over 1,000 tensors of 1M elements moves 10 GB and takes about
2.2 ms on an H100; a millisecond of Python per call would cut the bandwidth it reaches by a third.
Goal: at most 50 µs per ``accumulate_``/``finalize_`` call at 1,000 tensors when the tensor list
repeats (as the gradient buffer's views do, step after step).

The launches are replaced by no-ops (Triton's kernels by a stub that takes the launch arguments;
the CUDA extension by a stub module with its functions), so this measures autoaccum's own work:
checking the lists, finding the cached facts and launch tables, building per-call address
arrays. The ``cuda`` rows use the extension's real C++ checks (``same_tensors``;
``accumulate_lists``, which checks the pairs and calls the launchers): the binding
``csrc/bindings.cpp`` compiled for the host with no-op launchers (``tests/csrc/host_launchers.cpp``;
about 20 s with g++ and ninja, cached after), on a GPU machine too. ``--no-binding`` or a failed
build leaves the Python checks, and the JSON says which ran. On the CPU the address tables live
in CPU memory; on a GPU (``--device cuda``) they are uploaded as in real use. Cases:

* ``accumulate repeated``: the same accumulator views and the same gradient tensors every call;
* ``accumulate fresh grads``: the same views, new gradient tensors every call (the trainer's
  case: autograd makes a new ``.grad`` per micro-batch); making them is not timed;
* ``finalize repeated``: the buffer's views, with clipping (the trainer's case);
* ``accumulate fresh grads, beyond the add`` (torch path, no stubs): the call's time minus the
  add it runs (``reference.accumulate_`` on the same lists), quantile by quantile.

``floor`` is the time to touch each tensor once from Python (``tuple(map(id, tensors))``): a
measure of this machine's speed, and of what any per-tensor Python costs here.

    python benchmarks/bench_host.py --json benchmarks/results/host-cpu.json
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from autoaccum import kernels  # noqa: E402
from autoaccum.kernels import accumulate as tri_acc  # noqa: E402
from autoaccum.kernels import finalize as tri_fin  # noqa: E402

COUNTS = (10, 100, 1000, 2000)
ROOT = Path(__file__).resolve().parents[1]


class _NoLaunch:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](*args, **meta)`` does nothing."""
    calls = 0

    def __getitem__(self, grid):
        def launch(*args, **meta):
            _NoLaunch.calls += 1
        return launch


class _NoExtension:
    """Stands in for the CUDA extension module: same functions, no launches. ``accumulate_lists``
    (which checks the pairs in C++) runs the host-built binding's, whose launchers are no-ops."""
    calls = 0
    binding = None

    def accumulate(self, acc_ptrs, grad_ptrs, numels, grad_dtype, weight, assign, stream):
        _NoExtension.calls += 1

    def accumulate_lists(self, accs, grads, acc_numels, weight, assign, stream):
        _NoExtension.calls += 1
        return self.binding.accumulate_lists(accs, grads, acc_numels, weight, assign, stream)

    def finalize(self, ptrs, numels, codes, inv_scale, max_norm, apply, result, stream):
        _NoExtension.calls += 1


HOST_SOURCES = (ROOT / "csrc" / "bindings.cpp", ROOT / "tests" / "csrc" / "host_launchers.cpp")
STALE_LOCK_S = 300   # torch's build lock left by a killed build: every later build would wait forever


def host_binding(build_dir: Path | None = None, compute: bool = False):
    """``csrc/bindings.cpp`` built for this machine's CPU with no-op launchers (``compute``: with an
    accumulate launcher that does the work on host memory, for the tests), also on a GPU machine,
    where its checks take CUDA tensors as they come and nothing is launched; or the reason it could
    not be built (no compiler, no ninja, a build error). The build folder and module name carry a
    hash of the sources, torch and Python, so checkouts and versions never share a half-built module."""
    try:
        from torch.utils.cpp_extension import load
        digest = hashlib.sha256()
        for part in [*(p.read_bytes() for p in HOST_SOURCES), (ROOT / "csrc" / "launchers.h").read_bytes(),
                     torch.__version__.encode(), sys.version.encode(), str(compute).encode()]:
            digest.update(part)
        tag = digest.hexdigest()[:12]
        build_dir = build_dir or Path.home() / ".cache" / "autoaccum" / f"host_binding_{tag}"
        build_dir.mkdir(parents=True, exist_ok=True)
        lock = build_dir / "lock"
        if lock.exists() and time.time() - lock.stat().st_mtime > STALE_LOCK_S:
            lock.unlink(missing_ok=True)
        return load(name=f"autoaccum_host_binding_{tag}", build_directory=str(build_dir),
                    extra_include_paths=[str(ROOT / "csrc")], sources=[str(p) for p in HOST_SOURCES],
                    extra_cflags=["-O2", *(["-DAUTOACCUM_HOST_ACCUMULATE"] if compute else [])], verbose=False)
    except Exception as e:  # noqa: BLE001 - any failure means: measure without it, and say so
        return f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"


def stub_launches() -> None:
    for name in ("_accumulate_kernel",):
        setattr(tri_acc, name, _NoLaunch())
    for name in ("_partials_kernel", "_combine_kernel", "_scale_kernel"):
        setattr(tri_fin, name, _NoLaunch())
    kernels._cuda = lambda device: contextlib.nullcontext((_NoExtension(), 0))
    kernels.cuda_ext.available = lambda: True


def buffer_views(count: int, device: str) -> list[torch.Tensor]:
    """``count`` views of one flat fp32 buffer, of varied small sizes (the no-op launch ignores size)."""
    sizes = [64 + (i * 37) % 200 for i in range(count)]
    flat = torch.zeros(sum(sizes), device=device)
    return list(torch.split(flat, sizes))


def per_call_us(fn, calls: int, prepare=None) -> list[float]:
    """Microseconds per call, one sample per call; ``prepare`` runs untimed before each."""
    out = []
    for _ in range(calls):
        arg = prepare() if prepare else None
        start = time.perf_counter()
        fn(arg)
        out.append((time.perf_counter() - start) * 1e6)
    return out


def summary(samples: list[float]) -> dict:
    q = statistics.quantiles(samples, n=10)
    return {"median_us": statistics.median(samples), "p10_us": q[0], "p90_us": q[-1]}


def measure(count: int, backend: str, device: str, calls: int, binding=None) -> list[dict]:
    """``binding``: the host-built binding, whose ``same_tensors`` and ``accumulate_lists`` the ``cuda``
    rows use (None: the Python checks)."""
    kernels.forget()
    kernels.cuda_ext._module = binding if backend == "cuda" else None
    _NoExtension.binding = binding
    views = buffer_views(count, device)
    grads = [torch.randn(v.shape, device=device).bfloat16() for v in views]
    rows = []

    def row(case, samples):
        rows.append({"case": case, "backend": backend, "tensors": count, **summary(samples)})

    def acc(g):
        kernels.accumulate_(views, g if g is not None else grads, 0.5, backend=backend)

    for _ in range(3):
        acc(None)                                   # second sighting caches the facts
    row("accumulate repeated", per_call_us(acc, calls))
    row("accumulate fresh grads", per_call_us(acc, calls, prepare=lambda: [torch.empty_like(g) for g in grads]))

    def fin(_):
        kernels.finalize_(views, 1.0, 1.0, backend=backend)

    for _ in range(3):
        fin(None)
    row("finalize repeated", per_call_us(fin, calls))
    ids = per_call_us(lambda _: tuple(map(id, views)), calls)
    rows.append({"case": "floor: tuple(map(id, tensors))", "backend": "-", "tensors": count, **summary(ids)})
    return rows


def measure_torch_path(count: int, device: str, calls: int) -> dict:
    """The torch path (the CPU's) with fresh gradients: what ``accumulate_`` adds to the add itself
    (``reference.accumulate_``, timed alone on the same lists). No extension: a CPU install has none."""
    kernels.forget()
    kernels.cuda_ext._module = None
    views = buffer_views(count, device)
    grads = [torch.randn(v.shape, device=device).bfloat16() for v in views]
    fresh = lambda: [torch.empty_like(g).copy_(g) for g in grads]  # noqa: E731
    for _ in range(3):
        kernels.accumulate_(list(views), fresh(), 0.5, backend="torch")
    total = per_call_us(lambda g: kernels.accumulate_(list(views), g, 0.5, backend="torch"), calls, prepare=fresh)
    add = per_call_us(lambda g: kernels.reference.accumulate_(views, g, 0.5, False), calls, prepare=fresh)
    over = [t - a for t, a in zip(sorted(total), sorted(add))]
    return {"case": "accumulate fresh grads, beyond the add", "backend": "torch", "tensors": count, **summary(over)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--counts", type=int, nargs="+", default=list(COUNTS))
    ap.add_argument("--json", type=Path)
    ap.add_argument("--no-binding", action="store_true", help="the cuda rows without the host-built binding")
    args = ap.parse_args()
    binding = None if args.no_binding else host_binding()
    if isinstance(binding, str):
        print(f"(the host binding did not build: {binding}; the cuda rows use the Python cache check)")
        binding = None
    stub_launches()
    torch.set_num_threads(1)
    rows = []
    print(f"{'case':40} {'backend':8} {'tensors':>7} {'median µs':>10} {'p10':>8} {'p90':>8}")

    def keep(r: dict) -> None:
        rows.append(r)
        print(f"{r['case']:40} {r['backend']:8} {r['tensors']:7d} {r['median_us']:10.1f} "
              f"{r['p10_us']:8.1f} {r['p90_us']:8.1f}")

    for count in args.counts:
        for backend in ("triton", "cuda"):
            for r in measure(count, backend, args.device, args.calls, binding):
                if not (r["backend"] == "-" and backend == "cuda"):
                    keep(r)
        keep(measure_torch_path(count, args.device, args.calls))
    assert _NoLaunch.calls and _NoExtension.calls, "the stubs were never called: the benchmark measured nothing"
    if args.json:
        meta = {"date": datetime.date.today().isoformat(), "machine": platform.processor() or platform.machine(),
                "python": platform.python_version(), "torch": torch.__version__, "device": args.device,
                "cache_check_in_cuda_rows": "C++ (host-built binding)" if binding else "Python",
                "command": " ".join(sys.argv)}
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
