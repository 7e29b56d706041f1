"""Device memory: how much there is, whether an error means "out of memory", and cleanup after one.

Classification and cleanup are separate, small functions (the Lightning/Accelerate habit): the
probe and the trainer decide *what* to do; this module only answers *what happened* and frees.
"""
from __future__ import annotations

import gc
import os
import sys
import traceback
from dataclasses import dataclass, field

import torch

CPU_BUDGET_FRACTION = 0.5   # default usable share of available RAM when the device is the CPU


class NotEnoughMemoryError(RuntimeError):
    """Even a micro-batch of one sample does not fit; says how much was needed and available."""


def format_bytes(n: float) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


# ---------------------------------------------------------------- is this an out-of-memory error?
def is_cuda_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc) and
        any(k in str(exc) for k in ("CUDA", "HIP", "MPS", "XPU")))


def is_cublas_alloc_failure(exc: BaseException) -> bool:
    return isinstance(exc, RuntimeError) and "CUBLAS_STATUS_ALLOC_FAILED" in str(exc)


def is_cudnn_alloc_failure(exc: BaseException) -> bool:
    """cuDNN reports a failed workspace allocation as ALLOC_FAILED, or as NOT_SUPPORTED with this hint."""
    msg = str(exc)
    return isinstance(exc, RuntimeError) and (
        "CUDNN_STATUS_ALLOC_FAILED" in msg or
        ("CUDNN_STATUS_NOT_SUPPORTED" in msg and "non-contiguous input" in msg))


def is_cpu_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, MemoryError) or (
        isinstance(exc, RuntimeError) and "DefaultCPUAllocator: can't allocate memory" in str(exc))


def is_oom_error(exc: BaseException) -> bool:
    """True when ``exc`` means the device (or host) ran out of memory; anything else is a real error."""
    return (is_cuda_out_of_memory(exc) or is_cublas_alloc_failure(exc) or is_cudnn_alloc_failure(exc)
            or is_cpu_out_of_memory(exc))


def oom_message(exc: BaseException, limit: int = 300) -> str:
    """``Type: first line`` of an out-of-memory error, for logs and trial records (the message may be empty)."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:limit] if lines else ''}".rstrip(": ")


def drop_traceback(exc: BaseException) -> None:
    """Release the tensors an exception's traceback keeps alive through its frames' locals."""
    tb = exc.__traceback__
    if tb is not None:
        traceback.clear_frames(tb)
    exc.__traceback__ = None
    if getattr(sys, "last_traceback", None) is tb:
        sys.last_traceback = None


def release_memory(device: torch.device | None = None) -> None:
    """After an OOM: collect garbage (frames, autograd graphs) and return cached blocks to the driver."""
    gc.collect()
    if torch.cuda.is_available() and (device is None or device.type == "cuda"):
        torch.cuda.empty_cache()


# ---------------------------------------------------------------- how much memory is there?
@dataclass
class DeviceReading:
    """What one look at a device's memory found, and where each number came from."""

    device: str
    name: str
    total_bytes: int
    usable_bytes: int           # what this process may fill: the probe's limit before any budget
    sources: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"device": self.device, "name": self.name, "total_bytes": self.total_bytes,
                "usable_bytes": self.usable_bytes, "sources": self.sources, "notes": list(self.notes)}


def read_device(device: torch.device) -> DeviceReading:
    """Total and usable memory of ``device``: CUDA via torch and NVML, the CPU via /proc/meminfo."""
    if device.type == "cuda":
        return _read_cuda(device)
    if device.type == "cpu":
        return _read_cpu()
    return DeviceReading(str(device), device.type, 0, 0,
                         notes=[f"no memory reading for {device.type}; pass memory_budget="])


def _read_cuda(device: torch.device) -> DeviceReading:
    index = device.index if device.index is not None else torch.cuda.current_device()
    free, total = torch.cuda.mem_get_info(index)
    reserved = torch.cuda.memory_reserved(index)
    usable = free + reserved  # blocks torch already holds are reusable by us
    sources: dict = {"torch": {"free": free, "total": total, "reserved_by_torch": reserved,
                               "allocated_by_torch": torch.cuda.memory_allocated(index)}}
    notes: list[str] = []
    fraction = torch.cuda.get_per_process_memory_fraction(index)
    if fraction < 1.0:
        capped = int(fraction * total)
        sources["torch"]["per_process_memory_fraction"] = fraction
        if capped < usable:
            usable = capped
            notes.append(f"capped by torch.cuda.set_per_process_memory_fraction({fraction:g})")
    nvml = read_nvml(index)
    if "error" in nvml:
        notes.append(f"NVML unavailable ({nvml['error']}); using torch.cuda.mem_get_info only")
    else:
        sources["nvml"] = nvml
        # NVML sees other processes and the CUDA contexts too; trust the smaller free figure.
        if nvml["free"] + reserved < usable:
            usable = nvml["free"] + reserved
            notes.append("NVML reports less free memory than torch; using NVML's figure")
    return DeviceReading(str(torch.device("cuda", index)), torch.cuda.get_device_name(index), total,
                         usable, sources, notes)


def read_nvml(index: int) -> dict:
    """NVML's view of one GPU (imported lazily; the package is ``nvidia-ml-py``)."""
    try:
        import pynvml
    except ImportError:
        return {"error": "nvidia-ml-py is not installed"}
    try:
        pynvml.nvmlInit()
        try:
            uuid = torch.cuda.get_device_properties(index).uuid
            handle = None
            if uuid is not None:
                try:
                    handle = pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}")
                except pynvml.NVMLError:
                    handle = None
            if handle is None:  # CUDA_VISIBLE_DEVICES may reorder; UUID lookup is the reliable path
                handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            info = pynvml.nvmlDeviceGetMemoryInfo(handle)
            try:
                procs = pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
                others = sum((p.usedGpuMemory or 0) for p in procs if p.pid != os.getpid())
            except pynvml.NVMLError:
                others = None
            return {"free": int(info.free), "used": int(info.used), "total": int(info.total),
                    "used_by_other_processes": others,
                    "driver": _text(pynvml.nvmlSystemGetDriverVersion())}
        finally:
            pynvml.nvmlShutdown()
    except Exception as e:  # NVML missing driver, permissions, containers: degrade to torch
        return {"error": f"{type(e).__name__}: {e}"}


def _text(x) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def _read_cpu() -> DeviceReading:
    total, available = _meminfo()
    usable = int(available * CPU_BUDGET_FRACTION)
    return DeviceReading("cpu", "cpu", total, usable, {"meminfo": {"total": total, "available": available}})


def _meminfo() -> tuple[int, int]:
    try:
        with open("/proc/meminfo") as f:
            fields = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if ":" in line}
        return fields["MemTotal"], fields.get("MemAvailable", fields["MemFree"])
    except (OSError, KeyError, ValueError):
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        avail = os.sysconf("SC_AVPHYS_PAGES") if hasattr(os, "sysconf") else pages
        return pages * size, avail * size
