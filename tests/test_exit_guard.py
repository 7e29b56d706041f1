"""exit_guard: autoaccum's collective tensors are released before the interpreter finalises."""
import ast
import subprocess
import sys
import textwrap
import threading
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


def _exit_wait(release: bool) -> float:
    """Seconds exit_guard's hook takes at exit: an atexit handler registered before it runs after it."""
    script = textwrap.dedent(f"""
        import atexit, time, torch
        from autoaccum import exit_guard
        atexit.register(lambda: print("end", time.monotonic(), flush=True))
        exit_guard.EXIT_WAIT_S = 0.5
        a = torch.randn(4, requires_grad=True)
        held = a * exit_guard.track(torch.randn(4))      # registers exit_guard's hook: it runs first
        if {release}:
            del held
        print("start", time.monotonic(), flush=True)
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    times = dict(line.split() for line in r.stdout.splitlines())
    return float(times["end"]) - float(times["start"])


def test_the_wait_runs_at_interpreter_exit_and_is_bounded():
    held, released = _exit_wait(False), _exit_wait(True)
    assert held >= 0.5 + exit_guard.HANDOFF_S
    assert exit_guard.HANDOFF_S <= released < 0.4


def test_tracking_from_several_threads_loses_nothing():
    a = torch.randn(2, requires_grad=True)
    kept = []
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)              # switch threads as often as possible

    def work():
        for _ in range(50):
            t = exit_guard.track(torch.randn(2))
            kept.append((t, a * t))          # held on the C++ side, as a collective in flight would be

    try:
        threads = [threading.Thread(target=work) for _ in range(4)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    finally:
        sys.setswitchinterval(interval)
    tracked = {id(ref()) for ref, _ in exit_guard._pending}
    assert all(id(t) in tracked for t, _ in kept)
    kept.clear()
    assert exit_guard.wait_for_release(1.0) is True


def test_what_the_topology_hands_back_holds_no_collective_tensor():
    """An agreement's ``touched`` and ``sum_``'s caller's tensor outlive the collective: neither may
    keep a tracked tensor above its count (the exit would wait its full bound). One gloo rank."""
    script = textwrap.dedent("""
        import os, torch, torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel as DDP
        from autoaccum import exit_guard
        from autoaccum.distributed import Topology
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["PORT"], RANK="0", WORLD_SIZE="1")
        dist.init_process_group("gloo")
        topo = Topology(DDP(torch.nn.Linear(3, 2)))
        agreement = topo.agree(0, 4, torch.tensor([1, 0, 1]))
        loss = torch.tensor([2.5])
        view = loss.view(())                                  # the caller keeps a view of what it summed
        topo.sum_(loss)
        print("released", exit_guard.wait_for_release(5.0), agreement.touched.tolist(), float(view))
        dist.destroy_process_group()
    """)
    import os
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PORT": str(port)})
    assert r.returncode == 0, r.stderr
    assert "released True [1, 0, 1] 2.5" in r.stdout


def test_every_collective_in_the_package_goes_through_track():
    collectives = {"all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter",
                   "reduce_scatter_tensor", "reduce", "gather", "scatter", "all_to_all", "all_to_all_single",
                   "allreduce", "allgather", "send", "recv", "isend", "irecv"}
    untracked, found = [], 0
    for path in (ROOT / "autoaccum").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            f = node.func
            if isinstance(f, ast.Attribute):   # dist.x, torch.distributed.x, a process group's method
                owner = ast.unparse(f.value)
                name = f.attr if (owner in ("dist", "torch.distributed") or "group" in owner
                                  or owner.endswith("pg")) else None
            else:
                name = f.id if isinstance(f, ast.Name) else None
            if name not in collectives:
                continue
            found += 1
            arg = node.args[0] if node.args else None
            tracked = (isinstance(arg, ast.Call) and isinstance(arg.func, ast.Attribute)
                       and arg.func.attr == "track")
            if not tracked:
                untracked.append(f"{path.name}:{node.lineno}")
    assert found >= 6 and untracked == [], (found, untracked)
