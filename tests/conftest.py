import os
import sys
from pathlib import Path

# Triton decorates kernels at import time; the interpreter must be chosen before that.
os.environ.setdefault("TRITON_INTERPRET", "1")

# The independent ruler and the anchors' searches live with the benchmarks; tests use them too.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU; skipped without one")
    config.addinivalue_line("markers", "slow: takes more than a few seconds")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _private_probe_cache(tmp_path, monkeypatch):
    """Each test gets its own probe cache, so no test reads another's results or the user's."""
    monkeypatch.setenv("AUTOACCUM_CACHE_DIR", str(tmp_path / "autoaccum-cache"))
