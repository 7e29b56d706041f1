"""Probe benchmark: trials, seconds and the size found, against the anchors' searches and the exact maximum.

For each model, in one process on one device:
  autoaccum      autoaccum.probe (memory model + confirmation)
  lightning      doubling from 2, then bisection (Lightning's BatchSizeFinder, 'binsearch')
  accelerate     start at 128, x0.9 after every OOM (Accelerate's find_executable_batch_size)
  exact          full bisection to one sample: the reference maximum
Every strategy runs the same real trial (forward + backward + AdamW step, gradients allocated).
On CUDA the card is shrunk with torch.cuda.set_per_process_memory_fraction, so failures are real
OOMs; on the CPU a trial fails when the tracked peak exceeds --memory-budget.

    python benchmarks/bench_probe.py --device cuda --fraction 0.25 --json benchmarks/results/probe-h100.json
    python benchmarks/bench_probe.py --device cpu --memory-budget 96MiB
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import autoaccum  # noqa: E402
from autoaccum.demo import TinyGPT, lm_loss, make_batch  # noqa: E402
from autoaccum.memory import parse_bytes, read_device  # noqa: E402
from autoaccum.probe import StateGuard, TrialRunner, _CudaMeter, _persistent_tensors, _TrackerMeter, sample_factory  # noqa: E402
from autoaccum.tracker import LiveBytes, storage_bytes  # noqa: E402
from strategies import backoff, doubling_then_bisect, exact_bisect  # noqa: E402


def models(scale: int):
    def mlp():
        width = 1024 * scale
        m = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, width), nn.GELU(),
                          nn.Linear(width, 256))
        return m, (torch.randn(4, width), torch.randn(4, 256)), lambda m, b: F.mse_loss(m(b[0]), b[1])

    def transformer():
        m = TinyGPT(dim=128 * scale, layers=4, heads=4, max_len=48 * scale)
        return m, make_batch(4, seq_len=48 * scale), lm_loss

    def convnet():
        m = nn.Sequential(nn.Conv2d(3, 32 * scale, 3, padding=1), nn.BatchNorm2d(32 * scale), nn.ReLU(),
                          nn.Conv2d(32 * scale, 64 * scale, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(64 * scale, 64 * scale, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(64 * scale, 10))
        x = (torch.randn(4, 3, 32 * scale, 32 * scale), torch.randint(0, 10, (4,)))
        return m, x, lambda m, b: F.cross_entropy(m(b[0]), b[1])

    return {"mlp": mlp, "transformer": transformer, "convnet": convnet}


def run_model(name, build, device, budget, cap):
    torch.manual_seed(0)
    model, sample, loss_fn = build()
    model = model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    started = time.perf_counter()
    result = autoaccum.probe(model, sample, optimizer=opt, loss_fn=loss_fn, device=device, memory_budget=budget,
                             cache=False, max_micro_batch=cap)
    ours = {"found": result.max_micro_batch, "trials": len(result.trials),
            "ooms": sum(t.oom for t in result.trials), "seconds": time.perf_counter() - started,
            "sizes": [t.micro_batch for t in result.trials]}
    limit = result.limit_bytes

    guard = StateGuard(model, opt)
    make, _ = sample_factory(sample)
    if device.type == "cuda":
        meter, tracker = _CudaMeter(device), None
    else:
        tracker = LiveBytes(baseline=storage_bytes(_persistent_tensors(model, opt)))
        meter = _TrackerMeter(tracker)
    runner = TrialRunner(model, opt, make, loss_fn, None, device, meter)

    def fits(n):
        t = runner(n)
        return not t.oom and t.peak_bytes <= limit

    rows = {"autoaccum": ours}
    try:
        if tracker is not None:
            tracker.__enter__()
        for label, strategy in (("lightning", lambda: doubling_then_bisect(fits, cap=cap)),
                                ("accelerate", lambda: backoff(fits, start=128)),
                                ("exact", lambda: exact_bisect(fits, cap=cap))):
            t0 = time.perf_counter()
            found, tried = strategy()
            rows[label] = {"found": found, "trials": len(tried), "seconds": time.perf_counter() - t0,
                           "sizes": tried}
    finally:
        if tracker is not None:
            tracker.__exit__(None, None, None)
        guard.restore()
    exact = rows["exact"]["found"]
    for r in rows.values():
        r["of_exact"] = r["found"] / exact if exact else None
    return {"model": name, "limit_bytes": limit, "headroom_bytes": result.headroom_bytes,
            "params": sum(p.numel() for p in model.parameters()), "strategies": rows,
            "probe": result.to_dict()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--fraction", type=float, default=None, help="CUDA: set_per_process_memory_fraction")
    ap.add_argument("--memory-budget", default=None, help="cap for every strategy (default on CPU: 96MiB)")
    ap.add_argument("--scale", type=int, default=None, help="model width multiplier (default 1 on CPU, 4 on CUDA)")
    ap.add_argument("--cap", type=int, default=1 << 14, help="largest micro-batch considered")
    ap.add_argument("--models", default="mlp,transformer,convnet")
    ap.add_argument("--json", help="write results here")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if args.fraction is not None:
        torch.cuda.set_per_process_memory_fraction(args.fraction, device)
    budget = args.memory_budget or ("96MiB" if device.type == "cpu" else None)
    scale = args.scale or (4 if device.type == "cuda" else 1)
    reading = read_device(device)
    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "device": reading.name, "torch": torch.__version__, "python": platform.python_version(),
           "fraction": args.fraction, "memory_budget": budget and parse_bytes(budget), "scale": scale,
           "driver": reading.sources.get("nvml", {}).get("driver")}
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    results = []
    builds = models(scale)
    for name in args.models.split(","):
        results.append(run_model(name, builds[name], device, budget, args.cap))
    print(f"\nprobe benchmark on {env['device']} (torch {env['torch']}), limit per model below")
    print(f"{'model':<12}{'strategy':<12}{'found':>7}{'% exact':>9}{'trials':>8}{'seconds':>9}")
    for r in results:
        for label, row in r["strategies"].items():
            pct = f"{100 * row['of_exact']:.1f}" if row["of_exact"] is not None else "-"
            print(f"{r['model']:<12}{label:<12}{row['found']:>7}{pct:>9}{row['trials']:>8}{row['seconds']:>9.2f}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"env": env, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
