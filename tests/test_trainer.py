import io
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import autoaccum
from autoaccum.progress import Progress
from helpers import mlp, mse_loss, regression_batch


class HFStyle(nn.Module):
    """A model that computes its own loss from keyword inputs, the Transformers way."""

    def __init__(self, as_dict=False):
        super().__init__()
        self.net = mlp()
        self.as_dict = as_dict

    def forward(self, inputs, labels):
        loss = F.mse_loss(self.net(inputs), labels)
        return {"loss": loss} if self.as_dict else SimpleNamespace(loss=loss, logits=None)


@pytest.mark.parametrize("as_dict", [False, True])
def test_loss_from_the_model_output(as_dict):
    model = HFStyle(as_dict)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = regression_batch(30)
    trainer = autoaccum.fit(model, 30, opt, micro_batch=8)
    stats = trainer.step({"inputs": x, "labels": y})
    assert stats.loss == pytest.approx(F.mse_loss(mlp()(x), y).item(), rel=1e-12)


def test_positional_batch_is_unpacked_for_the_model():
    model = HFStyle()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = autoaccum.fit(model, 30, opt, micro_batch=8)
    assert not trainer.step(regression_batch(30)).skipped


def test_model_without_loss_is_a_clear_error():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = autoaccum.fit(model, 30, opt, micro_batch=8)
    with pytest.raises(TypeError, match="without a 'loss'.*pass loss_fn"):
        trainer.step(regression_batch(30)[0])


def test_train_loop_returns_history_and_reports_progress(capsys):
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    trainer = autoaccum.fit(model, 32, opt, loss_fn=mse_loss, micro_batch=10)
    loader = [regression_batch(32, seed=s) for s in range(5)] + [regression_batch(7, seed=9)]
    history = trainer.train(loader, epochs=2)
    assert len(history) == 12 and trainer.steps == 12
    assert history[5].samples == 7 and history[0].micro_batches == [8, 8, 8, 8]
    assert history[-1].loss < history[0].loss
    err = capsys.readouterr().err
    assert "step 12/12" in err and "micro-batch 8 x 4" in err and "samples/s" in err   # plain lines: not a TTY
    assert len(trainer.train(loader, max_steps=3, progress=False)) == 3
    with pytest.raises(ValueError, match="epochs"):
        trainer.train(loader, epochs=0)


def test_progress_redraws_on_a_terminal():
    class Tty(io.StringIO):
        def isatty(self):
            return True
    out = Tty()
    bar = Progress(total=2, stream=out)
    plan = autoaccum.plan(8, 4)
    stats = autoaccum.StepStats(loss=1.0, grad_norm=None, skipped=False, micro_batches=[4, 4], items=8, samples=8)
    bar.update(stats, plan)
    bar.update(stats, plan)
    bar.close()
    text = out.getvalue()
    assert "2/2" in text and "100%" in text, text          # tqdm's bar, redrawn in place
    assert "loss=1.0000" in text and "micro-batch=4 x 2" in text and "samples/s=" in text


def test_repr_names_the_plan():
    model = mlp()
    trainer = autoaccum.fit(model, 32, torch.optim.SGD(model.parameters(), lr=0.1), loss_fn=mse_loss, micro_batch=10)
    assert "target 32 = 4 micro-batches" in repr(trainer)


def test_amp_none_keeps_float32_under_a_callers_autocast():
    model = mlp(torch.float32)
    trainer = autoaccum.fit(model, 8, torch.optim.SGD(model.parameters(), lr=0.1),
                            loss_fn=lambda m, b: F.mse_loss(m(b[0]), b[1]).float() * (m(b[0]).dtype == torch.float32),
                            micro_batch=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        stats = trainer.step(regression_batch(8, torch.float32))
    assert stats.loss > 0, "the forward ran in float32: autocast is off inside the step when amp_dtype=None"
