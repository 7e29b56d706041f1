"""What each of the trainer's per-step guarantees costs: ``bench_trainer.py``'s tiny-MLP case (its
``run_case``, against its hand loop) run with one part replaced by a stub.

The stubs break the guarantee they remove (a stubbed snapshot restores nothing, a stubbed
finalize checks nothing), so this measures cost only: the difference between the ``none`` row
and a stubbed row is what that part costs inside a real step, with the caches as a real step
leaves them (several times its cost in a tight loop of its own).

    python benchmarks/ablate_trainer.py
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
from autoaccum import trainer as trainer_module  # noqa: E402
from bench_trainer import cases, run_case  # noqa: E402

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", choices=PARTS, help="run one part in this process (the driver runs each in its own)")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--steps", type=int, default=0, help="steps per round (0: as many as last 0.1 s)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.part is None:                   # each part in a fresh process: stubs must not leak
        import subprocess
        for part in PARTS:
            subprocess.run([sys.executable, __file__, "--part", part, "--rounds", str(args.rounds),
                            "--steps", str(args.steps)], check=True)
        return
    stub(args.part)
    row = run_case("tiny_mlp", cases(1.0)["tiny_mlp"], torch.device("cpu"), args.steps, args.rounds)
    ours, theirs = row["trainer_ms"] * 1e3, row["hand_ms"] * 1e3
    print(f"{args.part:<9} trainer {ours:7.1f} us  hand {theirs:7.1f} us  "
          f"overhead {ours - theirs:6.1f} us  ratio {row['ratio']:.3f}", flush=True)


if __name__ == "__main__":
    main()
