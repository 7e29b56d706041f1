"""autoaccum's warnings name the user's line (the call into autoaccum), not autoaccum's own."""
import warnings

import torch
from torch import nn

import autoaccum


def test_batchnorm_warning_points_at_the_callers_line():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 1))
    trainer = autoaccum.fit(model, 16, torch.optim.SGD(model.parameters(), lr=0.1),
                            loss_fn=lambda m, b: m(b[0]).pow(2).mean(), micro_batch=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.step((torch.randn(16, 4),))
    mine = [w for w in caught if "BatchNorm" in str(w.message)]
    assert len(mine) == 1
    assert mine[0].filename == __file__, mine[0].filename
    assert "trainer.step" in open(__file__).read().splitlines()[mine[0].lineno - 1]
