import pytest
import torch

from autoaccum.checks import parse_bytes
from autoaccum.memory import (format_bytes, is_cpu_out_of_memory, is_cuda_out_of_memory, is_cudnn_alloc_failure,
                              is_oom_error, read_device)
from autoaccum.tracker import LiveBytes
from autoaccum.memory import CPU_BUDGET_FRACTION


@pytest.mark.parametrize("exc, oom", [
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
    (RuntimeError("CUDA out of memory. Tried to allocate 20.00 MiB (GPU 0; 79.1 GiB total capacity)"), True),
    (RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"), True),
    (RuntimeError("cuDNN error: CUDNN_STATUS_NOT_SUPPORTED. This error may appear if you passed in a "
                  "non-contiguous input."), True),
    (RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"), True),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
                  "you tried to allocate 40000000000000 bytes."), True),
    (MemoryError(), True),
    (RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x3 and 5x6)"), False),
    (RuntimeError("cuDNN error: CUDNN_STATUS_NOT_SUPPORTED"), False),
    (ValueError("out of memory"), False),
    (RuntimeError("CUDA error: an illegal memory access was encountered"), False),
])
def test_oom_classification(exc, oom):
    assert is_oom_error(exc) is oom


def test_a_real_cpu_allocation_failure_is_recognised():
    with pytest.raises(RuntimeError) as info:
        torch.empty(1 << 50, dtype=torch.uint8)
    assert is_cpu_out_of_memory(info.value) and not is_cuda_out_of_memory(info.value)
    assert not is_cudnn_alloc_failure(info.value)


@pytest.mark.parametrize("text, value", [("2GiB", 2 << 30), ("512 MiB", 512 << 20), ("80GB", 80 * 10**9),
                                         ("1.5gib", int(1.5 * (1 << 30))), (4096, 4096), ("100", 100)])
def test_parse_bytes(text, value):
    assert parse_bytes(text) == value


@pytest.mark.parametrize("bad, exc", [("2 gallons", ValueError), ("-1GiB", ValueError), (0, ValueError),
                                      (True, TypeError), ([1], TypeError)])
def test_parse_bytes_rejects(bad, exc):
    with pytest.raises(exc, match="memory_budget"):
        parse_bytes(bad)


def test_format_bytes():
    assert format_bytes(3 << 30) == "3.00 GiB" and format_bytes(1536) == "1.50 KiB" and format_bytes(7) == "7 B"


def test_cpu_reading_is_a_fraction_of_available_ram():
    r = read_device(torch.device("cpu"))
    assert 0 < r.usable_bytes < r.total_bytes
    assert r.usable_bytes == int(r.sources["meminfo"]["available"] * CPU_BUDGET_FRACTION)


def test_tracker_counts_live_storages_once():
    old = torch.empty(25)                                 # 100 bytes that exist before the tracker
    with LiveBytes([old]) as t:
        a = torch.empty(1000, dtype=torch.float32)        # 4000 bytes
        view = a[10:]                                     # a view: free
        a.add_(1)                                         # in place: free
        b = a * 2                                         # 4000 more
        assert t.current == 100 + 8000 and t.peak == 100 + 8000
        del b
        assert t.current == 100 + 4000 and t.peak == 100 + 8000
        t.reset_peak()
        assert t.peak == 100 + 4000
        del a
        assert t.current == 100 + 4000, "the view keeps the storage alive"
        del view
        assert t.current == 100


def test_tracker_never_counts_a_seeded_storage_twice():
    """The optimizer's in-place update returns the parameter: that is no new memory (it once
    counted every parameter a second time, so the probe under-sized parameter-heavy models)."""
    p = torch.nn.Parameter(torch.randn(1000))
    p.grad = torch.randn(1000)
    opt = torch.optim.SGD([p], lr=0.1, momentum=0.9)
    opt.step()                                            # momentum buffer exists before the tracker
    held = [p, p.grad, *opt.state[p].values()]
    with LiveBytes(held) as t:
        del held
        assert t.current == 3 * 4000
        for _ in range(3):
            opt.step()
        p.detach().mul_(2)
        p.data[:10].zero_()
        assert t.peak == 3 * 4000 and t.current == 3 * 4000
        p.grad = None                                     # a seeded storage that dies leaves the count
        assert t.current == 2 * 4000


def test_tracker_excludes_memory_outside_the_measurement():
    outside = torch.randn(500)                            # e.g. the host batch a trial slices from
    with LiveBytes() as t:
        tiled = outside.repeat(2)                         # made inside the mode: counted ...
        assert t.current == 4000
        t.exclude([tiled])                                # ... until excluded
        assert t.current == 0
        part = outside[:100] + 0                          # new memory made from it still counts
        view = tiled[:10]                                 # views of excluded memory stay free
        assert t.current == 400
        del part, view



def test_a_storage_that_grows_is_charged_its_growth():
    """``out=`` into a smaller tensor and ``resize_`` grow a storage after it was first seen."""
    b = torch.randn(1024)
    old = torch.empty(0)
    with LiveBytes() as t:
        out = torch.empty(0)
        torch.add(b, b, out=out)                          # grows from 0 to 4096 bytes
        assert t.current == 4096
        out.resize_(4096)                                 # 16384 bytes now
        assert t.current == 16384 and t.peak == 16384
        torch.add(b, b, out=old)                          # older than the mode: only its growth counts
        assert t.current == 16384 + 4096
        del out
        assert t.current == 4096
        del old
        assert t.current == 0
