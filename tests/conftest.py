import os
import sys
from pathlib import Path

import torch

# Triton decorates kernels at import time; the interpreter must be chosen before that, and only
# where there is no GPU: on a GPU the same tests must run the compiled kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
TRITON_ON_CPU = os.environ.get("TRITON_INTERPRET") == "1"   # Triton kernels can take CPU tensors

# The independent ruler and the anchors' searches live with the benchmarks; tests use them too.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU; skipped without one")
    config.addinivalue_line("markers", "slow: takes more than a few seconds")
    config.addinivalue_line("markers", "interpreter: runs Triton kernels on CPU tensors (TRITON_INTERPRET=1); "
                                       "on a GPU the compiled kernels are tested on CUDA tensors instead")


def pytest_collection_modifyitems(config, items):
    no_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    no_interpreter = pytest.mark.skip(reason="Triton on CPU tensors needs TRITON_INTERPRET=1 (the GPU tests "
                                             "run the compiled kernels)")
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(no_gpu)
        if "interpreter" in item.keywords and not TRITON_ON_CPU:
            item.add_marker(no_interpreter)


@pytest.fixture(autouse=True)
def _private_probe_cache(tmp_path, monkeypatch):
    """Each test gets its own probe cache, so no test reads another's results or the user's."""
    monkeypatch.setenv("AUTOACCUM_CACHE_DIR", str(tmp_path / "autoaccum-cache"))


@pytest.fixture(scope="session")
def host_binding():
    """csrc/bindings.cpp built for the CPU (~20 s once per machine), its accumulate launcher doing the
    work on host memory (tests/csrc/host_launchers.cpp): the binding's code, tested without a GPU."""
    import shutil

    from bench_host import host_binding as build
    if (shutil.which("c++") or shutil.which("g++")) is None or shutil.which("ninja") is None:
        pytest.skip("building the binding for the host needs a C++ compiler and ninja")
    module = build(compute=True)
    if isinstance(module, str):
        pytest.fail(f"csrc/bindings.cpp did not build for the host: {module}")
    return module
