"""The ``autoaccum`` command line: ``demo`` (more subcommands arrive with their features)."""
from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="autoaccum", description="Exact large-batch training on the GPU you have.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="train a small GPT with an effective batch of 256 and check exactness")
    demo.add_argument("--steps", type=_positive, default=30, help="optimizer steps (default 30)")
    demo.add_argument("--target-batch", type=_positive, default=256, help="effective batch (default 256)")
    demo.add_argument("--micro-batch", type=_positive, default=48, help="largest micro-batch (default 48)")
    demo.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if present)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--json", metavar="PATH", help="also write the summary as JSON")
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")

    args = parser.parse_args(argv)
    if args.command == "demo":
        from . import demo as demo_module
        summary = demo_module.run(steps=args.steps, target_batch=args.target_batch,
                                  micro_batch=args.micro_batch, device=args.device, seed=args.seed,
                                  progress=not args.no_progress)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(summary, f, indent=2)
        return 0 if summary["exactness_max_abs_diff"] <= 1e-12 else 1
    return 2  # pragma: no cover - argparse rejects unknown commands


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
