"""The probe benchmark's CI dry run: the script cannot rot, and on its small zoo the probe's answers
are judged by the independent ruler as in the committed results."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_quick_benchmark_runs_and_the_probe_is_within_5_percent_of_the_truth(tmp_path):
    out = tmp_path / "probe.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_probe.py"), "--quick",
                        "--models", "gpt_padded,stepped", "--json", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["env"]["torch"] == __import__("torch").__version__
    assert len(out.with_suffix(".jsonl").read_text().splitlines()) == 2, "one line per model, as it goes"
    for result in data["results"]:
        ours = result["strategies"]["autoaccum"]
        assert ours["within_budget"] and 0.95 <= ours["of_true"] <= 1.0, result["model"]
        assert ours["trials"] <= 6 and result["strategies"]["lightning"]["answer"] == result["true_max"]
    assert "% true" in r.stdout
