"""The GPU steps a lucky session runs (benchmarks/README.md), dry-run on the CPU so they cannot rot:
each finishes inside its bound, writes only what a device call returns, and records its exit."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
STEPS = sorted((ROOT / "benchmarks" / "gpu").glob("[0-9]-*.sh"))


def test_every_step_is_listed_in_the_benchmarks_readme():
    listed = (ROOT / "benchmarks" / "README.md").read_text()
    assert len(STEPS) >= 4
    for step in STEPS:
        assert f"bash benchmarks/gpu/{step.name}" in listed, step.name


@pytest.mark.parametrize("step", STEPS, ids=lambda p: p.name)
def test_step_dry_run(step, tmp_path):
    env = dict(os.environ, DRY_RUN="1", OUT=str(tmp_path), PYTHON=sys.executable)
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run(["bash", str(step)], capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    files = sorted(p.name for p in tmp_path.rglob("*") if p.is_file())
    assert "env.txt" in files and len(files) <= 8, files     # a device call returns at most 8 files
    status = (tmp_path / "env.txt").read_text()
    assert "exit 0" in status or "skipped" in status, status
