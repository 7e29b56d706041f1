"""The CPU benchmarks' scripts run (tiny settings), so they cannot rot between the sessions that use them."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(script, *args, tmp_path):
    out = tmp_path / "out.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args, "--json", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(out.read_text()), r.stdout


def test_bench_trainer_compares_with_the_hand_loop(tmp_path):
    data, stdout = run("bench_trainer.py", "--steps", "1", "--repeat", "1", "--models", "tiny_mlp,many_tensors",
                       tmp_path=tmp_path)
    for row in data["results"]:
        assert row["ratio"] > 0 and row["max_param_diff"] <= 1e-5, row
    assert "ratio" in stdout


def test_bench_reference_measures_error_against_float64(tmp_path):
    data, _ = run("bench_reference.py", "--totals", "1e5", "--repeat", "1", tmp_path=tmp_path)
    for row in data["results"]:
        assert row["autoaccum_norm_rel_error"] <= 1e-6 and row["ratio"] > 0, row
