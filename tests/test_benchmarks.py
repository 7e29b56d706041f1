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


def test_ablate_trainer_runs_every_part():
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "ablate_trainer.py"), "--rounds", "1", "--steps", "2"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [line.split()[0] for line in r.stdout.splitlines()]
    assert rows == ["none", "streams", "numpy", "finalize", "writes", "prepare"], r.stdout


def test_bench_reference_measures_error_against_float64(tmp_path):
    data, _ = run("bench_reference.py", "--totals", "1e5", "--repeat", "1", tmp_path=tmp_path)
    for row in data["results"]:
        assert row["autoaccum_norm_rel_error"] <= 1e-6 and row["ratio"] > 0, row


def test_bench_host_drives_both_fast_paths_through_their_stubs(tmp_path):
    data, stdout = run("bench_host.py", "--calls", "12", "--counts", "10", "300", tmp_path=tmp_path)
    cases = {(r["case"], r["backend"], r["tensors"]) for r in data["rows"]}
    for backend in ("triton", "cuda"):
        for case in ("accumulate repeated", "accumulate fresh grads", "finalize repeated"):
            assert (case, backend, 300) in cases
    assert ("accumulate fresh grads, beyond the add", "torch", 300) in cases   # a difference: may be ~0
    assert all(r["median_us"] > 0 for r in data["rows"] if r["backend"] != "torch")


def test_the_extension_stub_takes_the_bindings_arguments():
    """bench_host's stand-in for the CUDA extension must take what csrc/bindings.cpp declares, or the
    host-time figures would measure calls the real module rejects."""
    import inspect
    import re
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from bench_host import _NoExtension
    finally:
        sys.path.pop(0)
    source = (ROOT / "csrc" / "bindings.cpp").read_text()
    for name in ("accumulate", "finalize", "accumulate_lists"):
        decl = re.search(rf'm\.def\("{name}",(.*?)\);', source, re.S).group(1)
        declared = re.findall(r'py::arg\("(\w+)"\)', decl)
        stub = list(inspect.signature(getattr(_NoExtension, name)).parameters)[1:]
        assert stub == declared, (name, stub, declared)
