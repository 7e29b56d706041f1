"""The probe cache is a hint, never the truth: every way an entry can be stale or damaged costs at
most one trial, never a micro-batch that does not fit."""
import importlib.util
import json
import multiprocessing
import os
import textwrap
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import autoaccum
from autoaccum import cache
from helpers import mlp, mse_loss, regression_batch


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOACCUM_CACHE_DIR", str(tmp_path))
    return tmp_path


class Counting:
    """An mse loss_fn that counts its calls: one call per trial."""

    def __init__(self):
        self.calls = 0

    def __call__(self, model, batch):
        self.calls += 1
        return mse_loss(model, batch)


def probe(model, loss_fn=mse_loss, sample=None, **kw):
    args = dict(loss_fn=loss_fn, memory_budget="4MiB", max_micro_batch=1 << 14) | kw
    return autoaccum.probe(model, sample if sample is not None else regression_batch(4, torch.float32, d_in=32),
                           **args)


def truth(model, **kw):
    """The answer of a fresh probe that neither reads nor writes the cache."""
    return probe(model, cache=False, **kw).max_micro_batch


# ---------------------------------------------------------------- hits, misses, confirmation
def test_a_hit_costs_one_confirming_trial(cache_dir):
    model = mlp(torch.float32, d_in=32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss = Counting()
    first = probe(model, loss, optimizer=opt)
    assert not first.from_cache and loss.calls == len(first.trials) >= 3
    assert (cache_dir / "probe-cache.json").exists()
    loss.calls = 0
    again = probe(model, loss, optimizer=opt)
    assert again.from_cache and loss.calls == 1 and len(again.trials) == 1
    assert again.max_micro_batch == first.max_micro_batch and again.trials[0].micro_batch == first.max_micro_batch
    assert any("confirmed by one trial" in n for n in again.notes)
    assert len(opt.state) == 0, "the confirmation trial is restored like any other"


@pytest.mark.parametrize("change", [dict(memory_budget="8MiB"), dict(amp_dtype=torch.bfloat16),
                                    dict(max_micro_batch=100)])
def test_arguments_that_change_the_answer_miss(cache_dir, change):
    model = mlp(torch.float32, d_in=32)
    probe(model)
    assert not probe(model, **change).from_cache


def test_cache_false_reads_and_writes_nothing(cache_dir):
    model = mlp(torch.float32, d_in=32)
    probe(model, cache=False)
    assert not any(cache_dir.iterdir())
    probe(model)
    assert not probe(model, cache=False).from_cache


def test_settings_that_change_memory_but_no_shape_miss(cache_dir):
    """e.g. Hugging Face's gradient_checkpointing flag: same parameters, very different activations."""
    model = mlp(torch.float32, d_in=32)
    model.gradient_checkpointing = False
    assert not probe(model).from_cache and probe(model).from_cache
    model.gradient_checkpointing = True
    assert not probe(model).from_cache
    model[1].training = False                       # one submodule switched to eval
    assert not probe(model).from_cache


@dataclass
class Cfg:
    expand: int


class Widening(nn.Module):
    """Activations grow with ``cfg.expand``; no parameter shape does."""

    def __init__(self, cfg: Cfg):
        super().__init__()
        self.cfg = cfg
        self.lin = nn.Linear(32, 5)

    def forward(self, x):
        return self.lin(x.repeat(1, self.cfg.expand).view(len(x), self.cfg.expand, 32).tanh()).mean(1)


def test_a_changed_config_object_misses(cache_dir):
    probe(Widening(Cfg(1)))
    wide = Widening(Cfg(16))
    result = probe(wide)
    assert not result.from_cache and result.max_micro_batch == truth(wide)


class HFConfig:
    """Like transformers' PretrainedConfig: the attention kernel is a private field."""

    def __init__(self, attn: str):
        self._attn_implementation = attn


class Attention(nn.Module):
    def __init__(self, attn: str):
        super().__init__()
        self.config = HFConfig(attn)
        self.proj = nn.Linear(32, 5)

    def forward(self, x):
        seq = x.view(len(x), 8, 4).repeat(1, 8, 1)                     # (n, 64, 4)
        if self.config._attn_implementation == "eager":                  # materialises n x 64 x 64 scores
            seq = (seq @ seq.transpose(1, 2)).softmax(-1) @ seq
        return self.proj(seq.reshape(len(x), -1, 32).mean(1))


def test_a_hugging_face_style_config_read_in_forward_misses(cache_dir):
    probe(Attention("sdpa"))
    eager = Attention("eager")
    result = probe(eager)
    assert not result.from_cache and result.max_micro_batch == truth(eager)


MODEL_FILE = """
import torch
from torch import nn

REPEAT = {repeat}


def widen(x):
    return x.repeat(1, {helper})


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(32, 5)

    def forward(self, x):
        return self.lin(widen(x).view(len(x), -1, 32).{activation}()).mean(1) * REPEAT


def build():
    return Net()
"""


def load_file_model(path, **code):
    """A model class loaded from a file path, never registered in sys.modules (as the CLI's
    ``--model ./x.py:build`` does): ``inspect.getsource`` cannot read it."""
    path.write_text(textwrap.dedent(MODEL_FILE.format(**({"repeat": 1, "helper": 1, "activation": "tanh"} | code))))
    spec = importlib.util.spec_from_file_location("user_models", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build()


@pytest.mark.parametrize("change", [dict(helper=12), dict(activation="exp"), dict(repeat=2)],
                         ids=["module-level helper", "forward", "module-level constant"])
def test_changed_code_in_a_file_path_model_misses(cache_dir, tmp_path, change):
    first = load_file_model(tmp_path / "x.py")
    probe(first)
    assert probe(load_file_model(tmp_path / "x.py")).from_cache, "the same code hits"
    changed = load_file_model(tmp_path / "x.py", **change)
    result = probe(changed)
    assert not result.from_cache and result.max_micro_batch == truth(changed)


def test_a_stale_entry_under_the_same_key_costs_one_trial_never_a_size_that_does_not_fit(cache_dir, monkeypatch):
    """Even when the fingerprint misses a change entirely, the confirmation trial catches it."""
    monkeypatch.setattr(cache, "fingerprint", lambda **parts: "one-key-for-everything")
    small = probe(Widening(Cfg(1)))
    wide = Widening(Cfg(16))
    loss = Counting()
    result = probe(wide, loss)
    assert not result.from_cache
    assert result.trials[0].micro_batch == small.max_micro_batch and not result.trials[0].fits
    assert result.max_micro_batch <= truth(wide) < small.max_micro_batch
    assert len(result.trials) <= autoaccum.probe.__kwdefaults__["max_trials"]
    assert any("no longer fits" in n or "out of memory" in n for n in result.notes)


def test_an_entry_whose_peak_drifted_is_probed_again(cache_dir, monkeypatch):
    """Smaller now (less memory per sample): the cached size fits, but more would, so probe again."""
    monkeypatch.setattr(cache, "fingerprint", lambda **parts: "one-key-for-everything")
    probe(Widening(Cfg(16)))
    narrow = Widening(Cfg(2))
    result = probe(narrow)
    assert not result.from_cache and result.trials[0].fits
    assert result.max_micro_batch > result.trials[0].micro_batch
    assert any("off the cached" in n for n in result.notes)


# ---------------------------------------------------------------- damaged files and entries
def stored(cache_dir) -> dict:
    return json.loads((cache_dir / "probe-cache.json").read_text())


@pytest.mark.parametrize("damage", [
    lambda e: e.update(max_micro_batch=-3),
    lambda e: e.update(max_micro_batch="12"),
    lambda e: e.update(max_micro_batch=True),
    lambda e: e["trials"][-1].update(peak_bytes="abc"),
    lambda e: e.update(trials="none"),
    lambda e: e.update(trials=[]),
    lambda e: e.update(memory_model={"fixed_bytes": "x"}),
    lambda e: e.pop("limit_bytes"),
    lambda e: e.update(max_micro_batch=e["max_micro_batch"] + 1),   # an answer no trial measured
    lambda e: e["memory_model"].update(per_sample_bytes=10 ** 400),  # too big for a float
    lambda e: e["memory_model"].update(per_sample_bytes=1e306),      # finite, but no device has it
], ids=["negative", "string", "bool", "peak abc", "trials not a list", "no trials", "bad model", "missing field",
        "unmeasured answer", "huge int", "absurd slope"])
def test_a_damaged_entry_is_a_miss(cache_dir, damage):
    model = mlp(torch.float32, d_in=32)
    good = probe(model)
    data = stored(cache_dir)
    damage(data[good.cache_key])
    (cache_dir / "probe-cache.json").write_text(json.dumps(data))
    again = probe(model)
    assert not again.from_cache and again.max_micro_batch == good.max_micro_batch


@pytest.mark.parametrize("content", ["[" * 100000 + "]" * 100000, "\x00\xff garbage", '{"a": 1', "[]"],
                         ids=["nested past the parser's recursion limit", "binary", "truncated", "not a mapping"])
def test_an_unreadable_cache_file_is_a_miss(cache_dir, content):
    (cache_dir / "probe-cache.json").write_text(content)
    model = mlp(torch.float32, d_in=32)
    assert not probe(model).from_cache
    assert probe(model).from_cache, "the next write replaced the bad file"


def test_a_cached_size_above_the_cap_is_never_returned(cache_dir):
    model = mlp(torch.float32, d_in=32)
    good = probe(model, max_micro_batch=64)
    assert good.max_micro_batch == 64
    data = stored(cache_dir)
    entry = data[good.cache_key]
    entry["max_micro_batch"] = 5000
    entry["trials"][-1].update(micro_batch=5000, fits=True)
    (cache_dir / "probe-cache.json").write_text(json.dumps(data))
    again = probe(model, max_micro_batch=64)
    assert again.max_micro_batch <= 64 and not again.from_cache


def test_the_cli_survives_a_damaged_entry(cache_dir, tmp_path):
    """A cached ``"peak_bytes": "abc"`` once crashed ``autoaccum probe``."""
    from autoaccum.cli import main
    (tmp_path / "m.py").write_text(textwrap.dedent("""
        import torch, torch.nn.functional as F
        def build():
            return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 5))
        def sample(n):
            return torch.randn(n, 32), torch.randn(n, 5)
        def loss(model, batch):
            return F.mse_loss(model(batch[0]), batch[1])
    """))
    args = ["probe", "--model", f"{tmp_path}/m.py:build", "--sample", f"{tmp_path}/m.py:sample",
            "--loss", f"{tmp_path}/m.py:loss", "--target-batch", "256", "--memory-budget", "4MiB", "--device", "cpu"]
    assert main(args) == 0
    data = stored(cache_dir)
    for entry in data.values():
        for t in entry["trials"]:
            t["peak_bytes"] = "abc"
    (cache_dir / "probe-cache.json").write_text(json.dumps(data))
    assert main(args) == 0


def test_eviction_survives_malformed_entries_and_keeps_the_newest(cache_dir):
    junk = {f"junk{i}": ("str" if i % 3 == 0 else {"stored_at": "soon"} if i % 3 == 1 else [i]) for i in range(300)}
    (cache_dir / "probe-cache.json").write_text(json.dumps(junk))
    model = mlp(torch.float32, d_in=32)
    result = probe(model)
    data = stored(cache_dir)
    assert len(data) == cache.MAX_ENTRIES and result.cache_key in data
    assert probe(model).from_cache


def test_a_failed_write_leaves_no_temporary_file(cache_dir, monkeypatch):
    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(cache.json, "dump", disk_full)
    probe(mlp(torch.float32, d_in=32))                       # training goes on: the cache is a hint
    assert [p.name for p in cache_dir.iterdir() if p.name.endswith(".tmp")] == []
    assert not (cache_dir / "probe-cache.json").exists()


def _write_many(args):
    directory, worker, barrier = args
    os.environ["AUTOACCUM_CACHE_DIR"] = directory
    barrier.wait()
    for i in range(20):
        cache.store(f"w{worker}-{i}", {"max_micro_batch": i + 1})


def test_concurrent_writers_lose_no_entry(cache_dir):
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(10)
    procs = [ctx.Process(target=_write_many, args=((str(cache_dir), w, barrier),)) for w in range(10)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    data = stored(cache_dir)
    assert {f"w{w}-{i}" for w in range(10) for i in range(20)} <= set(data)
    assert [p.name for p in cache_dir.iterdir() if p.name.endswith(".tmp")] == []


class Hostile:
    """A config-like object whose attributes cannot be read."""

    def __init__(self):
        self.ok = 1

    def __repr__(self):
        raise RuntimeError("no repr for you")

    @property
    def __dict__(self):
        raise RuntimeError("no attributes for you")


def test_a_model_that_cannot_be_fingerprinted_is_probed_without_the_cache(cache_dir):
    model = mlp(torch.float32, d_in=32)
    model.settings = Hostile()
    result = probe(model)
    assert result.max_micro_batch > 1 and result.cache_key is None
    assert any("probe cache is off" in n for n in result.notes)
    assert not (cache_dir / "probe-cache.json").exists()
