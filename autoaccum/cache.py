"""The probe cache: a hint that saves trials, never the truth.

An entry maps a fingerprint of everything that changes a step's memory to the answer of an
earlier probe: the micro-batch, the peak its trial measured and the fitted memory model. The
probe never trusts it blindly: it runs one real trial at the cached size, and uses the entry
only when that trial fits and its peak is within a few percent of the cached one; otherwise
it searches again, starting from that trial. So a fingerprint that misses a change costs one
trial, never a micro-batch that does not fit.

The fingerprint still tries hard to miss nothing: parameter and buffer shapes, module settings,
config objects held by modules (Hugging Face's ``model.config`` with its private
``_attn_implementation``, a dataclass passed to the constructor), the code of every class in
the model and of the functions and constants its methods reach, the sample's shapes, the
optimizer, autocast, the device and the limit. Code is fingerprinted by its bytecode, so
classes loaded from a file path (where ``inspect.getsource`` fails) are covered too.

The file is JSON, written atomically (a temporary file renamed over it) under an exclusive
``fcntl`` lock, so concurrent writers (ranks, parallel jobs) never lose each other's entries.
Entries are validated when read; anything malformed is a miss, and eviction drops it first.
"""
from __future__ import annotations

import contextlib
import dataclasses
import enum
import functools
import hashlib
import json
import math
import os
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any

import torch
from torch import nn

VERSION = 4   # bumped whenever a trial measures differently (4: CUDA trials replay two micro-batches)
MAX_ENTRIES = 256
_PLAIN = (type(None), bool, int, float, str)


# ---------------------------------------------------------------- where
def cache_dir() -> Path:
    """``$AUTOACCUM_CACHE_DIR``, else ``$XDG_CACHE_HOME/autoaccum``, else ``~/.cache/autoaccum``."""
    env = os.environ.get("AUTOACCUM_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "autoaccum"


def cache_file() -> Path:
    return cache_dir() / "probe-cache.json"


# ---------------------------------------------------------------- what
def fingerprint(**parts: Any) -> str:
    """A short stable hash of ``parts`` (already made JSON-friendly by the helpers below)."""
    blob = json.dumps({"version": VERSION, "torch": torch.__version__, **parts}, sort_keys=True, default=repr)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def describe_model(model: nn.Module) -> list:
    """Structure, shapes, dtypes, settings, config objects and code of ``model``, and the versions of
    the libraries its classes come from."""
    code = _CodePrints()
    modules = []
    libraries: dict[str, str | None] = {}
    for name, m in model.named_modules():
        code.add_class(type(m))
        modules.append([name, qualname(type(m)), m.training, module_settings(m, code)])
        for klass in type(m).__mro__:
            if _library(klass):
                top = (klass.__module__ or "").split(".")[0]
                libraries[top] = str(getattr(sys.modules.get(top), "__version__", None))
    return [
        sorted(libraries.items()),
        [[n, list(p.shape), str(p.dtype), p.requires_grad] for n, p in model.named_parameters()],
        [[n, list(b.shape), str(b.dtype)] for n, b in model.named_buffers()],
        modules,
        code.digest(),
    ]


def describe_callable(fn: Any) -> list | None:
    """A ``loss_fn``/``count_fn``/``sample(n)``: its name and the code it reaches."""
    if fn is None:
        return None
    code = _CodePrints()
    code.add(fn)
    return [qualname(fn), code.digest()]


def describe_optimizer(optimizer: Any) -> list | None:
    if optimizer is None:
        return None
    code = _CodePrints()
    code.add_class(type(optimizer))
    groups = [{k: _plain(v, depth=1) for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    return [qualname(type(optimizer)), groups, len(optimizer.state) > 0, code.digest()]


def module_settings(module: nn.Module, code: _CodePrints | None = None) -> dict:
    """A module's public plain settings (``p`` of dropout, ``eps``, ``gradient_checkpointing``...)
    and the contents of any config object it holds: flags that change memory without changing
    a parameter's shape."""
    out = {}
    for k, v in vars(module).items():
        if k in ("_parameters", "_buffers", "_modules") or k.startswith("_forward") or k.startswith("_backward"):
            continue
        if k.startswith("_") and isinstance(v, (dict, list, tuple, set)) and not v:
            continue
        if isinstance(v, (torch.Tensor, nn.Module)) or (callable(v) and not isinstance(v, type)):
            continue
        config = _is_config(v)
        if k.startswith("_") and not config:
            continue
        out[k] = _plain(v, depth=3)
        if code is not None and config:
            code.add_class(type(v))
    return out


def _is_config(v: Any) -> bool:
    """A configuration object: a dataclass, a namespace, or any plain object with ``to_dict``/attributes."""
    if isinstance(v, _PLAIN) or isinstance(v, (torch.Tensor, nn.Module, type, types.ModuleType)):
        return False
    return dataclasses.is_dataclass(v) or hasattr(v, "to_dict") or hasattr(v, "__dict__")


def _plain(v: Any, depth: int) -> Any:
    """``v`` as JSON-friendly data, config objects opened up to ``depth`` levels (their private fields too)."""
    if isinstance(v, float) and not math.isfinite(v):
        return repr(v)
    if isinstance(v, _PLAIN):
        return v
    if isinstance(v, enum.Enum):
        return f"{qualname(type(v))}.{v.name}"
    if isinstance(v, (torch.dtype, torch.device, torch.Size)):
        return str(v)
    if isinstance(v, torch.Tensor):
        return ["tensor", list(v.shape), str(v.dtype)] if v.numel() > 1 else ["tensor", v.item()]
    if depth <= 0:
        return qualname(type(v))
    if isinstance(v, (list, tuple, set, frozenset)):
        items = [_plain(x, depth - 1) for x in v]
        return sorted(items, key=repr) if isinstance(v, (set, frozenset)) else items
    if isinstance(v, dict):
        return {str(k): _plain(x, depth - 1) for k, x in v.items()}
    if isinstance(v, (nn.Module, type, types.ModuleType)) or callable(v):
        return qualname(v)
    if dataclasses.is_dataclass(v):
        return [qualname(type(v)), {f.name: _plain(getattr(v, f.name, None), depth - 1)
                                    for f in dataclasses.fields(v)}]
    if hasattr(v, "__dict__"):
        return [qualname(type(v)), {k: _plain(x, depth - 1) for k, x in vars(v).items()}]
    return repr(v)


class _CodePrints:
    """Bytecode fingerprints of classes and functions, following the module-level names their code
    reads (helpers, classes, constants) through their globals, within the user's code."""

    def __init__(self, max_items: int = 400):
        self.prints: dict[str, str] = {}
        self._seen: set[int] = set()
        self.max_items = max_items

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(sorted(self.prints.items())).encode()).hexdigest()[:16]

    def add_class(self, cls: type) -> None:
        for klass in cls.__mro__:
            if _library(klass) or id(klass) in self._seen:
                continue
            self._seen.add(id(klass))
            for name, attr in sorted(vars(klass).items()):
                for fn in (getattr(attr, "__func__", None), getattr(attr, "fget", None), attr):
                    if isinstance(fn, types.FunctionType):
                        self._function(fn, f"{qualname(klass)}.{name}")

    def add(self, obj: Any) -> None:
        if isinstance(obj, type):
            self.add_class(obj)
        elif isinstance(obj, types.FunctionType):
            self._function(obj, qualname(obj))
        elif isinstance(obj, types.MethodType):
            self.add(obj.__func__)
        elif isinstance(obj, functools.partial):
            self.add(obj.func)
        elif callable(obj) and not _library(type(obj)):
            self.add_class(type(obj))             # a callable object: its class's __call__

    def _function(self, fn: types.FunctionType, label: str) -> None:
        if id(fn) in self._seen or len(self.prints) >= self.max_items or _library(fn):
            return
        self._seen.add(id(fn))
        self.prints[label] = _code_hash(fn.__code__) + "/" + repr(_plain(fn.__defaults__, depth=1))
        for cell in fn.__closure__ or ():
            with contextlib.suppress(ValueError):      # an empty cell
                self._reached(f"{label}.<closure>", cell.cell_contents)
        for name in sorted(_global_names(fn.__code__)):
            if name in fn.__globals__:
                self._reached(f"{label}:{name}", fn.__globals__[name])

    def _reached(self, label: str, value: Any) -> None:
        if isinstance(value, (types.FunctionType, type)):
            self.add(value)
        elif isinstance(value, _PLAIN) or isinstance(value, (tuple, frozenset)):
            self.prints[label] = repr(_plain(value, depth=2))


def _library(obj: Any) -> bool:
    """Code we do not fingerprint by bytecode: Python itself, torch, numpy, autoaccum and other
    installed libraries (:func:`describe_model` keys on their versions instead; user code is what
    changes between runs)."""
    module = getattr(obj, "__module__", None) or ""
    top = module.split(".")[0]
    return top in ("builtins", "torch", "numpy", "typing", "abc", "collections", "functools", "autoaccum",
                   "transformers", "accelerate", "lightning", "pytorch_lightning", "triton", "math", "enum")


def _global_names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _global_names(const)
    return names


def _code_hash(code: types.CodeType) -> str:
    """Bytecode, constants and names of ``code`` and its nested functions; no file names or line
    numbers, so moving a file does not miss the cache but changing one instruction does."""
    h = hashlib.sha256()

    def feed(c: types.CodeType) -> None:
        h.update(c.co_code)
        h.update(repr(c.co_names).encode())
        h.update(repr(c.co_varnames).encode())
        for const in c.co_consts:
            if isinstance(const, types.CodeType):
                feed(const)
            else:
                h.update(repr(const).encode())
    feed(code)
    return h.hexdigest()[:16]


def qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__qualname__)}"


# ---------------------------------------------------------------- entries
def valid_entry(entry: Any, cap: int) -> bool:
    """Is ``entry`` a well-formed probe result whose answer is usable under ``cap``?"""
    try:
        best = entry["max_micro_batch"]
        if not _int(best) or not 1 <= best <= cap:
            return False
        if not _int(entry["limit_bytes"]) or entry["limit_bytes"] <= 0:
            return False
        if not _int(entry["headroom_bytes"]) or entry["headroom_bytes"] < 0:
            return False
        if not isinstance(entry["device"], dict) or not isinstance(entry.get("notes", []), list):
            return False
        trials = entry["trials"]
        if not isinstance(trials, list) or not trials:
            return False
        for t in trials:
            if not _int(t["micro_batch"]) or t["micro_batch"] < 1 or not isinstance(t["fits"], bool):
                return False
            for k in ("peak_bytes", "base_bytes", "forward_backward_bytes", "step_bytes"):
                if t.get(k) is not None and (not _int(t[k]) or t[k] < 0):
                    return False
            if not isinstance(t.get("seconds", 0.0), (int, float)) or not isinstance(t.get("oom", False), bool):
                return False
        if not any(t["fits"] and t["micro_batch"] == best and t.get("peak_bytes") is not None for t in trials):
            return False     # the answer must be a size that was measured to fit
        model = entry.get("memory_model")
        if model is not None:
            if set(model) != {"fixed_bytes", "per_sample_bytes", "step_bytes"}:
                return False
            if not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
                       for x in model.values()):
                return False
            limit = entry["limit_bytes"]      # a real model's numbers are bytes on this device
            if not (0 <= model["per_sample_bytes"] <= limit and abs(model["fixed_bytes"]) <= limit
                    and 0 <= model["step_bytes"] <= limit):
                return False
        return True
    except (KeyError, TypeError, AttributeError, ValueError, OverflowError):
        return False


def _int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def load(key: str, cap: int) -> dict | None:
    """The valid entry stored under ``key``, or None."""
    entry = _read_all().get(key)
    return entry if valid_entry(entry, cap) else None


def store(key: str, entry: dict) -> None:
    """Add ``entry`` under ``key``: locked read-modify-write, atomic replace, newest 256 kept.
    A cache that cannot be written (read-only home, full disk) is no reason to fail training."""
    path = cache_file()
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with _locked(path):
            data = _read_all()
            data[key] = dict(entry, stored_at=time.time())
            if len(data) > MAX_ENTRIES:
                for old in sorted(data, key=lambda k: _stored_at(data[k]))[: len(data) - MAX_ENTRIES]:
                    del data[old]
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".probe-cache.", suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                json.dump(data, f)
            os.replace(tmp, path)
            tmp = None
    except OSError:
        pass
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def _stored_at(entry: Any) -> float:
    """Eviction order; anything malformed is oldest, so it goes first."""
    value = entry.get("stored_at") if isinstance(entry, dict) else None
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else float("-inf")


def _read_all() -> dict:
    """Every entry, or nothing: an unreadable file (binary, truncated, nested past the parser's
    recursion limit, a directory) is a miss like any other."""
    try:
        with open(cache_file()) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except Exception:  # noqa: BLE001 - the cache is a hint; no file may stop a probe
        return {}


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive lock on ``path``'s sibling lock file (where ``fcntl`` exists)."""
    try:
        import fcntl
    except ImportError:       # Windows: the atomic replace alone still never leaves a torn file
        yield
        return
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
