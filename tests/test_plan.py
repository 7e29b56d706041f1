import math

import pytest

import autoaccum
from autoaccum.plan import balanced_split


def test_spec_example():
    p = autoaccum.plan(target_batch=256, micro_batch=48, world_size=1)
    assert (p.target_batch, p.micro_batch, p.world_size) == (256, 48, 1)
    assert p.accum_steps == 6
    assert len(p.micro_batches) == 6 and sum(p.micro_batches) == 256
    assert max(p.micro_batches) <= 48 and max(p.micro_batches) - min(p.micro_batches) <= 1
    assert p.notes == ()


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 8])
def test_invariants_over_a_grid(world_size):
    for per_rank in range(1, 130):
        target = per_rank * world_size
        for micro in range(1, per_rank + 3):
            p = autoaccum.plan(target, micro, world_size)
            limit = min(micro, per_rank)
            assert p.micro_batch == limit
            assert p.per_rank_batch == per_rank
            assert p.accum_steps == len(p.micro_batches) == math.ceil(per_rank / limit)
            assert sum(p.micro_batches) == per_rank
            assert max(p.micro_batches) <= limit
            assert max(p.micro_batches) - min(p.micro_batches) <= 1


def test_world_size_shares_the_target():
    p = autoaccum.plan(256, 48, 4)
    assert p.per_rank_batch == 64 and p.micro_batches == [32, 32] and p.accum_steps == 2


def test_world_size_must_divide_target_and_says_the_nearest_values():
    with pytest.raises(ValueError, match=r"target_batch=255 .*world_size=2.*254 or 256"):
        autoaccum.plan(255, 8, 2)
    with pytest.raises(ValueError, match=r"target_batch=4"):
        autoaccum.plan(3, 1, 4)


def test_micro_batch_larger_than_the_batch_is_clamped_with_a_note():
    p = autoaccum.plan(32, 64)
    assert p.micro_batch == 32 and p.accum_steps == 1 and p.micro_batches == [32]
    assert "clamped" in p.notes[0]


@pytest.mark.parametrize("kwargs, exc, word", [
    (dict(target_batch=0, micro_batch=4), ValueError, "target_batch"),
    (dict(target_batch=-8, micro_batch=4), ValueError, "target_batch"),
    (dict(target_batch=8.0, micro_batch=4), TypeError, "target_batch"),
    (dict(target_batch=True, micro_batch=4), TypeError, "target_batch"),
    (dict(target_batch=8, micro_batch=0), ValueError, "micro_batch"),
    (dict(target_batch=8, micro_batch=-1), ValueError, "micro_batch"),
    (dict(target_batch=8, micro_batch="4"), TypeError, "micro_batch"),
    (dict(target_batch=8, micro_batch=4, world_size=0), ValueError, "world_size"),
])
def test_bad_arguments_name_themselves(kwargs, exc, word):
    with pytest.raises(exc, match=word):
        autoaccum.plan(**kwargs)


def test_short_batch_uses_the_same_limit():
    p = autoaccum.plan(100, 7)
    assert p.split(100) == p.micro_batches
    assert p.split(15) == [5, 5, 5]
    assert balanced_split(1, 7) == [1]
    assert balanced_split(14, 7) == [7, 7]


def test_to_dict_and_str():
    p = autoaccum.plan(100, 7)
    d = p.to_dict()
    assert d["micro_batches"] == p.micro_batches and d["accum_steps"] == 15
    assert "15 micro-batches" in str(p)
