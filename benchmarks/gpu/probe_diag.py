"""Why does the probe's answer differ from the ruler's on a GPU? Probe trials beside ruler peaks.

On a card shrunk to about 2 GiB (as tests/test_probe_cuda.py does): the probe's trials (peak,
memory before the micro-batch, forward/backward and step peaks), then the ruler's steady-state
Trainer.step peak at the same sizes and at the ruler's true maximum.

    python benchmarks/gpu/probe_diag.py
"""
import gc
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "benchmarks")]
import autoaccum  # noqa: E402
import ruler  # noqa: E402
from helpers import ce_loss, convnet, image_batch, mlp, mse_loss, regression_batch  # noqa: E402

MiB = 1 << 20


def main():
    dev = torch.device("cuda", torch.cuda.current_device())
    total = torch.cuda.get_device_properties(dev).total_memory
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(min(1.0, (torch.cuda.memory_reserved(dev) + (2 << 30)) / total), dev)
    cases = {"convnet": (convnet, lambda n: image_batch(n, size=128), ce_loss),
             "mlp": (lambda: mlp(torch.float32, d_in=2048, hidden=4096, d_out=2048),
                     lambda n: regression_batch(n, torch.float32, d_in=2048, d_out=2048), mse_loss)}
    for name, (build, sample, loss_fn) in cases.items():
        model = build().to(dev)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        result = autoaccum.probe(model, sample(4), optimizer=opt, loss_fn=loss_fn, cache=False, max_micro_batch=1 << 14)
        print(f"== {name}: probe answer {result.max_micro_batch}, limit {result.limit_bytes / MiB:.0f} MiB")
        for t in result.trials:
            f = lambda b: "-" if b is None else f"{b / MiB:8.1f}"  # noqa: E731
            print(f"  probe  n={t.micro_batch:6d} fits={t.fits!s:5} peak={f(t.peak_bytes)} base={f(t.base_bytes)} "
                  f"fwd_bwd={f(t.forward_backward_bytes)} step={f(t.step_bytes)} MiB")
        del model, opt
        gc.collect()
        torch.cuda.empty_cache()
        setup = ruler.Setup(lambda: (build(), lambda params: torch.optim.AdamW(params, lr=1e-3)), sample, loss_fn)
        for t in result.trials:
            ok, peak = ruler.fits(setup, t.micro_batch, dev, result.limit_bytes)
            print(f"  ruler  n={t.micro_batch:6d} fits={ok!s:5} peak={'-' if peak is None else f'{peak / MiB:8.1f}'} MiB")
        true, peaks = ruler.true_maximum(setup, dev, result.limit_bytes, cap=1 << 14, hint=result.max_micro_batch)
        print(f"  ruler true maximum {true}; peaks " + ", ".join(
            f"{n}: {'OOM' if p is None else f'{p / MiB:.0f}'}" for n, p in sorted(peaks.items())), flush=True)


if __name__ == "__main__":
    main()
