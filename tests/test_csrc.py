"""csrc/ must compile without a GPU: nvcc for sm_90 and sm_80, the binding against torch's headers,
and the shared element math as a host program that runs."""
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from autoaccum.kernels import group

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
NVCC = shutil.which("nvcc")
GXX = shutil.which("g++")


@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed")
@pytest.mark.parametrize("arch", ["sm_90", "sm_80"])
@pytest.mark.parametrize("source", ["accumulate_kernel.cu", "finalize_kernel.cu"])
def test_cuda_sources_compile(tmp_path, arch, source):
    r = subprocess.run([NVCC, "-c", "-O3", "-std=c++17", f"-arch={arch}", "-Werror", "all-warnings",
                        str(CSRC / source), "-o", str(tmp_path / "out.o")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-4000:]


@pytest.mark.skipif(GXX is None, reason="g++ is not installed")
def test_binding_compiles_against_torch_headers_without_cuda_headers():
    include = Path(torch.__file__).parent / "include"
    r = subprocess.run([GXX, "-std=c++20", "-fsyntax-only", "-Wall", f"-I{include}",
                        f"-I{include / 'torch' / 'csrc' / 'api' / 'include'}", f"-I{sysconfig.get_paths()['include']}",
                        "-DTORCH_EXTENSION_NAME=_C", str(CSRC / "bindings.cpp")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "cuda" not in (CSRC / "bindings.cpp").read_text().split("#include <torch/extension.h>")[1].split("namespace")[0]


@pytest.mark.skipif(GXX is None, reason="g++ is not installed")
def test_element_math_runs_on_the_host(tmp_path):
    exe = tmp_path / "element_math"
    r = subprocess.run([GXX, "-std=c++17", "-O2", "-Wall", "-Wextra", "-Werror",
                        str(ROOT / "tests" / "csrc" / "test_element_math.cpp"), "-o", str(exe)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-4000:]
    run = subprocess.run([str(exe)], capture_output=True, text=True)
    assert run.returncode == 0 and " 0 failed" in run.stdout, run.stdout


def test_setup_py_skips_the_extension_without_cuda(tmp_path):
    """On a CPU build of torch setup.py must say, in one line, that it installs pure Python."""
    code = "import runpy, sys; sys.argv=['setup.py', '--name']; runpy.run_path('setup.py', run_name='__main__')"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    if torch.version.cuda is None:
        notices = [line for line in r.stderr.splitlines() if line.startswith("autoaccum:")]
        assert len(notices) == 1 and "pure Python" in notices[0], r.stderr


def _ident(tensors):
    return (torch.tensor([id(t) for t in tensors], dtype=torch.int64),
            torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64))


def test_same_tensors_sees_identity_order_and_memory(host_binding):
    """The binding's cache check: SAME only for the very same tensors, in order, at their addresses;
    MOVED for the same tensors with memory moved under them (the entry must go)."""
    same, SAME, OTHER, MOVED = (host_binding.same_tensors, host_binding.SAME, host_binding.OTHER,
                                host_binding.MOVED)
    assert (SAME, OTHER, MOVED) == (group.SAME, group.OTHER, group.MOVED)
    flat = torch.randn(40)
    ts = [flat[:10], flat[10:], torch.randn(3, 4).t(), torch.empty(0)]
    ids, ptrs = _ident(ts)
    assert same(ts, ids, ptrs) == SAME and same(tuple(ts), ids, ptrs) == SAME
    assert same(ts[::-1], ids, ptrs) == OTHER                 # order
    assert same(ts[:3], ids, ptrs) == OTHER                   # length
    assert same([flat[:10]] + ts[1:], ids, ptrs) == OTHER     # an equal view, another object
    assert same(ts[:3] + [None], ids, ptrs) == OTHER
    assert same(iter(ts), ids, ptrs) == OTHER                 # neither list nor tuple: never vouched for
    assert same(type("L", (list,), {})(ts), ids, ptrs) == OTHER   # a subclass may show other items
    ts[1].data = torch.randn(30)                              # same object, new memory (a later view)
    assert same(ts, ids, ptrs) == MOVED
    assert same(ts, *_ident(ts)) == SAME
    with pytest.raises(RuntimeError, match="ids and ptrs must be 1-D contiguous int64 CPU tensors"):
        same(ts, ids.int(), ptrs)
    with pytest.raises(RuntimeError, match="of one length"):
        same(ts, ids, ptrs[:2])


def test_same_tensors_makes_a_copy_on_write_tensor_take_its_own_memory(host_binding):
    """The kernels write what it vouches for: a lazily cloned tensor's shared memory must not be it."""
    lazy_clone = getattr(torch, "_lazy_clone", None)
    if lazy_clone is None:
        pytest.skip("this torch has no copy-on-write clones")
    x = torch.randn(64)
    ids, ptrs = _ident([x])
    y = lazy_clone(x)
    assert host_binding.same_tensors([x], ids, ptrs) == host_binding.MOVED
    assert x.data_ptr() != y.data_ptr()
