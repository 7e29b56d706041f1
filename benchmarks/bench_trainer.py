"""Trainer overhead: ``Trainer.step`` against the fastest correct hand-written accumulation loop.

The hand loop runs the same micro-batches as the trainer's plan, cut from the batch each step
as a user's loop must (``torch.split`` per tensor): ``loss_i * items_i / items``,
``backward``, ``clip_grad_norm_(foreach=True)`` when clipping, ``step``,
``zero_grad(set_to_none=True)``. Both run in one process on twin models, in alternating rounds of
``--steps`` steps each (by default as many as take 0.1 s), each side warm in its own round as in
a training loop: CPU time (``time.process_time``) on the CPU, synchronised wall time on CUDA.
``ratio`` is the median over ``--repeat`` rounds, beside the rounds' p10-p90. Run it on a quiet
machine: other work on a 2-core CPU moves the tiny MLP's ratio by several percent. (Alternating
step by step instead gives ratios about 0.02 lower: each side then starts cold after the other,
which adds the same cost to both.) The twins' parameters are compared at the end (they must
agree to rounding: the trainer also checks inf/nan and weights in float64, the loop does not).

    python benchmarks/bench_trainer.py --json benchmarks/results/trainer-cpu.json
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import autoaccum  # noqa: E402
from autoaccum.demo import TinyGPT, count_tokens, lm_loss, make_batch  # noqa: E402


def ce(model, b):
    return F.cross_entropy(model(b[0]), b[1])


def mse(model, b):
    return F.mse_loss(model(b[0]), b[1])


class ManyTensors(nn.Module):
    """200 small parameter tensors: per-tensor costs dominate."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(16, 16) for _ in range(100))

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


def cases(scale: float):
    g = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    labels = lambda n, k: torch.randint(0, k, (n,), generator=g)  # noqa: E731
    w = lambda n: max(1, int(n * scale))  # noqa: E731
    return {   # name: (model, batch, loss_fn, count_fn, micro_batch, max_grad_norm)
        "tiny_mlp": (lambda: nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10)),
                     (rand(256, 32), labels(256, 10)), ce, None, 16, None),
        "mlp": (lambda: nn.Sequential(nn.Linear(w(384), w(1536)), nn.GELU(), nn.Linear(w(1536), w(1536)), nn.GELU(),
                                      nn.Linear(w(1536), w(384))),
                (rand(256, w(384)), rand(256, w(384))), mse, None, 64, None),
        "mlp_clip": (lambda: nn.Sequential(nn.Linear(w(384), w(1536)), nn.GELU(), nn.Linear(w(1536), w(384))),
                     (rand(256, w(384)), rand(256, w(384))), mse, None, 64, 1.0),
        "tiny_gpt": (lambda: TinyGPT(dim=w(128), layers=2, heads=4, max_len=48), make_batch(64, seq_len=48),
                     lm_loss, None, 16, None),
        "gpt_padded_tokens": (lambda: TinyGPT(dim=w(128), layers=2, heads=4, max_len=48),
                              make_batch(64, seq_len=48, seed=3), lm_loss, count_tokens, 16, 1.0),
        "many_tensors": (ManyTensors, (rand(128, 16), rand(128, 16)), mse, None, 16, None),
    }


def hand_step(model, opt, batch, sizes, loss_fn, count_fn, max_grad_norm):
    """The loop a careful user writes: cut the batch (``torch.split`` per tensor), weight by items,
    one clip, one step."""
    if isinstance(batch, dict):
        parts = [dict(zip(batch, row)) for row in zip(*(v.split(sizes) for v in batch.values()))]
    else:
        parts = list(zip(*(t.split(sizes) for t in batch)))
    counts = [float(count_fn(p)) if count_fn else float(len(p[0]) if isinstance(p, tuple) else len(next(iter(p.values()))))
              for p in parts]
    total = sum(counts)
    for part, c in zip(parts, counts):
        (loss_fn(model, part) * (c / total)).backward()
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm, foreach=True)
    opt.step()
    opt.zero_grad(set_to_none=True)


def timed(fn, steps: int, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = time.perf_counter()
    else:
        start = time.process_time()
    for _ in range(steps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return (time.perf_counter() - start) / steps
    return (time.process_time() - start) / steps


def run_case(name, case, device, steps, repeat, fused=False):
    build, batch, loss_fn, count_fn, micro, clip = case
    torch.manual_seed(0)
    ours = build().to(device)
    theirs = copy.deepcopy(ours)
    batch = autoaccum.batch.to_device(batch, device)
    adamw = lambda params: torch.optim.AdamW(params, lr=1e-3, fused=fused or None)  # noqa: E731
    trainer = autoaccum.fit(ours, autoaccum.batch.batch_size(batch), adamw(ours.parameters()),
                            loss_fn=loss_fn, count_fn=count_fn, micro_batch=micro, max_grad_norm=clip)
    opt = adamw(theirs.parameters())
    sizes = trainer.plan.micro_batches
    ours_step = lambda: trainer.step(batch)  # noqa: E731
    hand = lambda: hand_step(theirs, opt, batch, sizes, loss_fn, count_fn, clip)  # noqa: E731
    both = lambda: (ours_step(), hand())  # noqa: E731
    timed(both, 3, device)    # warm-up (first steps build optimizer state, kernels, workspaces); both twins
    if not steps:             # enough steps that a round lasts 0.1 s: short rounds are mostly noise
        steps = max(3, min(200, math.ceil(0.2 / max(timed(both, 2, device), 1e-6))))
    rounds = []
    for _ in range(repeat):   # interleaved rounds: drift in the machine's speed hits both alike
        rounds.append((timed(ours_step, steps, device), timed(hand, steps, device)))
    ratios = [a / b for a, b in rounds]
    ratio = statistics.median(ratios)
    spread = statistics.quantiles(ratios, n=10, method="inclusive") if len(ratios) > 1 else ratios
    diff = max((p - q).abs().max().item() for p, q in zip(ours.parameters(), theirs.parameters()))
    return {"model": name, "micro_batches": trainer.plan.micro_batches, "clip": clip, "fused": fused,
            "steps_per_round": steps,
            "trainer_ms": 1e3 * statistics.median(a for a, _ in rounds),
            "hand_ms": 1e3 * statistics.median(b for _, b in rounds), "ratio": ratio,
            "ratio_p10": spread[0], "ratio_p90": spread[-1],
            "max_param_diff": diff}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=0, help="steps per round (0: as many as last 0.1 s)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--models", default=",".join(cases(1.0)))
    ap.add_argument("--fused", action="store_true",
                    help="both sides use AdamW(fused=True): on CUDA the trainer then never waits for the device")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (1: overhead is not hidden by idle cores)")
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "torch": torch.__version__, "python": platform.python_version(), "threads": args.threads,
           "command": " ".join(["python", *sys.argv])}
    print(f"# {env['date']}  {env['device']}  torch {env['torch']}  {args.threads} thread(s)\n# {env['command']}")
    all_cases = cases(args.scale)
    rows = [run_case(name, all_cases[name], device, args.steps, args.repeat, args.fused)
            for name in args.models.split(",")]
    print(f"{'model':<19}{'micro-batches':>14}{'trainer ms':>12}{'hand ms':>9}{'ratio':>7}{'rounds p10-p90':>16}"
          f"{'param diff':>12}")
    for r in rows:
        spread = f"{r['ratio_p10']:.3f}-{r['ratio_p90']:.3f}"
        print(f"{r['model']:<19}{len(r['micro_batches']):>14}{r['trainer_ms']:>12.2f}{r['hand_ms']:>9.2f}"
              f"{r['ratio']:>7.3f}{spread:>16}{r['max_param_diff']:>12.1e}")
    if args.json:
        Path(args.json).write_text(json.dumps({"env": env, "results": rows}, indent=2))


if __name__ == "__main__":
    main()
