"""Probe benchmark: is ``autoaccum.probe``'s answer the largest micro-batch that real training fits?

Every answer is judged by the independent ruler in ``ruler.py``, never by the probe's own trials:
the peak memory of the real ``Trainer.step`` in steady state (a dispatch-mode storage census on
the CPU, ``torch.cuda.max_memory_reserved`` on CUDA). Per model, under one budget in bytes:

  autoaccum    ``autoaccum.probe(..., memory_budget=budget)`` on a freshly built model
  lightning    doubling from 2, then bisection (Lightning's BatchSizeFinder, 'binsearch')
  accelerate   start at 128, x0.9 after every failure (Accelerate's find_executable_batch_size)

The two searches call the ruler as their trial, so their answers are right by construction and
their cost is what exactness takes (their seconds are ruler steps: a fresh model and two real
steps each). The reference is ``ruler.true_maximum``; "within" says whether the answer's real
step stays within the budget. The zoo covers a parameter-heavy MLP, a deep linear stack, a GPT on
padded sequences, a BatchNorm convnet, and a model whose memory steps up at a micro-batch size.

    python benchmarks/bench_probe.py --device cpu --json benchmarks/results/probe-cpu.json   # ~3 min, 2 cores
    python benchmarks/bench_probe.py --device cuda --scale 4 --json benchmarks/results/probe-h100.json
    python benchmarks/bench_probe.py --device cuda --fraction 0.25 --scale 4   # one budget: 25% of the card
    python benchmarks/bench_probe.py --quick          # CI dry run, under a minute on the CPU

With --json, each finished model is also appended to PATH.jsonl, so a killed run keeps its results.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import sys
import time
from importlib import metadata
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import autoaccum  # noqa: E402
from autoaccum.demo import TinyGPT, count_tokens, lm_loss, make_batch  # noqa: E402
from autoaccum.checks import parse_bytes  # noqa: E402
from autoaccum.memory import read_device  # noqa: E402
from ruler import Setup, fits, true_maximum  # noqa: E402
from strategies import backoff, doubling_then_bisect  # noqa: E402

MiB = 1 << 20


def adamw(params):
    return torch.optim.AdamW(params, lr=1e-4)


def cross_entropy(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


def seeded(make):
    """``Setup.batch`` must return the same batch on every call: each call gets a fresh, seeded generator."""
    return lambda n: make(n, torch.Generator().manual_seed(1))


def classes(n, g):
    return torch.randint(0, 10, (n,), generator=g)


class SteppedAttention(nn.Module):
    """Self-attention whose kernel depends on the micro-batch, as fused kernels' size limits do:
    fused SDPA up to ``switch`` samples, above it the unfused path, which keeps the (b, h, t, t)
    scores and their softmax for backward. Memory per sample steps up at ``switch``."""

    def __init__(self, heads: int, switch: int, head_dim: int = 32):
        super().__init__()
        self.heads, self.switch, dim = heads, switch, heads * head_dim
        self.qkv, self.proj, self.head = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim), nn.Linear(dim, 10)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if b <= self.switch:
            att = F.scaled_dot_product_attention(q, k, v)
        else:
            att = torch.softmax(q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5, dim=-1) @ v
        return self.head((x + self.proj(att.transpose(1, 2).reshape(b, t, d))).mean(1))


def zoo(s: float):
    """name -> (Setup, probe sample, budget in bytes); widths scale with ``s``, budgets with s**2,
    so true maxima grow about linearly with ``s``."""
    w = lambda n: max(1, round(n * s))  # noqa: E731

    def wide_mlp():
        return nn.Sequential(nn.Linear(128, w(2048)), nn.GELU(), nn.Linear(w(2048), w(2048)), nn.GELU(),
                             nn.Linear(w(2048), 10)), adamw

    def linear_stack():
        layers = [m for _ in range(10) for m in (nn.Linear(w(1024), w(1024)), nn.ReLU())][:-1]
        return nn.Sequential(*layers), adamw

    def convnet_bn():
        c = w(32)
        return nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Conv2d(c, 2 * c, 3, padding=1), nn.BatchNorm2d(2 * c), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * c, 10)), adamw

    heads = max(1, round(4 * s))
    mlp = seeded(lambda n, g: (torch.randn(n, 128, generator=g), classes(n, g)))
    stack = seeded(lambda n, g: (torch.randn(n, w(1024), generator=g), torch.randn(n, w(1024), generator=g)))
    images = seeded(lambda n, g: (torch.randn(n, 3, 16, 16, generator=g), classes(n, g)))
    seqs = seeded(lambda n, g: (torch.randn(n, 64, heads * 32, generator=g), classes(n, g)))
    text = lambda n: make_batch(n, seq_len=48, seed=1)  # noqa: E731
    mse = lambda m, b: F.mse_loss(m(b[0]), b[1])  # noqa: E731
    stack_bytes = sum(p.numel() * p.element_size() for p in linear_stack()[0].parameters())
    return {
        "wide_mlp": (Setup(wide_mlp, mlp, cross_entropy), mlp(8), 140 * MiB * s * s),
        "linear_stack": (Setup(linear_stack, stack, mse), stack(8), 8 * stack_bytes),
        "gpt_padded": (Setup(lambda: (TinyGPT(dim=w(64), layers=2, heads=4, max_len=48), adamw), text, lm_loss,
                             count_fn=count_tokens), make_batch(8, seq_len=48, seed=2), 96 * MiB * s * s),
        "convnet_bn": (Setup(convnet_bn, images, cross_entropy), images(8), 64 * MiB * s * s),
        "stepped": (Setup(lambda: (SteppedAttention(heads, switch=w(300)), adamw), seqs, cross_entropy),
                    seqs(8), 98 * MiB * s * s),
    }


def run_model(name, setup, sample, device, budget, cap):
    """Probe, the two searches, the true maximum, and each answer's real peak, for one model."""
    torch.manual_seed(0)
    model, make_opt = setup.build()
    model = model.to(device)
    t0 = time.perf_counter()
    result = autoaccum.probe(model, sample, optimizer=make_opt(model.parameters()), loss_fn=setup.loss_fn,
                             count_fn=setup.count_fn, memory_budget=budget, cache=False, max_micro_batch=cap)
    rows = {"autoaccum": {"answer": result.max_micro_batch, "trials": len(result.trials),
                          "seconds": time.perf_counter() - t0, "sizes": [t.micro_batch for t in result.trials]}}
    params = sum(p.numel() for p in model.parameters())
    del model
    peaks: dict[int, int | None] = {}

    def ruler_fits(n):
        ok, peaks[n] = fits(setup, n, device, budget)
        return ok

    for label, search in (("lightning", lambda: doubling_then_bisect(ruler_fits, cap=cap)),
                          ("accelerate", lambda: backoff(ruler_fits, start=128))):
        t0 = time.perf_counter()
        answer, tried = search()
        rows[label] = {"answer": answer, "trials": len(tried), "seconds": time.perf_counter() - t0, "sizes": tried}
    t0 = time.perf_counter()
    true, true_peaks = true_maximum(setup, device, budget, cap, hint=result.max_micro_batch)
    true_seconds = time.perf_counter() - t0
    peaks.update(true_peaks)
    for row in rows.values():
        n = row["answer"]
        if n and n not in peaks:
            ruler_fits(n)
        row["peak_bytes"] = peaks.get(n)
        row["within_budget"] = n == 0 or (peaks[n] is not None and peaks[n] <= budget)
        row["of_true"] = n / true if true else None
    return {"model": name, "budget_bytes": budget, "params": params, "cap": cap, "true_max": true,
            "true_seconds": true_seconds, "ruler_peaks": dict(sorted(peaks.items())),
            "strategies": rows, "probe": result.to_dict(), "estimate": estimate_row(setup, sample, peaks, budget)}


def estimate_row(setup, sample, peaks, budget):
    """``autoaccum.estimate`` (fake tensors, nothing allocated) against the ruler's real peaks at the
    smallest, middle and largest sizes the ruler measured, with the GPU-only terms turned off."""
    torch.manual_seed(0)
    model, make_opt = setup.build()
    t0 = time.perf_counter()
    est = autoaccum.estimate(model, sample, optimizer=make_opt(model.parameters()), loss_fn=setup.loss_fn,
                             device_memory=budget, device_kind="cpu")
    seconds = time.perf_counter() - t0
    measured = sorted(n for n, p in peaks.items() if p is not None)
    sizes = sorted({measured[0], measured[len(measured) // 2], measured[-1]})
    points = [{"micro_batch": n, "estimate": est.peak_bytes(n), "real": peaks[n],
               "error": est.peak_bytes(n) / peaks[n] - 1} for n in sizes]
    return {"seconds": seconds, "max_micro_batch": est.max_micro_batch, "points": points,
            "max_abs_error": max(abs(p["error"]) for p in points)}


def environment(device, args):
    reading = read_device(device)
    try:
        triton_version = metadata.version("triton")
    except metadata.PackageNotFoundError:
        triton_version = None
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": reading.name, "torch": torch.__version__, "triton": triton_version,
            "python": platform.python_version(), "driver": reading.sources.get("nvml", {}).get("driver"),
            "command": " ".join([Path(sys.executable).name, *sys.argv]), "total_bytes": reading.total_bytes,
            "fraction": args.fraction, "scale": args.scale, "quick": args.quick}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--fraction", type=float, help="CUDA: set_per_process_memory_fraction; budget = fraction of total")
    ap.add_argument("--memory-budget", help="one budget for every model, e.g. 2GiB (overrides the per-model ones)")
    ap.add_argument("--scale", type=float, default=1.0, help="width multiplier (budgets grow with its square)")
    ap.add_argument("--cap", type=int, default=1 << 14, help="largest micro-batch considered")
    ap.add_argument("--models", default="wide_mlp,linear_stack,gpt_padded,convnet_bn,stepped")
    ap.add_argument("--quick", action="store_true", help="tiny models and budgets: a CI dry run")
    ap.add_argument("--json", help="write results here (and one line per model to PATH.jsonl as it goes)")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    budget = parse_bytes(args.memory_budget) if args.memory_budget else None
    if args.fraction is not None:
        torch.cuda.set_per_process_memory_fraction(args.fraction, device)
        budget = budget or int(args.fraction * read_device(device).total_bytes)
    env = environment(device, args)
    print(f"# {env['date']}  {env['device']}  torch {env['torch']}  triton {env['triton']}  "
          f"python {env['python']}  driver {env['driver']}\n# {env['command']}", flush=True)
    models = zoo(args.scale / 4 if args.quick else args.scale)
    gc.freeze()  # the ruler collects garbage around every step: keep the import-time heap out of it
    stream = None
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        stream = open(Path(args.json).with_suffix(".jsonl"), "w")
    results = []
    for name in args.models.split(","):
        setup, sample, default = models[name]
        results.append(run_model(name, setup, sample, device, budget or int(default), args.cap))
        r = results[-1]
        print(f"{name}: autoaccum {r['strategies']['autoaccum']['answer']}, true maximum {r['true_max']}", flush=True)
        if stream:
            stream.write(json.dumps({"env": env, **r}) + "\n")
            stream.flush()
    print(f"\nprobe benchmark on {env['device']} (torch {env['torch']}); truth: ruler.py's real Trainer.step")
    print(f"{'model':<14}{'strategy':<12}{'budget':>9}{'answer':>8}{'true':>7}{'% true':>8}{'trials':>8}"
          f"{'seconds':>9}  within")
    for r in results:
        for label, row in r["strategies"].items():
            pct = f"{100 * row['of_true']:.1f}" if row["of_true"] is not None else "-"
            print(f"{r['model']:<14}{label:<12}{r['budget_bytes'] / MiB:>8.1f}M{row['answer']:>8}{r['true_max']:>7}"
                  f"{pct:>8}{row['trials']:>8}{row['seconds']:>9.2f}  {'yes' if row['within_budget'] else 'NO'}")
    print("\nestimate (fake tensors; GPU-only terms off) vs the ruler's real peaks")
    for r in results:
        e = r["estimate"]
        pts = ", ".join(f"{p['micro_batch']}: {100 * p['error']:+.1f}%" for p in e["points"])
        print(f"{r['model']:<14}max |error| {100 * e['max_abs_error']:.1f}%  ({pts})")
    if args.json:
        stream.close()
        with open(args.json, "w") as f:
            json.dump({"env": env, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
