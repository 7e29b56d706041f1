"""The kernels' per-list cache (kernels/group.py): found by identity, never stale, never holding memory."""
import gc
import weakref

import pytest
import torch

from autoaccum import kernels
from autoaccum.kernels import group


@pytest.fixture(autouse=True)
def empty_cache():
    kernels.forget()
    yield
    kernels.forget()


def views(sizes, gen):
    flat = torch.randn(sum(sizes), generator=gen)
    return list(torch.split(flat, sizes))


def count_builds(monkeypatch) -> list:
    built = []
    real = group.Facts.__init__

    def spy(self, tensors):
        built.append(len(tensors))
        real(self, tensors)

    monkeypatch.setattr(group.Facts, "__init__", spy)
    return built


def test_a_repeated_list_is_checked_once(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    accs = views([5, 17, 300], gen)
    grads = [torch.randn(a.shape, generator=gen).bfloat16() for a in accs]
    built = count_builds(monkeypatch)
    for _ in range(2):                         # first sighting: not kept; second: kept
        kernels.accumulate_(list(accs), list(grads), 0.5)
        kernels.finalize_(list(accs), 1.0, 10.0)
    before = len(built)
    for _ in range(5):                         # new list objects, same tensors: found again
        kernels.accumulate_(list(accs), list(grads), 0.5)
        kernels.finalize_(list(accs), 1.0, 10.0)
    assert len(built) == before


def test_the_cache_holds_no_tensor_and_forgets_freed_ones():
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(n, generator=gen) for n in (3, 4000)]
    accs = views([3, 4000], gen)
    key = group.key_of(grads)
    for _ in range(2):
        kernels.accumulate_(accs, grads, 1.0)        # the torch path: facts of the accumulators only
        group.facts_of(grads)                        # what the GPU paths look up for the gradients
    assert group.cached(key, grads) is not None
    ref = weakref.ref(grads[1])
    del grads
    gc.collect()
    assert ref() is None, "the cache kept a gradient alive"
    assert group.cached(key, []) is None, "a freed tensor's entry must go (its id may be reused)"


@pytest.mark.interpreter
def test_a_storage_reallocated_under_a_cached_list_is_noticed():
    """FSDP frees and re-allocates storages in place: same tensor objects, new addresses."""
    gen = torch.Generator().manual_seed(2)
    accs = views([7, 5000], gen)
    grads = [torch.randn(a.shape, generator=gen) for a in accs]
    for _ in range(2):
        kernels.accumulate_(accs, grads, 1.0, assign=True, backend="triton")
    key = group.key_of(grads)
    assert group.cached(key, grads) is not None
    old = grads[1].data_ptr()
    storage = grads[1].untyped_storage()
    nbytes = storage.nbytes()
    storage.resize_(0)
    blocker = torch.empty(nbytes // 4)         # takes the freed memory, so the storage moves
    storage.resize_(nbytes)
    grads[1].copy_(torch.arange(5000, dtype=torch.float32))
    moved = grads[1].data_ptr() != old
    if moved:
        assert group.cached(key, grads) is None
    kernels.accumulate_(accs, grads, 1.0, assign=True, backend="triton")
    assert torch.equal(accs[1], torch.arange(5000, dtype=torch.float32))
    assert torch.equal(accs[0], grads[0])
    del blocker


def test_a_bad_list_is_rejected_even_after_a_good_one_was_cached():
    gen = torch.Generator().manual_seed(3)
    accs = views([5, 6], gen)
    grads = [torch.randn(a.shape, generator=gen) for a in accs]
    for _ in range(3):
        kernels.accumulate_(accs, grads, 0.5)
    before = [a.clone() for a in accs]
    with pytest.raises(ValueError, match=r"accs\[1\] has shape \(6,\) but grads\[1\] has \(7,\)"):
        kernels.accumulate_(accs, [grads[0], torch.randn(7)], 0.5)
    with pytest.raises(TypeError, match=r"grads\[0\] is torch.int64"):
        kernels.accumulate_(accs, [grads[0].long(), grads[1]], 0.5)
    with pytest.raises(ValueError, match=r"accs\[1\] is on cpu but grads\[1\] is on meta"):
        kernels.accumulate_(accs, [grads[0], grads[1].to("meta")], 0.5)
    assert all(torch.equal(a, b) for a, b in zip(accs, before))


def test_none_gradients_in_a_list_that_is_otherwise_cached():
    gen = torch.Generator().manual_seed(4)
    accs = views([5, 6, 7], gen)
    grads = [torch.randn(a.shape, generator=gen) for a in accs]
    for _ in range(3):
        kernels.accumulate_(accs, grads, 1.0, assign=True)
    kernels.accumulate_(accs, [None, grads[1], None], 1.0)
    assert torch.equal(accs[0], grads[0]) and torch.equal(accs[1], 2 * grads[1])
    with pytest.raises(TypeError, match=r"grads\[2\]"):
        kernels.finalize_([None, grads[1], "x"])


def test_forget_drops_every_entry():
    grads = [torch.randn(3), torch.randn(4)]
    accs = [torch.zeros(3), torch.zeros(4)]
    for _ in range(2):
        kernels.accumulate_(accs, grads, 1.0)
    assert group.cached(group.key_of(accs), accs) is not None
    kernels.forget()
    assert group.cached(group.key_of(accs), accs) is None


@pytest.mark.interpreter
def test_fresh_gradients_whose_ids_are_reused_are_not_taken_for_a_repeat(monkeypatch):
    """Each micro-batch's gradients are new tensors, often at the ids of the last ones (freed just
    before): that must not make a cache entry (a weak reference per tensor) for them. The
    allocator's reuse is made certain here: every fresh list gets the same "ids"."""
    gen = torch.Generator().manual_seed(4)
    accs = views([5, 17, 300], gen)
    real_key = group.key_of
    fresh: list = []
    monkeypatch.setattr(group, "key_of", lambda ts: (-1, -2, -3) if any(t is f for t in ts for f in fresh) else real_key(ts))
    remembered = []
    real = group._remember
    monkeypatch.setattr(group, "_remember", lambda key, facts, ts: remembered.append(key) or real(key, facts, ts))
    for _ in range(6):
        fresh[:] = [torch.randn(a.shape, generator=gen) for a in accs]
        kernels.accumulate_(accs, list(fresh), 0.5, backend="triton")   # a path that looks the gradients up
        fresh.clear()                                  # the gradients die, their "ids" stay seen
    assert remembered == [real_key(accs)], "only the accumulators (a repeated list) are kept"


@pytest.fixture
def binding_loaded(host_binding, monkeypatch):
    """The cache as it runs where the CUDA extension is loaded: recall() checks in C++."""
    monkeypatch.setattr(kernels.cuda_ext, "_module", host_binding)
    return host_binding


def test_with_the_extension_a_repeated_list_is_recalled_in_one_check(binding_loaded, monkeypatch):
    gen = torch.Generator().manual_seed(5)
    accs = views([5, 17, 300], gen)
    grads = [torch.randn(a.shape, generator=gen) for a in accs]
    for _ in range(3):
        kernels.accumulate_(list(accs), list(grads), 0.5)
    facts = group.cached(group.key_of(accs), accs)
    assert facts is not None and group.recall(list(accs)) is facts and group.recall(tuple(accs)) is facts
    keys = []
    monkeypatch.setattr(group, "key_of", lambda ts: keys.append(len(ts)) or tuple(map(id, ts)))
    before = [a.clone() for a in accs]
    kernels.accumulate_(list(accs), list(grads), 0.5)      # the torch path looks up the accumulators
    assert keys == [], "a recalled list needs no Python identity key"
    assert all(torch.equal(a, b + 0.5 * g) for a, b, g in zip(accs, before, grads))


def _in_sync():
    """Every hint the fast path may follow points at a live cache entry."""
    live = [f for f in group._by_ends.values() if f._ident is not None]
    return all(any(f is e for e in group._entries.values()) for f in live)


def test_with_the_extension_nothing_stale_is_recalled(binding_loaded):
    gen = torch.Generator().manual_seed(6)
    ts = [torch.randn(n, generator=gen) for n in (3, 50, 7)]
    for _ in range(2):
        group.facts_of(ts)
    facts = group.recall(ts)
    assert facts is not None
    assert group.recall([ts[0], torch.randn(50), ts[2]]) is None   # same ends, another middle
    old = ts[1]
    ts[1].data = torch.randn(50)                       # same object, new memory: FSDP-style
    assert group.recall(ts) is None and not group._entries, "moved memory drops the entry"
    again = group.facts_of(ts)
    assert again is not facts and again.ptrs[1] == ts[1].data_ptr()
    group.facts_of(ts)                                 # kept again (second sighting since the drop)
    assert group.recall(ts) is not None
    del ts[1], old
    gc.collect()                                       # a freed tensor: the entry goes
    assert not group._entries and not group._by_ends
    kernels.forget()
    assert group.recall([torch.randn(2)]) is None


def test_with_the_extension_a_later_view_of_a_shared_storage_moved_is_noticed(binding_loaded):
    """The Python check reads one address per storage; with the extension every address counts,
    on the key path too: a stale address here would be written through by the kernels."""
    flat = torch.randn(100)
    ts = [flat[:10], flat[10:60], flat[60:]]
    for _ in range(3):
        group.facts_of(ts)
    ts[1].data = torch.randn(50)
    key = group.key_of(ts)
    assert group.cached(key, ts) is None               # the key path asks the C++ check too
    fresh = group.facts_of(ts)
    assert fresh.ptrs.tolist() == [t.data_ptr() for t in ts]


def test_with_the_extension_another_tensor_at_the_same_address_is_not_taken(binding_loaded):
    flat = torch.randn(64)
    ts = [torch.randn(3), flat[:64], torch.randn(5)]
    for _ in range(3):
        group.facts_of(ts)
    other = [ts[0], flat.as_strided((2, 4), (4, 1)), ts[2]]    # same data address, another shape
    assert group.recall(other) is None
    assert group.facts_of(other).shapes[1] == (2, 4)


def test_with_the_extension_evicted_and_dropped_entries_leave_no_hint(binding_loaded, monkeypatch):
    monkeypatch.setattr(group, "MAX_ENTRIES", 1)
    buf = torch.randn(256)
    a = [torch.randn(2), buf[:64], torch.randn(3)]
    b = [torch.randn(4), torch.randn(5)]
    for _ in range(2):
        group.facts_of(a)
    for _ in range(2):
        group.facts_of(b)                              # evicts a's entry (first in, first out)
    assert group.cached(group.key_of(a), a) is None and _in_sync()
    for _ in range(2):
        group.facts_of(a)                              # a is back, b evicted
    first = a[0]
    a[0] = torch.randn(2)                              # the old first tensor dies: the entry goes
    del first
    gc.collect()
    assert _in_sync() and group.recall(a) is None
    for _ in range(2):
        group.facts_of(b)
    b[1].data = torch.randn(5)                         # memory moved: the key path drops the entry
    assert group.cached(group.key_of(b), b) is None and not group._entries and _in_sync()


def test_with_the_extension_the_cache_works_under_another_default_device(binding_loaded):
    """Cache bookkeeping lives on the CPU whatever torch.set_default_device says."""
    ts = [torch.randn(3), torch.randn(4)]
    with torch.device("meta"):
        for _ in range(4):
            group.facts_of(ts)
        assert group.recall(ts) is not None


@pytest.mark.interpreter
def test_with_the_extension_the_triton_path_gives_the_same_sums(binding_loaded):
    gen = torch.Generator().manual_seed(7)
    accs = views([5, 17, 300, 1], gen)
    grads = [torch.randn(a.shape, generator=gen).bfloat16() for a in accs]
    want = [a.double() for a in accs]
    for _ in range(4):
        kernels.accumulate_(accs, grads, 0.25, backend="triton")
        want = [w + 0.25 * g.double() for w, g in zip(want, grads)]
    assert group.recall(grads) is not None
    for a, w in zip(accs, want):
        torch.testing.assert_close(a.double(), w, rtol=1e-6, atol=1e-6)
    norm, found = kernels.finalize_(accs, 1.0, None, backend="triton")
    torch.testing.assert_close(norm.double(), torch.cat(want).norm(), rtol=1e-5, atol=0)
