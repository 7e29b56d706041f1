import json
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
