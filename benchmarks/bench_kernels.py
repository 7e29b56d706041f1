"""Kernel benchmark: accumulate and finalize against PyTorch's paths, as a share of copy bandwidth.

Every row states the bytes it must move per element; achieved GB/s = bytes / median time, and
"% copy" compares that with a device-to-device copy measured in the same run (the floor is
bytes / copy bandwidth). Times: triton.testing.do_bench, median, L2 flushed between runs.

Cases: one tensor of 1M..1B elements, and 1,000+ tensors with the parameter shapes of a deep
GPT-2 (d=768, 84 blocks). Baselines in the same run:
  accumulate  per-parameter Python loop (acc.add_(g, alpha=w)), torch._foreach_add_,
              DeepSpeed-style g.to(float32) then add_
  finalize    GradScaler's unscale (_amp_foreach_non_finite_check_and_unscale_) + clip_grad_norm_
              (get_total_norm + clip_grads_with_norm_, foreach=True)
Goals (issue 4): >= 90% of copy bandwidth at >= 100M elements; many small tensors within 20% of
one large tensor; finalize >= 4x PyTorch's path.

    python benchmarks/bench_kernels.py --json benchmarks/results/kernels-h100.json
    python benchmarks/bench_kernels.py --dry-run        # tiny sizes on the CPU: checks the script
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from autoaccum import kernels  # noqa: E402
from autoaccum.kernels import cuda_ext  # noqa: E402
from autoaccum.memory import read_nvml  # noqa: E402


def gpt2_shapes(layers: int = 84, d: int = 768, vocab: int = 50257, ctx: int = 1024) -> list[tuple[int, ...]]:
    shapes: list[tuple[int, ...]] = [(vocab, d), (ctx, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    return shapes + [(d,), (d,)]


def make_timer(device: torch.device, dry: bool):
    if not dry:
        from triton.testing import do_bench

        def time_ms(fn):
            return do_bench(fn, warmup=25, rep=100, return_mode="median")
        return time_ms

    def time_ms(fn):  # the CPU stand-in used by --dry-run: only checks that everything runs
        runs = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            runs.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(runs)
    return time_ms


def copy_bandwidth(device, time_ms, numel: int) -> float:
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src))
    return 2 * src.numel() * 4 / ms / 1e6   # GB/s, bytes read + written


def tensors_for(case: str, numel: int | None, device, dtype, scale: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator(device=device).manual_seed(0)
    if case == "one":
        shapes = [(numel,)]
    else:
        shapes = gpt2_shapes(layers=84 // scale)
        if scale > 1:
            shapes = [tuple(max(1, s // scale) for s in shape) for shape in shapes]
    return [(torch.randn(s, device=device, generator=gen) * 0.01 + 0.001).to(dtype) for s in shapes]


def accumulate_rows(case, numel, device, time_ms, copy_gbs, fast_backends, scale):
    rows = []
    for grad_dtype, assign in [(torch.bfloat16, True), (torch.bfloat16, False), (torch.float32, False)]:
        rows += accumulate_case(grad_dtype, assign, case, numel, device, time_ms, copy_gbs, fast_backends, scale)
    return rows


def accumulate_case(grad_dtype, assign, case, numel, device, time_ms, copy_gbs, fast_backends, scale):
    """One dtype/mode; its tensors die on return, before the next case allocates."""
    grads = tensors_for(case, numel, device, grad_dtype, scale)
    accs = [torch.randn(g.shape, device=device) for g in grads]
    n = sum(g.numel() for g in grads)
    nbytes = n * (grad_dtype.itemsize + (4 if assign else 8))
    label = f"accumulate {'assign' if assign else 'add'} {str(grad_dtype).replace('torch.', '')}"
    variants = {f"autoaccum[{b}]": (lambda b=b: kernels.accumulate_(accs, grads, 0.37, assign=assign, backend=b))
                for b in fast_backends}
    if assign:
        variants["python loop"] = lambda: [a.copy_(g).mul_(0.37) for a, g in zip(accs, grads)]
        variants["torch._foreach"] = lambda: (torch._foreach_copy_(accs, grads), torch._foreach_mul_(accs, 0.37))
    else:
        variants["python loop"] = lambda: [a.add_(g, alpha=0.37) for a, g in zip(accs, grads)]
        variants["torch._foreach"] = lambda: torch._foreach_add_(accs, grads, alpha=0.37)
        variants["deepspeed-style"] = lambda: [a.add_(g.to(torch.float32), alpha=0.37) for a, g in zip(accs, grads)]
    return measure(label, case, n, nbytes, variants, time_ms, copy_gbs)


def finalize_rows(case, numel, device, time_ms, copy_gbs, fast_backends, scale):
    grads = tensors_for(case, numel, device, torch.float32, scale)
    n = sum(g.numel() for g in grads)
    inv = 1.0 + 2.0 ** -20          # != 1, so every variant really writes; values barely move over reps
    inv_t = torch.tensor(inv, device=device)
    found = torch.zeros((), device=device)

    def pytorch_path():
        torch._amp_foreach_non_finite_check_and_unscale_(grads, found, inv_t)      # GradScaler.unscale_
        norm = torch.nn.utils.get_total_norm(grads, 2.0, foreach=True)            # clip_grad_norm_ ...
        coef = torch.clamp(1e9 / (norm + 1e-6), max=1.0)
        torch._foreach_mul_(grads, coef)                                          # ... its multiply

    rows = []
    variants = {f"autoaccum[{b}]": (lambda b=b: kernels.finalize_(grads, inv, 1e9, backend=b)) for b in fast_backends}
    variants["pytorch unscale_+clip"] = pytorch_path
    rows += measure("finalize (norm + scale)", case, n, n * 12, variants, time_ms, copy_gbs, reference_bytes=n * 20)
    folded = {f"autoaccum[{b}]": (lambda b=b: kernels.finalize_(grads, inv, 1e9, apply=False, backend=b))
              for b in fast_backends}
    folded["pytorch unscale_+clip"] = pytorch_path
    rows += measure("finalize folded into fused optimizer (norm only)", case, n, n * 4, folded, time_ms, copy_gbs,
                    reference_bytes=n * 20)
    return rows


def measure(label, case, n, nbytes, variants, time_ms, copy_gbs, reference_bytes=None):
    rows = []
    for name, fn in variants.items():
        fn()  # compile / warm up outside the timing
        ms = time_ms(fn)
        moved = reference_bytes if (reference_bytes and not name.startswith("autoaccum")) else nbytes
        gbs = moved / ms / 1e6
        rows.append({"kernel": label, "case": case, "elements": n, "variant": name, "ms": ms,
                     "bytes_per_element": moved / n, "gb_per_s": gbs, "pct_copy": 100 * gbs / copy_gbs})
    base = next((r for r in rows if r["variant"] in ("pytorch unscale_+clip", "torch._foreach")), None)
    for r in rows:
        r["speedup_vs_pytorch"] = base["ms"] / r["ms"] if base else None
    return rows


def environment(device) -> dict:
    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "cuda_extension": cuda_ext.reason()}
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device.type == "cuda":
        env["driver"] = read_nvml(device.index or 0).get("driver")
    return env


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1e6,1e7,1e8,1e9", help="elements of the one-tensor case")
    ap.add_argument("--json", help="write results here")
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU, to check the script")
    ap.add_argument("--jit-extension", action="store_true", help="JIT-build csrc/ if it is not built")
    args = ap.parse_args(argv)
    dry = args.dry_run
    device = torch.device("cpu" if dry else "cuda")
    if not dry and not torch.cuda.is_available():
        print("bench_kernels: needs a CUDA GPU (use --dry-run to check the script on a CPU)", file=sys.stderr)
        return 2
    time_ms = make_timer(device, dry)
    backends = ["torch"] if dry else ["triton"]
    if not dry and cuda_ext.load(jit=args.jit_extension) is not None:
        backends.insert(0, "cuda")
    sizes = [int(float(s)) for s in args.sizes.split(",")] if not dry else [1000, 5000]
    copy_gbs = copy_bandwidth(device, time_ms, 1 << 28 if not dry else 1 << 16)
    print(f"device-to-device copy: {copy_gbs:,.0f} GB/s (bytes read + written)")
    rows = []
    scale = 64 if dry else 1
    for numel in sizes:
        rows += accumulate_rows("one", numel, device, time_ms, copy_gbs, backends, scale)
        rows += finalize_rows("one", numel, device, time_ms, copy_gbs, backends, scale)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    rows += accumulate_rows("gpt2-shapes", None, device, time_ms, copy_gbs, backends, scale)
    rows += finalize_rows("gpt2-shapes", None, device, time_ms, copy_gbs, backends, scale)

    print(f"\n{'kernel':<50}{'case':<13}{'elements':>12}  {'variant':<24}{'ms':>9}{'B/elt':>7}{'GB/s':>8}"
          f"{'% copy':>8}{'vs torch':>9}")
    for r in rows:
        sp = f"{r['speedup_vs_pytorch']:.2f}x" if r["speedup_vs_pytorch"] else "-"
        print(f"{r['kernel']:<50}{r['case']:<13}{r['elements']:>12,}  {r['variant']:<24}{r['ms']:>9.3f}"
              f"{r['bytes_per_element']:>7.0f}{r['gb_per_s']:>8.0f}{r['pct_copy']:>7.1f}%{sp:>9}")
    goals = summarize_goals(rows, backends[0])
    for line in goals["lines"]:
        print(line)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"env": environment(device), "copy_gb_per_s": copy_gbs, "rows": rows,
                       "goals": goals}, f, indent=2)
    return 0


def summarize_goals(rows, backend) -> dict:
    ours = [r for r in rows if r["variant"] == f"autoaccum[{backend}]"]
    big = [r for r in ours if r["case"] == "one" and r["elements"] >= 100_000_000 and "folded" not in r["kernel"]]
    lines = [f"\ngoals ({backend}):"]
    out = {"lines": lines}
    if big:
        worst = min(r["pct_copy"] for r in big)
        out["min_pct_copy_at_100M"] = worst
        lines.append(f"  >= 90% of copy bandwidth at >= 100M elements: worst {worst:.1f}%")
    for kernel in sorted({r["kernel"] for r in ours if "folded" not in r["kernel"]}):
        many = next((r for r in ours if r["kernel"] == kernel and r["case"] == "gpt2-shapes"), None)
        one = max((r for r in ours if r["kernel"] == kernel and r["case"] == "one"), key=lambda r: r["elements"],
                  default=None)
        if many and one:
            ratio = many["gb_per_s"] / one["gb_per_s"]
            out[f"many_vs_one[{kernel}]"] = ratio
            lines.append(f"  many small tensors vs one large, {kernel}: {100 * ratio:.0f}% of the GB/s")
    for r in ours:
        if r["kernel"].startswith("finalize") and r["case"] == "gpt2-shapes":
            out[f"finalize_speedup[{r['kernel']}]"] = r["speedup_vs_pytorch"]
            lines.append(f"  {r['kernel']} vs PyTorch (gpt2 shapes): {r['speedup_vs_pytorch']:.2f}x")
    return out


if __name__ == "__main__":
    sys.exit(main())
