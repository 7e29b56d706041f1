"""exit_guard: autoaccum's collective tensors are released before the interpreter finalises."""
import ast
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch

from autoaccum import exit_guard

ROOT = Path(__file__).resolve().parent.parent


def test_a_tensor_still_held_by_cpp_is_waited_for_and_released_once_dropped():
    a = torch.randn(5, requires_grad=True)
    b = exit_guard.track(torch.randn(5))
    out = a * b                           # autograd saves b: a C++ reference, as a gloo work holds
    assert b._use_count() == 2
    t0 = time.monotonic()
    assert exit_guard.wait_for_release(0.05) is False
    assert time.monotonic() - t0 >= 0.05
    del out
    assert exit_guard.wait_for_release(0.05) is True
    assert exit_guard._pending == []


def test_a_tracked_tensor_that_died_counts_as_released():
    exit_guard.track(torch.randn(3))     # the temporary dies at once
    assert exit_guard.wait_for_release(0.0) is True


def test_the_list_stays_bounded_when_tensors_stay_held():
    keep = [torch.randn(2) for _ in range(exit_guard._KEEP + 10)]
    graphs = []
    a = torch.randn(2, requires_grad=True)
    for t in keep:
        exit_guard.track(t)
        graphs.append(a * t)
    assert len(exit_guard._pending) <= exit_guard._KEEP
    graphs.clear()
    assert exit_guard.wait_for_release(0.05) is True


def _exit_seconds(release: bool) -> float:
    script = textwrap.dedent(f"""
        import time, torch
        from autoaccum import exit_guard
        exit_guard.EXIT_WAIT_S = 0.5
        a = torch.randn(4, requires_grad=True)
        held = a * exit_guard.track(torch.randn(4))
        if {release}:
            del held
        print(time.monotonic(), flush=True)
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return time.monotonic() - float(r.stdout.split()[-1])


def test_the_wait_runs_at_interpreter_exit_and_is_bounded():
    held, released = _exit_seconds(False), _exit_seconds(True)
    assert held >= 0.5 > released


def test_every_collective_in_the_package_goes_through_track():
    collectives = {"all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter",
                   "reduce_scatter_tensor", "reduce", "gather", "scatter", "all_to_all", "all_to_all_single"}
    untracked, found = [], 0
    for path in (ROOT / "autoaccum").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in collectives and isinstance(node.func.value, ast.Name)
                    and node.func.value.id == "dist"):
                found += 1
                arg = node.args[0] if node.args else None
                tracked = (isinstance(arg, ast.Call) and isinstance(arg.func, ast.Attribute)
                           and arg.func.attr == "track")
                if not tracked:
                    untracked.append(f"{path.name}:{node.lineno}")
    assert found >= 6 and untracked == [], (found, untracked)
