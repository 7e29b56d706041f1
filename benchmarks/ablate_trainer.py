"""What each of the trainer's per-step guarantees costs: the tiny-MLP case of ``bench_trainer.py``
run with one part replaced by a stub, against the same hand loop.

The stubs break the guarantee they remove (a stubbed snapshot restores nothing, a stubbed
finalize checks nothing), so this measures cost only: the difference between the ``none`` row
and a stubbed row is what that part costs inside a real step, with the caches as a real step
leaves them (several times its cost in a tight loop of its own).

    python benchmarks/ablate_trainer.py
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import autoaccum  # noqa: E402
from autoaccum import trainer as trainer_module  # noqa: E402

PARTS = ("none", "streams", "numpy", "finalize", "writes", "prepare")


def stub(part: str) -> None:
    """Replace ``part`` of the step by a stub (in this process only)."""
    t = trainer_module
    if part == "streams":                   # the random-stream snapshot taken before every step
        fixed = t.random_streams.capture()
        t.random_streams.capture = lambda: fixed
    elif part == "numpy":                   # its numpy part alone
        import numpy as np
        fixed = np.random.get_state()
        t.random_streams._numpy_state = lambda: fixed
    elif part == "finalize":                # norm, inf/nan read, unscale and clip
        result = (torch.tensor(0.0), torch.tensor(0.0), None)
        t.finalize = lambda *a, **k: result
    elif part == "writes":                  # the optimizer-write check behind all-or-nothing steps
        class NoCheck:
            def __init__(self, optimizer):
                pass
        t.OptimizerWrites = NoCheck
    elif part == "prepare":                 # checking, splitting and counting the batch
        real, memo = t.Trainer._prepare, {}
        t.Trainer._prepare = lambda self, batch: memo["r"] if "r" in memo else memo.setdefault("r", real(self, batch))


def measure(rounds: int, steps: int) -> tuple[float, float]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))
    twin = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    batch = (torch.randn(256, 32, generator=g), torch.randint(0, 10, (256,), generator=g))

    def ce(m, b):
        return F.cross_entropy(m(b[0]), b[1])

    trainer = autoaccum.fit(model, 256, torch.optim.AdamW(model.parameters(), lr=1e-3), loss_fn=ce, micro_batch=16)
    opt = torch.optim.AdamW(twin.parameters(), lr=1e-3)
    sizes = trainer.plan.micro_batches

    def hand():
        x, y = batch
        for xs, ys in zip(x.split(sizes), y.split(sizes)):
            (ce(twin, (xs, ys)) * (len(xs) / 256)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(30):
        trainer.step(batch)
        hand()
    ours, theirs = [], []
    for _ in range(rounds):
        start = time.process_time()
        for _ in range(steps):
            trainer.step(batch)
        ours.append((time.process_time() - start) / steps)
        start = time.process_time()
        for _ in range(steps):
            hand()
        theirs.append((time.process_time() - start) / steps)
    return statistics.median(ours), statistics.median(theirs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", choices=PARTS, help="run one part in this process (the driver runs each in its own)")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--steps", type=int, default=100)
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.part is None:                   # each part in a fresh process: stubs must not leak
        import subprocess
        for part in PARTS:
            subprocess.run([sys.executable, __file__, "--part", part, "--rounds", str(args.rounds),
                            "--steps", str(args.steps)], check=True)
        return
    stub(args.part)
    ours, theirs = measure(args.rounds, args.steps)
    print(f"{args.part:<9} trainer {ours * 1e6:7.1f} us  hand {theirs * 1e6:7.1f} us  "
          f"overhead {(ours - theirs) * 1e6:6.1f} us  ratio {ours / theirs:.3f}", flush=True)


if __name__ == "__main__":
    main()
