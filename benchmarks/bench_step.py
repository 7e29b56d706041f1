"""End-to-end training-step throughput: is autoaccum's micro-batch as fast as the best one?

A GPT-2-small-sized decoder (``demo.TinyGPT``'s causal-SDPA blocks: 12 layers, d 768, 12 heads,
vocab 50257, 1024 tokens, tied head), bf16 autocast, AdamW (fused on CUDA), 256 sequences a step.

  auto    ``autoaccum.fit(..., sample=batch, probe_cache=False)``: the probe's micro-batch m_auto
  sweep   ``fit(..., micro_batch=m, oom_retry=False)`` on a fresh model per size, samples/s of a
          few steady-state ``Trainer.step`` calls (median), peak ``max_memory_reserved``, or "oom"
  anchors Accelerate-style (128, x0.9 after each OOM) and Lightning-style (largest power of two
          that fits), read off the sweep

A micro-batch limit m runs as ceil(256/k) with k = ceil(256/m) accumulation steps (balanced
split), so the sweep measures each distinct split once: m_auto's, every larger one up to the
first OOM, every one down to m_auto/2, and the powers of two below (at most 12 sizes; time
bound by --max-seconds). Target: autoaccum >= 0.98 x the best size of the sweep.

    python benchmarks/bench_step.py --json benchmarks/results/step-h100.json   # at most ~8 min on an H100
    python benchmarks/bench_step.py --dry-run          # CPU, tiny model, 8 MiB probe budget: ~5 s

With --json, each measured size is also appended to PATH.jsonl, so a killed run keeps its results.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import autoaccum  # noqa: E402
from autoaccum.demo import TinyGPT  # noqa: E402
from autoaccum.memory import is_oom_error, oom_message, read_device  # noqa: E402
from strategies import backoff  # noqa: E402

TARGET_OF_BEST = 0.98


@dataclass
class Config:
    layers: int = 12
    dim: int = 768
    heads: int = 12
    vocab: int = 50257
    seq: int = 1024
    target: int = 256
    budget: str | None = None     # the probe's memory_budget (None: the whole card)
    max_sizes: int = 12


DRY = Config(layers=2, dim=64, heads=4, vocab=256, seq=64, target=16, budget="8MiB", max_sizes=6)


class GPT(TinyGPT):
    """GPT-2 small's shape with its tied head; takes the batch dict and returns {"loss"}: mean
    next-token cross-entropy over labels != -100, as a Hugging Face causal LM does."""

    def __init__(self, c: Config):
        super().__init__(vocab=c.vocab, dim=c.dim, layers=c.layers, heads=c.heads, max_len=c.seq)
        nn.init.normal_(self.tok.weight, std=0.02)
        self.head.weight = self.tok.weight

    def forward(self, input_ids, labels):
        logits = super().forward(input_ids)[:, :-1]
        return {"loss": F.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)}


def count_tokens(batch):
    """The items the loss averages over, so uneven micro-batches weigh in as the full batch does."""
    return (batch["labels"][:, 1:] != -100).sum()


def make_batch(c: Config, device: torch.device) -> dict:
    """One optimizer step of full-length (worst-case) random sequences, ~1% of labels ignored."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, c.vocab, (c.target, c.seq), generator=g)
    labels = ids.masked_fill(torch.rand(c.target, c.seq, generator=g) < 0.01, -100)
    batch = {"input_ids": ids, "labels": labels}
    return {k: v.pin_memory() for k, v in batch.items()} if device.type == "cuda" else batch


def build(c: Config, device: torch.device):
    """The same initial weights every time, and a fresh optimizer: no state carries across sizes."""
    torch.manual_seed(0)
    with device:
        model = GPT(c)
    return model, torch.optim.AdamW(model.parameters(), lr=6e-4, weight_decay=0.1, fused=device.type == "cuda")


def runs_as(target: int, m: int) -> int:
    """The largest micro-batch a limit of ``m`` actually runs (the balanced split's)."""
    return math.ceil(target / math.ceil(target / min(m, target)))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def probe_choice(c: Config, batch: dict, device: torch.device) -> dict:
    model, opt = build(c, device)
    trainer = autoaccum.fit(model, target_batch=c.target, optimizer=opt, count_fn=count_tokens,
                            amp_dtype=torch.bfloat16, sample=batch, memory_budget=c.budget, probe_cache=False)
    result = trainer.probe_result
    trainer.close()
    return {"micro_batch": trainer.plan.micro_batch, "runs_as": max(trainer.plan.micro_batches),
            "plan": str(trainer.plan), "trials": len(result.trials),
            "trial_sizes": [t.micro_batch for t in result.trials], "probe_seconds": result.seconds}


def measure(c: Config, batch: dict, device: torch.device, m: int, steps: int) -> dict:
    """Samples/s of steady-state steps at micro-batch ``m`` (median, after a warm-up step that
    makes the optimizer state), peak reserved bytes over the timed steps, or an OOM."""
    model, opt = build(c, device)
    trainer = autoaccum.fit(model, target_batch=c.target, optimizer=opt, count_fn=count_tokens,
                            amp_dtype=torch.bfloat16, micro_batch=m, probe_cache=False, oom_retry=False)
    row = {"m": m, "accum_steps": trainer.plan.accum_steps, "plan": str(trainer.plan), "oom": False}
    try:
        trainer.step(batch)
        sync(device)
        release(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        seconds = []
        for _ in range(steps):
            t0 = time.perf_counter()
            trainer.step(batch)
            sync(device)
            seconds.append(time.perf_counter() - t0)
        row.update(samples_per_s=c.target / statistics.median(seconds), step_seconds=seconds,
                   peak_reserved=torch.cuda.max_memory_reserved(device) if device.type == "cuda" else None)
    except RuntimeError as e:   # torch.OutOfMemoryError, or cuBLAS/cuDNN failing to allocate
        if not is_oom_error(e):
            raise
        row.update(oom=True, error=oom_message(e))
    finally:
        trainer.close()
    return row


def environment(device: torch.device) -> dict:
    try:
        triton_version = metadata.version("triton")
    except metadata.PackageNotFoundError:
        triton_version = None
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": read_device(device).name, "torch": torch.__version__, "triton": triton_version,
            "python": platform.python_version(), "command": " ".join([Path(sys.executable).name, *sys.argv])}


def sweep_order(target: int, auto: int) -> list[int]:
    """m_auto's split, every larger one (run up to the first OOM), every one down to m_auto/2, then
    the powers of two below: the slow small sizes come last, where the limits cut."""
    plans = sorted({runs_as(target, m) for m in range(1, target + 1)})
    powers = {runs_as(target, 1 << i) for i in range(target.bit_length())}
    down = sorted({s for s in plans if auto / 2 <= s < auto} | {p for p in powers if p < auto}, reverse=True)
    return [auto] + [s for s in plans if s > auto] + down


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny model, 8 MiB probe budget: checks the script")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per size, after one warm-up step")
    ap.add_argument("--max-seconds", type=float, default=480, help="measure no new size after this many seconds")
    ap.add_argument("--json", help="write results here (and one line per measured size to PATH.jsonl)")
    args = ap.parse_args()
    started = time.perf_counter()
    c = DRY if args.dry_run else Config()
    device = torch.device("cpu" if args.dry_run else args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    env = environment(device)
    print(f"# {env['date']}  {env['device']}  torch {env['torch']}  triton {env['triton']}  python {env['python']}"
          f"\n# {env['command']}", flush=True)
    stream = None
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        stream = open(Path(args.json).with_suffix(".jsonl"), "w")

    def record(line: dict) -> None:
        if stream:
            stream.write(json.dumps(line) + "\n")
            stream.flush()

    batch = make_batch(c, device)
    auto = probe_choice(c, batch, device)
    release(device)
    record({"env": env, "auto": auto})
    print(f"autoaccum: {auto['plan']} after {auto['trials']} trials, {auto['probe_seconds']:.1f} s", flush=True)

    rows: dict[int, dict] = {}   # keyed by the size a limit runs as
    out_of_time = lambda: time.perf_counter() - started > args.max_seconds  # noqa: E731
    oom_from = lambda: min((s for s, r in rows.items() if r["oom"]), default=c.target + 1)  # noqa: E731

    def run(s: int) -> None:
        r = rows[s] = measure(c, batch, device, s, args.steps)
        release(device)
        record(r)
        print(f"m {s:>4} x{r['accum_steps']:<4}" + (" oom" if r["oom"] else f" {r['samples_per_s']:9.2f} samples/s"),
              flush=True)

    order = sweep_order(c.target, auto["runs_as"])
    for s in order:
        if len(rows) >= c.max_sizes or out_of_time():
            break
        if s < oom_from():
            run(s)
    # The anchors' searches, with the sweep as their trials: memory grows with the size, so a size
    # fits if it runs below the smallest one that ran out of memory.
    fits = lambda m: runs_as(c.target, m) < oom_from()  # noqa: E731
    choices = {"autoaccum": auto["micro_batch"], "accelerate": backoff(fits, start=128)[0],
               "lightning": max((1 << i for i in range(c.target.bit_length()) if fits(1 << i)), default=0)}
    for m in choices.values():
        if m and runs_as(c.target, m) not in rows and not out_of_time():
            run(runs_as(c.target, m))
    cut = [s for s in order if s not in rows and s < oom_from()]   # left out by --max-seconds or the size cap
    best = max((r for r in rows.values() if not r["oom"]), key=lambda r: r["samples_per_s"], default=None)
    judged = {}
    for name, m in choices.items():
        r = rows.get(runs_as(c.target, m)) if m else None
        sps = r["samples_per_s"] if r and not r["oom"] else None
        judged[name] = {"m": m, "runs_as": runs_as(c.target, m) if m else None, "oom": bool(r and r["oom"]),
                        "samples_per_s": sps, "of_best": sps / best["samples_per_s"] if sps and best else None}
    met = (judged["autoaccum"]["of_best"] or 0) >= TARGET_OF_BEST

    print(f"\nstep throughput on {env['device']}: {c.layers} layers, d {c.dim}, vocab {c.vocab}, seq {c.seq}, "
          f"target batch {c.target}, bf16 autocast, AdamW")
    print(f"{'m':>5}{'accum':>7}{'samples/s':>12}{'peak GiB':>10}  chosen by")
    for s, r in sorted(rows.items()):
        by = ", ".join(n for n, j in judged.items() if j["runs_as"] == s) + (" (best)" if r is best else "")
        peak = f"{r['peak_reserved'] / 2**30:10.2f}" if r.get("peak_reserved") else f"{'-':>10}"
        print(f"{s:>5}{r['accum_steps']:>7}{'oom' if r['oom'] else format(r['samples_per_s'], '.2f'):>12}{peak}  {by}")
    if best:
        print(f"best: m {best['m']}, {best['samples_per_s']:.2f} samples/s")
    for name, j in judged.items():
        ratio = "oom" if j["oom"] else f"{j['of_best']:.3f} x best" if j["of_best"] is not None else "not measured"
        print(f"{name:<11} m {j['m']} (runs as {j['runs_as']}): {ratio}")
    print(f"target: autoaccum >= {TARGET_OF_BEST} x best: {'met' if met else 'MISSED'}  "
          f"({time.perf_counter() - started:.0f} s; not measured: {cut or 'none'})")
    if device.type == "cpu":
        print("(CPU: nothing runs out of memory, so sizes past the probe's budget run too; only a GPU run judges)")
    if args.json:
        stream.close()
        with open(args.json, "w") as f:
            json.dump({"env": env, "config": asdict(c), "auto": auto, "sweep": [r for _, r in sorted(rows.items())],
                       "not_measured": cut, "best": best, "anchors": judged,
                       "target": {"of_best": TARGET_OF_BEST, "met": met}, "seconds": time.perf_counter() - started},
                      f, indent=2)


if __name__ == "__main__":
    main()
