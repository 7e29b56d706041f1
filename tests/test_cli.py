import json

import pytest
import subprocess
import sys

from autoaccum import cli


def test_demo_trains_and_checks_exactness(tmp_path, capsys):
    out = tmp_path / "demo.json"
    code = cli.main(["demo", "--steps", "3", "--target-batch", "64", "--micro-batch", "20",
                     "--no-progress", "--json", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert "plan: target 64 = 4 micro-batches" in text and "[OK]" in text
    summary = json.loads(out.read_text())
    assert summary["steps"] == 3 and summary["exactness_max_abs_diff"] <= 1e-12
    assert summary["naive_max_abs_diff"] > 1e-6


def test_bad_arguments_exit_nonzero():
    r = subprocess.run([sys.executable, "-m", "autoaccum.cli", "demo", "--steps", "0"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "expected a positive integer" in r.stderr


def test_import_needs_neither_triton_nor_pynvml():
    code = ("import sys; sys.modules['triton'] = None; sys.modules['pynvml'] = None\n"
            "import autoaccum\n"
            "assert sys.modules['triton'] is None and sys.modules['pynvml'] is None\n"
            "print(autoaccum.plan(256, 48).accum_steps)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "6"


MODELS = '''
import torch
from torch import nn
import torch.nn.functional as F

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 10))

    def forward(self, x, y):
        return {"loss": F.cross_entropy(self.body(x), y)}

def build():
    return Net()

def sample(n):
    return {"x": torch.randn(n, 128), "y": torch.randint(0, 10, (n,))}

def wrong_sample(n):
    return {"x": torch.randn(n, 64), "y": torch.randint(0, 10, (n,))}

def not_a_model():
    return 3

def broken_sample(n):
    return {"x": {}["missing"]}
'''


def probe_cli(tmp_path, monkeypatch, capsys, *args):
    """Run ``autoaccum probe`` in-process from ``tmp_path``, where mymodels.py lives."""
    (tmp_path / "mymodels.py").write_text(MODELS)
    (tmp_path / "exits.py").write_text("import sys\nsys.exit(3)\n")
    (tmp_path / "sub").mkdir(exist_ok=True)
    (tmp_path / "sub" / "layers.py").write_text("from torch import nn\ndef block():\n    return nn.Linear(128, 10)\n")
    (tmp_path / "sub" / "nets.py").write_text("import torch\nfrom torch import nn\nfrom layers import block\n"
                                              "class Net(nn.Module):\n    def __init__(self):\n        super().__init__()\n"
                                              "        self.body = block()\n"
                                              "    def forward(self, x, y):\n"
                                              "        return {'loss': nn.functional.cross_entropy(self.body(x), y)}\n"
                                              "def build():\n    return Net()\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    for name in ("mymodels", "exits", "nets", "layers"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    code = cli.main(["probe", *args])
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out, err)


def test_probe_command_prints_trials_model_and_plan(tmp_path, monkeypatch, capsys):
    r = probe_cli(tmp_path, monkeypatch, capsys, "--model", "mymodels:build", "--sample", "mymodels:sample",
                  "--target-batch", "4096",
                  "--memory-budget", "8MiB", "--json", "out.json", "--plot", "mem.png")
    assert r.returncode == 0, r.stderr
    assert "micro-batch" in r.stdout and "memory model:" in r.stdout and "max micro-batch:" in r.stdout
    assert "plan: target 4096 = 2 micro-batches" in r.stdout
    d = json.loads((tmp_path / "out.json").read_text())
    assert d["plan"]["accum_steps"] == 2 and d["max_micro_batch"] >= 2048 and d["trials"]
    assert (tmp_path / "mem.png").read_bytes()[:4] == b"\x89PNG"
    again = probe_cli(tmp_path, monkeypatch, capsys, "--model", "mymodels:build", "--sample", "mymodels:sample", "--target-batch",
                      "4096", "--memory-budget", "8MiB")
    assert "cached answer, confirmed by one trial" in again.stdout


def test_probe_command_estimates_without_allocating(tmp_path, monkeypatch, capsys):
    r = probe_cli(tmp_path, monkeypatch, capsys, "--model", "./mymodels.py:build", "--sample", "./mymodels.py:sample",
                  "--target-batch", "256", "--estimate", "--device-memory", "80GiB")
    assert r.returncode == 0, r.stderr
    assert "estimate for a 80GiB GPU" in r.stdout and "plan: target 256 = 1 micro-batch [256]" in r.stdout


@pytest.mark.parametrize("args, message", [
    (["--model", "nomod:build", "--sample", "mymodels:sample"], "cannot import 'nomod'"),
    (["--model", "mymodels:nothing", "--sample", "mymodels:sample"], "has no attribute 'nothing'"),
    (["--model", "mymodels", "--sample", "mymodels:sample"], "must be MODULE:NAME"),
    (["--model", "mymodels:not_a_model", "--sample", "mymodels:sample"], "not a torch.nn.Module"),
    (["--model", "mymodels:build", "--sample", "mymodels:wrong_sample"], "shapes cannot be multiplied"),
    (["--model", "./missing.py:build", "--sample", "mymodels:sample"], "no such file"),
    (["--model", "./sub:build", "--sample", "mymodels:sample"], "is a directory"),
    (["--model", "exits:build", "--sample", "mymodels:sample"], "called sys.exit(3)"),
    (["--model", "./exits.py:build", "--sample", "mymodels:sample"], "if __name__ == '__main__'"),
    (["--model", "nomod.deeper:build", "--sample", "mymodels:sample"], "No module named 'nomod'"),
    (["--model", "mymodels:build", "--sample", "mymodels:broken_sample"], "KeyError: 'missing'"),
    (["--model", "mymodels:build", "--sample", "mymodels:sample", "--device", "cuda:7"], "cannot move the model"),
    (["--model", "mymodels:build", "--sample", "mymodels:sample", "--plot", "no/such/dir/mem.png"], "plot"),
])
def test_probe_command_bad_input_is_one_line(tmp_path, monkeypatch, capsys, args, message):
    r = probe_cli(tmp_path, monkeypatch, capsys, *args, "--target-batch", "64", "--memory-budget", "8MiB")
    assert r.returncode == 2
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


@pytest.mark.parametrize("model", ["./sub/nets.py:build", "sub/nets:build"])
def test_a_model_file_imports_its_siblings(tmp_path, monkeypatch, capsys, model):
    """``--model sub/nets.py:build`` where nets.py does ``from layers import block``: its folder is on
    sys.path, as it would be for ``python sub/nets.py``."""
    r = probe_cli(tmp_path, monkeypatch, capsys, "--model", model, "--sample", "mymodels:sample",
                  "--target-batch", "256", "--estimate", "--device-memory", "80GiB")
    assert r.returncode == 0, r.stderr
    assert "plan: target 256" in r.stdout


def test_probe_command_traceback_flag_shows_the_whole_error(tmp_path, monkeypatch, capsys):
    with pytest.raises(KeyError, match="missing"):
        probe_cli(tmp_path, monkeypatch, capsys, "--model", "mymodels:build", "--sample", "mymodels:broken_sample",
                  "--target-batch", "64", "--memory-budget", "8MiB", "--traceback")


def test_demo_probes_by_default(capsys):
    assert cli.main(["demo", "--steps", "2", "--target-batch", "64", "--memory-budget", "8MiB", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "probe: " in out and "trials under 8.00 MiB" in out and "[OK]" in out


def test_bench_command_runs_the_kernel_benchmark_script(tmp_path, capsys):
    out = tmp_path / "k.json"
    assert cli.main(["bench", "--dry-run", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "device-to-device copy" in text and "finalize (norm + scale)" in text and "goals" in text
    data = json.loads(out.read_text())
    assert data["env"]["torch"] == __import__("torch").__version__ and data["rows"]
    kernels = {r["kernel"] for r in data["rows"]}
    assert {"accumulate assign bfloat16", "accumulate add float32", "finalize (norm + scale)"} <= kernels
    variants = {r["variant"] for r in data["rows"]}
    assert {"python loop", "torch._foreach", "deepspeed-style", "pytorch unscale_+clip"} <= variants
