from collections import namedtuple

import numpy as np
import pytest
import torch

from autoaccum import batch as B

Pair = namedtuple("Pair", "x y")


def nested(n):
    return {"ids": torch.arange(n * 3).view(n, 3), "pair": Pair(torch.randn(n, 2), torch.randn(n)),
            "extra": (torch.ones(n, 1, 1), None), "np": np.arange(n)}


def test_batch_size_and_split_nested():
    b = nested(10)
    assert B.batch_size(b) == 10
    parts = B.split(b, [4, 3, 3])
    assert [B.batch_size(p) for p in parts] == [4, 3, 3]
    assert isinstance(parts[1]["pair"], Pair) and parts[1]["extra"][1] is None
    assert torch.equal(parts[1]["ids"], b["ids"][4:7])
    assert np.array_equal(parts[2]["np"], np.arange(7, 10))
    # views, not copies
    assert parts[1]["ids"].untyped_storage().data_ptr() == b["ids"].untyped_storage().data_ptr()


def test_split_sizes_must_cover_the_batch():
    with pytest.raises(ValueError, match="sum"):
        B.split(torch.zeros(5, 2), [2, 2])


def test_dim0_mismatch_names_both_leaves():
    with pytest.raises(ValueError, match=r"batch\['a'\] has 4 rows but batch\['b'\]\[1\] has 3"):
        B.batch_size({"a": torch.zeros(4), "b": (torch.zeros(4), torch.zeros(3))})


@pytest.mark.parametrize("bad", [torch.zeros(0, 3), {"a": torch.zeros(0)}])
def test_empty_batch(bad):
    with pytest.raises(ValueError, match="empty"):
        B.batch_size(bad)


@pytest.mark.parametrize("bad", [{}, (), [None], None])
def test_batch_without_tensors(bad):
    with pytest.raises(ValueError, match="no tensors"):
        B.batch_size(bad)


@pytest.mark.parametrize("bad, where", [
    ({"x": torch.zeros(3), "name": "abc"}, r"batch\['name'\] is a str"),
    ((torch.zeros(3), 7), r"batch\[1\] is a int"),
    ({"x": torch.tensor(1.0)}, r"batch\['x'\] is a 0-dim Tensor"),
    (object(), "batch is a object"),
])
def test_unsplittable_leaves_are_named(bad, where):
    with pytest.raises(TypeError, match=where):
        B.batch_size(bad)


def test_tile_slices_or_repeats():
    b = {"x": torch.arange(6).view(3, 2), "y": np.arange(3)}
    small = B.tile(b, 2)
    assert torch.equal(small["x"], b["x"][:2])
    big = B.tile(b, 7)
    assert B.batch_size(big) == 7
    assert big["x"][:, 0].tolist() == [0, 2, 4, 0, 2, 4, 0]
    assert big["y"].tolist() == [0, 1, 2, 0, 1, 2, 0]


def test_to_device_converts_numpy():
    out = B.to_device({"a": np.ones((2, 2)), "b": torch.ones(2)}, torch.device("cpu"))
    assert isinstance(out["a"], torch.Tensor) and out["b"].device.type == "cpu"


def test_on_device_says_whether_moving_would_change_anything():
    import numpy as np
    from autoaccum.batch import on_device
    cpu = torch.device("cpu")
    assert on_device({"x": torch.zeros(2, 3), "y": (torch.zeros(2), None)}, cpu)
    assert not on_device({"x": torch.zeros(2, 3), "y": np.zeros(2)}, cpu), "numpy leaves become tensors"
    assert not on_device(torch.zeros(2, device="meta"), cpu)
