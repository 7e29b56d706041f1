"""The ``autoaccum`` command line: ``demo``, ``probe`` (pre-flight sizing), ``bench`` (kernels)."""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any


class CliError(Exception):
    """A user mistake on the command line: printed as one line, exit status 2."""


_TRACEBACK: bool | None = None   # --traceback: let errors from user code through whole (None: no such option)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "bench":
        args.args = extra            # everything after 'bench' belongs to the benchmark script
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    global _TRACEBACK
    _TRACEBACK = getattr(args, "traceback", None)
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)  # keep stdout in order with the stderr progress line
    try:
        return args.run(args)
    except CliError as e:
        print(f"autoaccum {args.command}: {e}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="autoaccum", description="Exact large-batch training on the GPU you have.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="train a small GPT with an effective batch of 256 and check exactness")
    demo.add_argument("--steps", type=_positive, default=30, help="optimizer steps (default 30)")
    demo.add_argument("--target-batch", type=_positive, default=256, help="effective batch (default 256)")
    demo.add_argument("--micro-batch", type=_positive, default=None,
                      help="largest micro-batch (default: probe for it)")
    demo.add_argument("--memory-budget", default="64MiB",
                      help="memory the probe may use (default 64MiB, so that even a big GPU accumulates; "
                           "'none' for the whole device)")
    demo.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if present)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--json", metavar="PATH", help="also write the summary as JSON")
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")
    demo.set_defaults(run=_run_demo)

    probe = sub.add_parser("probe", help="find the largest micro-batch for a model (or estimate it for a GPU)")
    probe.add_argument("--model", required=True, metavar="MODULE:FACTORY",
                       help="a function returning the nn.Module (MODULE is a dotted module or a .py file)")
    probe.add_argument("--sample", required=True, metavar="MODULE:FN",
                       help="FN(n) returns a batch of n samples; make it the worst case (longest sequences)")
    probe.add_argument("--loss", metavar="MODULE:FN", help="loss_fn(model, micro_batch) -> mean loss "
                       "(default: the model's own output.loss)")
    probe.add_argument("--target-batch", type=_positive, required=True, help="effective batch of one step")
    probe.add_argument("--world-size", type=_positive, default=1, help="data-parallel ranks (default 1)")
    probe.add_argument("--optimizer", default="adamw", choices=sorted(_OPTIMIZERS),
                       help="optimizer whose state is counted (default adamw)")
    probe.add_argument("--amp", default=None, choices=["bf16", "fp16"], help="autocast dtype")
    probe.add_argument("--device", default=None, help="where to probe (default: cuda if present, else cpu)")
    probe.add_argument("--memory-budget", default=None, help="cap on usable memory, e.g. 20GiB")
    probe.add_argument("--max-trials", type=_positive, default=6, help="bound on real trials (default 6)")
    probe.add_argument("--no-cache", action="store_true", help="neither read nor write the probe cache")
    probe.add_argument("--json", metavar="PATH", help="write the full result as JSON")
    probe.add_argument("--plot", metavar="PATH", help="write a PNG of peak memory against micro-batch")
    probe.add_argument("--estimate", action="store_true",
                       help="allocate nothing: dry-run on fake tensors for a GPU of --device-memory")
    probe.add_argument("--device-memory", default="80GiB", help="GPU memory for --estimate (default 80GiB)")
    probe.add_argument("--traceback", action="store_true",
                       help="on an error in your model, sample or loss, show the whole traceback")
    probe.set_defaults(run=_run_probe)

    bench = sub.add_parser("bench", help="the fused kernels against the memory-bandwidth floor and PyTorch "
                           "(needs a GPU and a source checkout; --dry-run checks it on the CPU)", add_help=False)
    bench.set_defaults(run=_run_bench)
    return parser


def _run_bench(args) -> int:
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_kernels.py"
    if not script.exists():
        raise CliError(f"the benchmark lives in a source checkout ({script} is missing); "
                       f"clone the repository and run it there")
    import runpy
    saved = sys.argv
    sys.argv = [str(script), *args.args]
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as e:
        return int(e.code or 0)
    finally:
        sys.argv = saved
    return 0


# ---------------------------------------------------------------- demo
def _run_demo(args) -> int:
    from . import demo as demo_module
    budget = None if str(args.memory_budget).lower() == "none" else args.memory_budget
    summary = _user_errors(lambda: demo_module.run(
        steps=args.steps, target_batch=args.target_batch, micro_batch=args.micro_batch,
        memory_budget=budget, device=args.device, seed=args.seed, progress=not args.no_progress))
    if args.json:
        _write_json(args.json, summary)
    return 0 if summary["exactness_max_abs_diff"] <= 1e-12 else 1


# ---------------------------------------------------------------- probe
_OPTIMIZERS = ("adamw", "adam", "sgd", "sgd-momentum", "none")


def _make_optimizer(name: str, params):
    """The optimizer whose state the probe counts (learning rates do not change memory)."""
    import torch
    return {"adamw": lambda: torch.optim.AdamW(params), "adam": lambda: torch.optim.Adam(params),
            "sgd": lambda: torch.optim.SGD(params, lr=1e-2),
            "sgd-momentum": lambda: torch.optim.SGD(params, lr=1e-2, momentum=0.9),
            "none": lambda: None}[name]()


def _run_probe(args) -> int:
    import torch
    from torch import nn

    from .estimate import estimate
    from .memory import format_bytes
    from .plan import plan as make_plan
    from .probe import probe, trial_table

    factory = _load(args.model, "--model")
    sample = _load(args.sample, "--sample")
    loss_fn = _load(args.loss, "--loss") if args.loss else None
    if not callable(sample):
        raise CliError(f"--sample {args.sample} is not a function; it must be FN(n) -> a batch of n samples")
    if args.target_batch % args.world_size:
        raise CliError(f"--target-batch {args.target_batch} is not divisible by --world-size {args.world_size}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = _user_errors(lambda: factory() if callable(factory) else factory, "--model factory failed")
    if not isinstance(model, nn.Module):
        raise CliError(f"--model {args.model} returned {type(model).__name__}, not a torch.nn.Module")
    if not args.estimate:
        model = _user_errors(lambda: model.to(device), f"cannot move the model to {device}")
    opt = _make_optimizer(args.optimizer, model.parameters())
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16, None: None}[args.amp]
    per_rank = args.target_batch // args.world_size

    if args.estimate:
        result = _user_errors(lambda: estimate(model, sample, optimizer=opt, loss_fn=loss_fn, amp_dtype=amp,
                                               device_memory=args.device_memory, max_micro_batch=per_rank,
                                               max_runs=max(args.max_trials, 2)),
                              "the dry run failed")
        trials, usable, title = result.runs, result.usable_bytes, f"estimate for a {args.device_memory} GPU"
    else:
        result = _user_errors(lambda: probe(model, sample, optimizer=opt, loss_fn=loss_fn, amp_dtype=amp,
                                            device=device, max_micro_batch=per_rank,
                                            memory_budget=args.memory_budget, max_trials=args.max_trials,
                                            cache=not args.no_cache, world_size=args.world_size),
                              "the probe failed")
        trials, usable, title = result.trials, result.limit_bytes, f"probe on {result.device['name']}"
        if result.from_cache:
            title += " (cached answer, confirmed by one trial; --no-cache to search again)"
    plan = make_plan(args.target_batch, result.max_micro_batch, args.world_size)
    mm = result.memory_model
    print(f"autoaccum {title}")
    print(f"limit {format_bytes(usable)}, headroom {format_bytes(result.headroom_bytes)}")
    print(trial_table(trials))
    if mm is not None:
        print(f"memory model: {format_bytes(mm.fixed_bytes)} + {format_bytes(mm.per_sample_bytes)} x micro-batch"
              f" (optimizer step peak {format_bytes(mm.step_bytes)})")
    print(f"max micro-batch: {result.max_micro_batch}")
    print(f"plan: {plan}")
    for note in result.notes:
        print(f"note: {note}")
    if args.json:
        _write_json(args.json, result.to_dict() | {"plan": plan.to_dict()})
    if args.plot:
        _user_errors(lambda: result.plot(args.plot), "cannot draw the plot")
    return 0


def _load(spec: str, flag: str) -> Any:
    """``module.path:name`` or ``path/to/file.py:name`` -> the object. A file's directory goes first on
    ``sys.path`` (so it can import its siblings, as ``python file.py`` would let it); a dotted module is
    looked up from the current directory first. Every way this can fail is one line."""
    if ":" not in spec:
        raise CliError(f"{flag} {spec!r} must be MODULE:NAME (e.g. mymodels:build or ./models.py:build)")
    module_name, _, attr = spec.rpartition(":")
    path_like = module_name.endswith(".py") or "/" in module_name or os.sep in module_name \
        or module_name.startswith(".")
    try:
        module = _import_file(module_name, flag) if path_like else _import_dotted(module_name)
    except CliError:
        raise
    except SystemExit as e:
        raise CliError(f"{flag}: importing {module_name!r} called sys.exit({e.code!r}); autoaccum imports it to "
                       f"call {attr!r}: put its script code under `if __name__ == '__main__':`") from None
    except ModuleNotFoundError as e:
        raise CliError(f"{flag}: cannot import {module_name!r}: {e} (looked in the current directory and "
                       f"sys.path; a file is given as ./{module_name.replace('.', '/')}.py:{attr})") from None
    except Exception as e:
        raise CliError(f"{flag}: cannot import {module_name!r}: {type(e).__name__}: {e}") from None
    if not hasattr(module, attr):
        raise CliError(f"{flag}: module {module_name!r} has no attribute {attr!r}")
    return getattr(module, attr)


def _import_file(name: str, flag: str):
    path = Path(name)
    if path.is_dir():
        raise CliError(f"{flag}: {name} is a directory; give a .py file (./dir/models.py:build) or a dotted "
                       f"module (dir.models:build)")
    if not path.exists() and path.suffix != ".py" and path.with_name(path.name + ".py").exists():
        path = path.with_name(path.name + ".py")       # ./models:build means ./models.py
    if not path.exists():
        raise CliError(f"{flag}: no such file {name}")
    if path.suffix != ".py":
        raise CliError(f"{flag}: {name} is not a .py file")
    folder = str(path.resolve().parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)                     # its sibling modules import as they would for `python file.py`
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module                    # dataclasses, pickling and the probe cache look it up there
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(path.stem, None)
        raise
    return module


def _import_dotted(name: str):
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    return importlib.import_module(name)


def _user_errors(fn, what: str = "failed"):
    """Run ``fn``, which runs the user's code (model factory, sample, loss); turn whatever it
    raises into one line (``--traceback`` shows it whole)."""
    try:
        return fn()
    except CliError:
        raise
    except Exception as e:
        if _TRACEBACK:
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        hint = "" if _TRACEBACK is None else " (--traceback shows the whole error)"
        raise CliError(f"{what}: {type(e).__name__}: {first}".rstrip(": ") + hint) from None


def _write_json(path: str, data: dict) -> None:
    try:
        with open(path, "w") as f:
            json.dump(data, f, indent=2)
    except OSError as e:
        raise CliError(f"cannot write {path}: {e}") from None


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
