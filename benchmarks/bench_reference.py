"""The kernels' torch path (the CPU's, and every non-CUDA device's) against PyTorch as users call it.

``finalize_`` (norm + inf/nan flag in one read, then unscale + clip in one write, none when the
factor is 1) against ``torch.nn.utils.clip_grad_norm_(foreach=True)`` on the same gradients: 200
fp32 tensors of random sizes summing to each total. The two run interleaved in one process, median
of ``--repeat`` runs each; the norm's relative error is measured against a float64 reference.

    python benchmarks/bench_reference.py --json benchmarks/results/reference-cpu.json
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
from autoaccum.kernels import reference  # noqa: E402


def gradients(total: int, count: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    weights = torch.rand(count, generator=g) + 0.05
    sizes = (weights / weights.sum() * total).long().clamp(min=1)
    return [torch.randn(int(n), generator=g) for n in sizes]


def median_seconds(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(total: int, count: int, max_norm: float, repeat: int) -> dict:
    grads = gradients(total, count, seed=total % 9973)
    params = [torch.nn.Parameter(torch.empty_like(g)) for g in grads]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    exact = torch.linalg.vector_norm(torch.cat([g.double() for g in grads])).item()
    ours = reference.finalize_(grads, 1.0, max_norm, False)[0].item()
    theirs = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True).item()
    ours_s, theirs_s = [], []
    for _ in range(2):   # interleaved, so drift in the machine's speed hits both
        ours_s.append(median_seconds(lambda: reference.finalize_(grads, 1.0, max_norm, True), repeat))
        theirs_s.append(median_seconds(lambda: torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True), repeat))
    return {"elements": total, "tensors": count, "max_norm": max_norm, "clips": max_norm < exact,
            "autoaccum_ms": 1e3 * min(ours_s), "pytorch_ms": 1e3 * min(theirs_s),
            "ratio": min(ours_s) / min(theirs_s),
            "autoaccum_norm_rel_error": abs(ours - exact) / exact, "pytorch_norm_rel_error": abs(theirs - exact) / exact}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--totals", default="1e7,1e8")
    ap.add_argument("--tensors", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json")
    args = ap.parse_args()
    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
           "command": " ".join(["python", *sys.argv])}
    print(f"# {env['date']}  torch {env['torch']}  {env['threads']} threads\n# {env['command']}")
    rows = [run(int(float(t)), args.tensors, max_norm, args.repeat)
            for t in args.totals.split(",") for max_norm in (1e-3, 1e9)]
    print(f"{'elements':>11} {'clips':>5} {'autoaccum ms':>13} {'clip_grad_norm_ ms':>19} {'ratio':>6} "
          f"{'norm error':>11} {'torch error':>11}")
    for r in rows:
        print(f"{r['elements']:>11} {'yes' if r['clips'] else 'no':>5} {r['autoaccum_ms']:>13.2f} "
              f"{r['pytorch_ms']:>19.2f} {r['ratio']:>6.2f} {r['autoaccum_norm_rel_error']:>11.1e} "
              f"{r['pytorch_norm_rel_error']:>11.1e}")
    if args.json:
        Path(args.json).write_text(json.dumps({"env": env, "results": rows}, indent=2))


if __name__ == "__main__":
    main()
