"""How close autoaccum's fused kernels come to the memory-bandwidth floor, and how they compare with
PyTorch as users call it.

Bytes: each operation has one byte count, the least it must move, used for every variant of it
(ours and PyTorch's alike), so GB/s, "% copy" and "x floor" compare like with like. Per element,
with g the bytes of one gradient element (2 for bf16, 4 for fp32):
  accumulate assign        g + 4    read the gradient, write the fp32 accumulator
  accumulate add           g + 8    ... and read the accumulator as well
  finalize (norm + scale)  3g       one read for the norm and inf check, then one read and one write
                                    to scale: the clip factor needs the whole norm, so two passes
  finalize (norm only)     g        the factor left to a fused optimizer; also max_norm=None with
                                    inv_scale 1, where the factor is exactly 1 and nothing need be
                                    written (our kernels skip that write; clip_grad_norm_ does not)
  finalize + fused AdamW   2g + 24  fp32 only: the norm read, then AdamW reads g and reads and
                                    writes the parameter and both moments
Floor = bytes / the bandwidth of a device-to-device copy moving the same bytes, measured in this run
for each byte count; "% copy" = GB/s / copy GB/s; "x floor" = median time / floor.

Device time: triton.testing.do_bench (L2 flushed before each run), median and p10-p90 of its
samples. Host time: wall time of 10 calls (3 on --dry-run) issued without synchronizing, per call:
what Python and the launches cost the CPU (it climbs to the device time where the device is the
slower one). After timing, every variant runs once more on fresh inputs against a float64
reference (AdamW rows: the first moment, i.e. the gradient the optimizer was given).

PyTorch as users call it. accumulate: a per-parameter a.add_(g, alpha=w) loop; torch._foreach_add_
(bf16 gradients into fp32 accumulators: PyTorch takes the mixed lists but runs them tensor by
tensor); for bf16, DeepSpeed-style g.to(float32) then add_; assign: copy_ then mul_. finalize: a real
GradScaler's unscale_(optimizer) then clip_grad_norm_(foreach=True); norm only: get_total_norm;
with AdamW: scaler.step(fused AdamW), which folds the unscale but cannot clip, and unscale_ + clip +
step, against finalize_(apply=False) + the same fused AdamW given grad_scale and found_inf.
max_norm is set above the norm: a clip that bites leaves the factor at exactly 1 from the second
call on, and the write our kernels then skip would be timed as free.

Cases: equal tensors, 1M to 1B elements in all x 1 to 2,000 tensors (the default backend against
the foreach / unscale_+clip baseline), and every variant at one tensor of 100M elements and at the
1,012 parameter shapes of an 84-block GPT-2. Targets: >= 90% of copy bandwidth at >= 100M elements;
1,000 tensors within 20% of one tensor's GB/s; finalize >= 4x unscale_+clip; host time <= 50 us
per call at 1,000 tensors.

    python benchmarks/bench_kernels.py --json benchmarks/results/kernels-h100.json   # a few minutes
    python benchmarks/bench_kernels.py --dry-run    # tiny sizes on the CPU, seconds: checks the script
With --json, each row is also appended to PATH.jsonl as it is measured.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import statistics
import sys
import time
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from autoaccum import kernels  # noqa: E402
from autoaccum.kernels import cuda_ext  # noqa: E402
from autoaccum.kernels.reference import CLIP_EPS  # noqa: E402
from autoaccum.memory import read_nvml  # noqa: E402

WEIGHT = 0.37                  # a micro-batch's share of the items
LOSS_SCALE = 1 - 2.0 ** -20    # so inv_scale = 1 + 2^-20: every variant writes, values barely drift over runs
BETA1 = 0.9
FULL_AT = 100_000_000          # every variant runs at one tensor of this size (and at the GPT-2 shapes)
ACC_TOL = 1e-6                 # fp32 accumulators: one or two roundings
TOL = {torch.float32: 1e-4, torch.bfloat16: 8e-3}   # norms and scaled gradients; bf16: PyTorch's norm is bf16
CHECK_CHUNK = 1 << 25          # float64 copies of 1B elements would not fit
BASELINE = {"accumulate assign": ("torch._foreach",), "accumulate add": ("torch._foreach",),   # bf16 finalize:
            "finalize (norm + scale)": ("pytorch unscale_+clip", "pytorch clip (bf16: no scaler)"),   # no scaler
            "finalize (norm only)": ("torch get_total_norm",),
            "finalize + fused AdamW": ("pytorch unscale_+clip+step", "pytorch clip+step")}


def op_bytes(op: str, g: int) -> int:
    """The least bytes per element ``op`` must move (see the module docstring)."""
    return {"accumulate assign": g + 4, "accumulate add": g + 8, "finalize (norm + scale)": 3 * g,
            "finalize (norm only)": g, "finalize + fused AdamW": 2 * g + 24}[op]


def gpt2_shapes(layers: int = 84, d: int = 768, vocab: int = 50257, ctx: int = 1024) -> list[tuple[int, ...]]:
    shapes: list[tuple[int, ...]] = [(vocab, d), (ctx, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    return shapes + [(d,), (d,)]


def split_shapes(total: int, count: int) -> list[tuple[int]]:
    """``count`` tensors of (nearly) equal size summing to exactly ``total``."""
    return [(total // count + (i < total % count),) for i in range(count)]


def rate(nbytes: float, ms: float) -> float | None:
    return nbytes / ms / 1e6 if ms > 0 else None   # GB/s; nothing from a zero time


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def norm64(tensors: list[torch.Tensor]) -> float:
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t, dtype=torch.float64)
                                                       for t in tensors])))


def rel_err(outs: list[torch.Tensor], expect) -> float:
    """max |out - ref| / magnitude; ``expect(i, lo, hi)`` gives the float64 reference and magnitude
    of tensor i's elements lo:hi."""
    worst = torch.zeros((), dtype=torch.float64, device=outs[0].device)
    for i, out in enumerate(outs):
        flat = out.reshape(-1)
        for lo in range(0, flat.numel(), CHECK_CHUNK):
            ref, mag = expect(i, lo, lo + CHECK_CHUNK)
            diff = (flat[lo:lo + CHECK_CHUNK].double() - ref).abs()
            worst = torch.maximum(worst, (diff / mag.clamp_min(1e-30)).max())
    return float(worst)


class Bench:
    def __init__(self, device: torch.device, backends: list[str], stream):
        self.device, self.backends, self.stream = device, backends, stream
        self.dry = device.type == "cpu"
        self.host_calls = 3 if self.dry else 10
        self.copies: dict[int, float | None] = {}
        self.rows: list[dict] = []

    def sync(self):
        if not self.dry:
            torch.cuda.synchronize(self.device)

    def samples_ms(self, fn) -> list[float]:
        if not self.dry:
            from triton.testing import do_bench
            return do_bench(fn, warmup=25, rep=100, return_mode="all")
        out = []
        for _ in range(5):   # the CPU stand-in of --dry-run: it shows that the script runs, nothing more
            t0 = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t0) * 1e3)
        return out

    def host_us(self, fn) -> float:
        """Host time per call: calls issued back to back, the device left to catch up afterwards."""
        self.sync()
        t0 = time.perf_counter()
        for _ in range(self.host_calls):
            fn()
        elapsed = time.perf_counter() - t0
        self.sync()
        return elapsed / self.host_calls * 1e6

    def copy_gbs(self, nbytes: int) -> float | None:
        """GB/s of a copy that moves ``nbytes`` (half read, half written), once per byte count."""
        if nbytes not in self.copies:
            src = torch.ones(max(1, nbytes // 8), device=self.device)
            dst = torch.empty_like(src)
            self.copies[nbytes] = rate(8 * src.numel(), statistics.median(self.samples_ms(lambda: dst.copy_(src))))
        return self.copies[nbytes]

    def tensors(self, shapes, dtype, seed: int) -> list[torch.Tensor]:
        """Gradient-like values, each tensor its own allocation as autograd makes them."""
        sizes = [math.prod(s) for s in shapes]
        gen = torch.Generator(device=self.device).manual_seed(seed)
        flat = torch.randn(sum(sizes), device=self.device, generator=gen).mul_(0.01).add_(0.001).to(dtype)
        return [t.view(s).clone() for t, s in zip(flat.split(sizes), shapes)]

    def measure(self, case, shapes, op, dtype, make_variants, keep=None):
        """Time every variant of one operation, check it on fresh inputs, record the rows."""
        n = sum(math.prod(s) for s in shapes)
        nbytes = n * op_bytes(op, dtype.itemsize)
        copy = self.copy_gbs(nbytes)           # before the operation's tensors exist: one peak, not two
        rows = []
        for name, setup in make_variants().items():
            if keep and name not in keep:
                continue
            fn = setup()[0]
            fn()                               # compile and warm up outside the timing
            ms = sorted(self.samples_ms(fn))
            host = self.host_us(fn)
            del fn
            fn, check = setup()
            result = check(fn())
            del fn, check
            med = statistics.median(ms)
            deciles = statistics.quantiles(ms, n=10, method="inclusive") if len(ms) > 1 else [med] * 9
            p10, p90 = deciles[0], deciles[-1]
            gbs = rate(nbytes, med)
            floor_us = ratio(nbytes / 1e3, copy)
            dt = str(dtype).removeprefix("torch.")
            rows.append({"case": case, "kernel": f"{op} {dt}" if op.startswith("accumulate") else op, "op": op,
                         "dtype": dt, "elements": n, "tensors": len(shapes), "variant": name, "bytes": nbytes,
                         "bytes_per_element": nbytes / n, "median_us": med * 1e3, "p10_us": p10 * 1e3,
                         "p90_us": p90 * 1e3, "samples": len(ms), "host_us_per_call": host, "gb_per_s": gbs,
                         "copy_gb_per_s": copy, "pct_copy": None if gbs is None else ratio(100 * gbs, copy),
                         "floor_us": floor_us, "x_floor": ratio(med * 1e3, floor_us), **result})
        base = next((r for r in rows if r["variant"] in BASELINE[op]), None)
        for r in rows:
            r["baseline"] = base["variant"] if base else None
            r["speedup_vs_pytorch"] = ratio(base["median_us"], r["median_us"]) if base else None
            self.record(r)

    def record(self, r: dict):
        self.rows.append(r)
        if self.stream:
            self.stream.write(json.dumps(r) + "\n")
            self.stream.flush()
        err = max(r["max_rel_err"], r["norm_rel_err"] or 0.0)
        print(table_line([r["op"], SHORT[r["dtype"]], f"{r['elements']:,}", r["tensors"], r["variant"],
                          f"{r['median_us']:.1f}", f"{r['p10_us']:.1f}-{r['p90_us']:.1f}",
                          f"{r['host_us_per_call']:.1f}", num(r["gb_per_s"]), num(r["pct_copy"], ".1f"),
                          num(r["x_floor"], ".2f"), num(r["speedup_vs_pytorch"], ".2f", "x"),
                          f"{'yes' if r['correct'] else 'NO'} {err:.1e}"]))


COLUMNS = [("kernel", -23), ("dtype", -5), ("elements", 13), ("tensors", 7), ("variant", -42), ("median us", 10),
           ("p10-p90 us", 19), ("host us", 9), ("GB/s", 7), ("% copy", 6), ("x floor", 7), ("vs PyTorch", 10),
           ("correct, max rel err", -1)]
SHORT = {"bfloat16": "bf16", "float32": "fp32"}


def table_line(cells) -> str:
    return " ".join(f"{c:<{-w}}" if w < 0 else f"{c:>{w}}" for c, (_, w) in zip(cells, COLUMNS))


def num(x: float | None, spec: str | None = None, suffix: str = "") -> str:
    if x is None:
        return "-"
    return format(x, spec or (",.0f" if x >= 100 else ".3g")) + suffix


def accumulate_variants(bench: Bench, shapes, dtype, assign: bool) -> dict:
    grads, acc0, w = bench.tensors(shapes, dtype, 0), bench.tensors(shapes, torch.float32, 1), WEIGHT
    runs = {f"autoaccum[{k}]": (lambda accs, k=k: kernels.accumulate_(accs, grads, w, assign=assign, backend=k))
            for k in bench.backends}
    if assign:
        runs["python loop"] = lambda accs: [a.copy_(g).mul_(w) for a, g in zip(accs, grads)]
        runs["torch._foreach"] = lambda accs: (torch._foreach_copy_(accs, grads), torch._foreach_mul_(accs, w))
    else:
        runs["python loop"] = lambda accs: [a.add_(g, alpha=w) for a, g in zip(accs, grads)]
        runs["torch._foreach"] = lambda accs: torch._foreach_add_(accs, grads, alpha=w)
        if dtype != torch.float32:
            runs["deepspeed-style"] = lambda accs: [a.add_(g.to(torch.float32), alpha=w) for a, g in zip(accs, grads)]

    def expect(i, lo, hi):
        wg = grads[i].reshape(-1)[lo:hi].double() * w
        if assign:
            return wg, wg.abs()
        a = acc0[i].reshape(-1)[lo:hi].double()
        return a + wg, a.abs() + wg.abs()

    def setup(run):
        accs = [a.clone() for a in acc0]

        def check(_):
            err = rel_err(accs, expect)
            return {"max_rel_err": err, "norm_rel_err": None, "correct": err <= ACC_TOL}
        return (lambda: run(accs)), check
    return {name: partial(setup, run) for name, run in runs.items()}


def finalize_variants(bench: Bench, shapes, dtype, op: str) -> dict:
    grads, dev = bench.tensors(shapes, dtype, 0), bench.device
    # bf16 gradients come from bf16 training, which has no loss scale (GradScaler cannot even
    # unscale them): PyTorch's path is clip_grad_norm_ and step, and ours runs with inv_scale 1.
    scaled = dtype != torch.bfloat16
    inv = float(torch.tensor(LOSS_SCALE).double().reciprocal().float()) if scaled else 1.0   # as GradScaler computes it
    inv_t = torch.tensor(inv, dtype=torch.float64, device=dev)             # a device tensor, as the Trainer passes it
    one_t = torch.ones((), dtype=torch.float64, device=dev)
    raw = norm64(grads)
    max_norm = 2 * raw * inv                                                # configured, never bites (docstring)
    factor = inv * min(1.0, max_norm / (raw * inv + CLIP_EPS))
    adam = op == "finalize + fused AdamW"

    def work():
        gs = [g.clone() for g in grads]
        params = [torch.nn.Parameter(torch.zeros_like(g)) for g in gs]
        for p, g in zip(params, gs):
            p.grad = g
        opt = (torch.optim.AdamW(params, lr=1e-6, betas=(BETA1, 0.999), fused=True) if adam
               else torch.optim.SGD(params, lr=0.0))
        scaler = torch.amp.GradScaler(dev.type, init_scale=LOSS_SCALE, growth_interval=1 << 30)
        scaler.scale(one_t)                                                 # creates its scale tensor
        return SimpleNamespace(gs=gs, params=params, opt=opt, scaler=scaler)

    def unscale_clip(w, step=False):
        if scaled:
            w.scaler._per_optimizer_states.clear()   # what update() resets (minus its scale kernel): unscale_ runs once
            w.scaler.unscale_(w.opt)
        norm = torch.nn.utils.clip_grad_norm_(w.params, max_norm, foreach=True)
        if step:
            w.scaler.step(w.opt) if scaled else w.opt.step()
        return norm

    def scaler_step(w):
        if scaled:
            w.scaler._per_optimizer_states.clear()
            w.scaler.step(w.opt)
        else:
            w.opt.step()

    def folded(w, k):
        norm, found = kernels.finalize_(w.gs, inv_t, max_norm, apply=False, backend=k)
        w.opt.grad_scale = kernels.clip_scale(norm, inv_t, max_norm).reciprocal().float()   # as the Trainer folds it
        w.opt.found_inf = found
        w.opt.step()
        del w.opt.grad_scale, w.opt.found_inf
        return norm

    specs = {}   # name -> (run(work), factor the outputs must show, reference norm)
    for k in bench.backends:
        if op == "finalize (norm + scale)":
            specs[f"autoaccum[{k}]"] = (lambda w, k=k: kernels.finalize_(w.gs, inv_t, max_norm, backend=k)[0],
                                        factor, raw * inv)
        elif op == "finalize (norm only)":
            specs[f"autoaccum[{k}]"] = (lambda w, k=k: kernels.finalize_(w.gs, inv_t, max_norm, apply=False,
                                                                         backend=k)[0], 1.0, raw * inv)
            specs[f"autoaccum[{k}] no clip, inv_scale 1"] = (
                lambda w, k=k: kernels.finalize_(w.gs, one_t, backend=k)[0], 1.0, raw)
        else:
            specs[f"autoaccum[{k}] + fused AdamW"] = (partial(folded, k=k), factor, raw * inv)
    if op == "finalize (norm + scale)":
        specs["pytorch unscale_+clip" if scaled else "pytorch clip (bf16: no scaler)"] = (unscale_clip, factor, raw * inv)
    elif op == "finalize (norm only)":
        specs["torch get_total_norm"] = (lambda w: torch.nn.utils.get_total_norm(w.gs, 2.0, foreach=True) * inv_t,
                                         1.0, raw * inv)
    else:
        specs["pytorch scaler.step(fused AdamW), no clip" if scaled else "pytorch fused AdamW step, no clip"] = (
            scaler_step, factor if scaled else 1.0, None)
        specs["pytorch unscale_+clip+step" if scaled else "pytorch clip+step"] = (
            partial(unscale_clip, step=True), factor, raw * inv)

    def setup(run, want, norm_ref):
        w = work()
        scale = want * (1 - BETA1) if adam else want     # AdamW's first moment after one step: (1 - beta1) * grad

        def expect(i, lo, hi):
            ref = grads[i].reshape(-1)[lo:hi].double() * scale
            return ref, ref.abs()

        def check(norm):
            err = rel_err([w.opt.state[p]["exp_avg"] for p in w.params] if adam else w.gs, expect)
            norm_err = None if norm_ref is None else abs(float(norm) - norm_ref) / norm_ref
            ok = err <= TOL[dtype] and (norm_err is None or norm_err <= TOL[dtype])
            return {"max_rel_err": err, "norm_rel_err": norm_err, "correct": ok}
        return (lambda: run(w)), check
    return {name: partial(setup, *spec) for name, spec in specs.items()}


def run_case(bench: Bench, case: str, shapes, full: bool):
    """Every variant where ``full``; else the default backend against its baseline, bf16 add and fp32 finalize."""
    ours = f"autoaccum[{bench.backends[0]}]"
    bf16, fp32 = torch.bfloat16, torch.float32
    for dtype in (bf16, fp32):
        for op, assign in (("accumulate assign", True), ("accumulate add", False)):
            if full or (op, dtype) == ("accumulate add", bf16):
                bench.measure(case, shapes, op, dtype, partial(accumulate_variants, bench, shapes, dtype, assign),
                              keep=None if full else {ours, *BASELINE[op]})
    for dtype in (bf16, fp32):
        for op in ("finalize (norm + scale)", "finalize (norm only)"):
            if full or (op, dtype) == ("finalize (norm + scale)", fp32):
                bench.measure(case, shapes, op, dtype, partial(finalize_variants, bench, shapes, dtype, op),
                              keep=None if full else {ours, *BASELINE[op]})
    if full:   # fused AdamW wants the gradient in the parameter's dtype: fp32 here
        op = "finalize + fused AdamW"
        bench.measure(case, shapes, op, fp32, partial(finalize_variants, bench, shapes, fp32, op))


def summarize(rows: list[dict], ours: str, dry: bool, notes: list[str]) -> dict:
    mine = [r for r in rows if r["variant"] == ours]
    goals = []

    def goal(text, rs, measured, met):
        goals.append({"goal": text, "measured": "not judged on the CPU (dry run)" if dry else
                      (measured() if rs else "no rows measured"), "met": None if dry or not rs else met()})

    for family in ("accumulate", "finalize"):
        rs = [r for r in mine if r["op"].startswith(family) and r["tensors"] == 1 and r["elements"] >= 1e8
              and r["pct_copy"] is not None]
        w = min(rs, key=lambda r: r["pct_copy"], default=None)
        goal(f"{family} >= 90% of copy bandwidth at >= 100M elements", rs,
             lambda w=w: f"worst {w['pct_copy']:.1f}% ({w['kernel']}, {w['elements']:,} elements)",
             lambda w=w: w["pct_copy"] >= 90)
    pairs = [(r["gb_per_s"] / one["gb_per_s"], r) for r in mine if r["tensors"] == 1000
             for one in mine if one["tensors"] == 1 and one["kernel"] == r["kernel"]
             and one["elements"] == r["elements"] and r["gb_per_s"] and one["gb_per_s"]]
    worst = min(pairs, key=lambda p: p[0], default=None)
    goal("1,000 tensors within 20% of one tensor's GB/s at the same total", pairs,
         lambda: f"worst {100 * worst[0]:.0f}% ({worst[1]['kernel']}, {worst[1]['elements']:,} elements)",
         lambda: worst[0] >= 0.8)
    rs = [r for r in mine if r["op"] == "finalize (norm + scale)" and r["speedup_vs_pytorch"]]
    slow = min(rs, key=lambda r: r["speedup_vs_pytorch"], default=None)
    gpt2 = ", ".join(f"{r['dtype']} {r['speedup_vs_pytorch']:.2f}x" for r in rs if r["case"] == "gpt2-shapes")
    goal("finalize >= 4x PyTorch's unscale_+clip", rs,
         lambda: f"worst {slow['speedup_vs_pytorch']:.2f}x ({slow['case']}, {slow['dtype']}); "
                 f"GPT-2 shapes: {gpt2 or '-'}",
         lambda: slow["speedup_vs_pytorch"] >= 4)
    rs = [r for r in mine if 1000 <= r["tensors"] < 2000]
    busy = max(rs, key=lambda r: r["host_us_per_call"], default=None)
    goal("host time <= 50 us per call at 1,000 tensors", rs,
         lambda: f"worst {busy['host_us_per_call']:.1f} us ({busy['kernel']}, {busy['case']})",
         lambda: busy["host_us_per_call"] <= 50)
    lines = [f"\ngoals, for {ours} (the default backend):"]
    verdict = {True: "met", False: "MISSED", None: "--"}
    lines += [f"  [{verdict[g['met']]}] {g['goal']}: {g['measured']}" for g in goals]
    lines += [f"  note: {n}" for n in notes]
    return {"backend": ours, "goals": goals, "notes": notes, "lines": lines}


def numbers(text: str | None) -> list[int]:
    return [int(float(x)) for x in text.split(",")] if text else []


def short(n: int) -> str:
    return next((f"{n / unit:g}{name}" for unit, name in ((10 ** 9, "B"), (10 ** 6, "M"), (10 ** 3, "k"))
                 if n >= unit), str(n))


def environment(device: torch.device) -> dict:
    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "command": [sys.executable, *sys.argv], "python": platform.python_version(), "torch": torch.__version__,
           "cuda": torch.version.cuda, "device": "cpu (dry run)", "cuda_extension": cuda_ext.reason()}
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device.type == "cuda":
        nvml = read_nvml(device.index or 0)
        env.update(device=torch.cuda.get_device_name(device), driver=nvml.get("driver"), nvml_error=nvml.get("error"))
    return env


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="autoaccum bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--totals", "--sizes", dest="totals", metavar="N,N,...",
                    help="elements in all per case (default 1e6,1e7,1e8,1e9; dry run 1e4,1e5)")
    ap.add_argument("--counts", metavar="N,N,...", help="tensors each total is split into "
                    "(default 1,10,100,1000,2000; dry run 1,10,100)")
    ap.add_argument("--json", metavar="PATH", help="write the results here (and each row to PATH.jsonl as it goes)")
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU, in seconds: checks the script only")
    ap.add_argument("--jit-extension", action="store_true", help="JIT-build the CUDA extension from csrc/ if not built")
    args = ap.parse_args(argv)
    dry = args.dry_run
    if not dry and not torch.cuda.is_available():
        print("autoaccum bench: needs a CUDA GPU (--dry-run checks the script on the CPU)", file=sys.stderr)
        return 2
    device = torch.device("cpu" if dry else f"cuda:{torch.cuda.current_device()}")
    backends = ["torch"] if dry else (["cuda"] if cuda_ext.load(jit=args.jit_extension) else []) + ["triton"]
    totals = numbers(args.totals) or ([10_000, 100_000] if dry else [10 ** 6, 10 ** 7, 10 ** 8, 10 ** 9])
    counts = numbers(args.counts) or ([1, 10, 100] if dry else [1, 10, 100, 1000, 2000])
    full_at = max((t for t in totals if t <= FULL_AT), default=min(totals))
    cases = [(f"{short(t)} x {c}", split_shapes(t, c), t == full_at and c == 1)
             for t in totals for c in counts if c <= t]
    cases.append(("gpt2-shapes", gpt2_shapes(layers=2, d=48, vocab=500, ctx=64) if dry else gpt2_shapes(), True))

    stream = None
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        stream = open(Path(args.json).with_suffix(".jsonl"), "w")
    bench, notes, t0 = Bench(device, backends, stream), [], time.perf_counter()
    env = environment(device)
    if dry:
        print("DRY RUN on the CPU: tiny sizes, perf_counter timing, the torch backend. These numbers only show "
              "that the script runs; they say nothing about the kernels.")
    print(f"{env['device']}; backends {', '.join(backends)}; floor = bytes / a device-to-device copy moving the same "
          f"bytes, measured at each size in this run; host us: {bench.host_calls} calls unsynchronized, per call\n")
    print(table_line([name for name, _ in COLUMNS]))
    for case, shapes, full in cases:
        n = sum(math.prod(s) for s in shapes)
        if not dry:
            free, need = torch.cuda.mem_get_info(device)[0], (32 if full else 16) * n + (2 << 30)
            if need > free:
                notes.append(f"{case} skipped: {free / 2 ** 30:.1f} GiB free, it needs about {need / 2 ** 30:.1f}")
                print(f"# {notes[-1]}")
                continue
        run_case(bench, case, shapes, full)
        if not dry:
            torch.cuda.empty_cache()
    summary = summarize(bench.rows, f"autoaccum[{backends[0]}]", dry, notes)
    print("\n".join(summary["lines"]))
    print(f"\n{len(bench.rows)} rows in {time.perf_counter() - t0:.1f} s")
    if stream:
        stream.close()
        with open(args.json, "w") as f:
            json.dump({"env": env, "rows": bench.rows, "summary": summary}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
