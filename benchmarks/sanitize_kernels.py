"""Drive every GPU kernel once on odd sizes, for compute-sanitizer (memcheck, racecheck).

    compute-sanitizer --tool memcheck python benchmarks/sanitize_kernels.py [--backend cuda|triton]
Exits non-zero if a result is wrong, so a clean run means clean memory *and* correct output.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from autoaccum import kernels  # noqa: E402
from autoaccum.kernels import cuda_ext  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", default="triton", choices=["triton", "cuda"])
    args = ap.parse_args()
    if args.backend == "cuda" and cuda_ext.load(jit=True) is None:
        print(f"CUDA extension unavailable: {cuda_ext.reason()}", file=sys.stderr)
        return 2
    gen = torch.Generator(device="cuda").manual_seed(0)
    sizes = [1, 3, 127, 16383, 16385, (1 << 20) + 3] + [int(x) for x in torch.randint(1, 70000, (150,))]
    bad = 0
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        grads = [torch.randn(n, device="cuda", generator=gen).to(dtype) for n in sizes]
        for assign in (True, False):
            accs = [torch.full((n,), float("nan") if assign else 0.5, device="cuda") for n in sizes]
            kernels.accumulate_(accs, grads, 0.25, assign=assign, backend=args.backend)
            for a, g in zip(accs, grads):
                want = 0.25 * g.double() + (0 if assign else 0.5)
                bad += int(not torch.allclose(a.double(), want, rtol=1e-6, atol=1e-6))
        before = [g.clone() for g in grads]
        norm, found = kernels.finalize_(grads, 0.5, 1.0, backend=args.backend)
        want = torch.cat([b.double().flatten() for b in before]).norm().item() * 0.5
        bad += int(abs(norm.item() - want) > 2e-6 * want or found.item() != 0)
        grads[2][5] = float("nan")
        _, found = kernels.finalize_(grads, 0.5, 1.0, backend=args.backend)
        bad += int(found.item() != 1)
    torch.cuda.synchronize()
    print(f"sanitize_kernels[{args.backend}]: {bad} wrong results")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
