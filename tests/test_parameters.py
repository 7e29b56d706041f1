"""Which tensors a step trains and how their gradients are laid out: parameters outside the model,
parameters unfrozen later, parameters accumulated twice in one backward, channels_last, mixed
dtypes, master-weight checkpoints. Each case against a plain full-batch step."""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import autoaccum
from helpers import max_abs_diff, mlp, mse_loss, regression_batch


def tempered_loss(temperature):
    return lambda model, batch: mse_loss(model, batch) / temperature


@pytest.mark.parametrize("accum_dtype", [None, torch.float64])
def test_a_parameter_only_the_optimizer_holds_is_trained_exactly(accum_dtype):
    runs = []
    for mode in ("reference", "autoaccum"):
        model = mlp()
        temperature = nn.Parameter(torch.tensor(1.5, dtype=torch.float64))
        opt = torch.optim.AdamW([*model.parameters(), temperature], lr=1e-2)
        loss_fn = tempered_loss(temperature)
        trainer = None if mode == "reference" else autoaccum.fit(
            model, 60, opt, loss_fn=loss_fn, micro_batch=7, max_grad_norm=0.1, accum_dtype=accum_dtype)
        for s in range(3):
            batch = regression_batch(60, seed=s)
            if trainer is None:
                opt.zero_grad()
                loss_fn(model, batch).backward()
                torch.nn.utils.clip_grad_norm_([*model.parameters(), temperature], 0.1)
                opt.step()
            else:
                trainer.step(batch)
        runs.append([*model.parameters(), temperature])
    assert max_abs_diff(*runs) <= 1e-12


def test_a_parameter_only_the_optimizer_holds_is_unscaled_under_fp16():
    updates = []
    for amp in (None, torch.float16):
        model = mlp(torch.float32)
        temperature = nn.Parameter(torch.tensor(1.5))
        opt = torch.optim.SGD([*model.parameters(), temperature], lr=0.1)
        autoaccum.fit(model, 32, opt, loss_fn=tempered_loss(temperature), micro_batch=8,
                      amp_dtype=amp).step(regression_batch(32, torch.float32))
        updates.append(1.5 - temperature.item())
    assert updates[0] != 0 and abs(updates[1] - updates[0]) <= 1e-2 * abs(updates[0]), updates


@pytest.mark.parametrize("accum_dtype", [None, torch.float64])
def test_unfreezing_after_fit_trains_the_unfrozen_layer_exactly(accum_dtype):
    """Gradual unfreezing: the first layer joins at step 2, with clipping over every gradient."""
    runs = []
    for mode in ("reference", "autoaccum"):
        model = mlp()
        model[0].requires_grad_(False)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        trainer = None if mode == "reference" else autoaccum.fit(
            model, 50, opt, loss_fn=mse_loss, micro_batch=8, max_grad_norm=0.05, accum_dtype=accum_dtype)
        for s in range(3):
            if s == 1:
                model[0].requires_grad_(True)
            batch = regression_batch(50, seed=s)
            if trainer is None:
                opt.zero_grad()
                mse_loss(model, batch).backward()
                torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 0.05)
                opt.step()
            else:
                trainer.step(batch)
        runs.append(model)
    assert max_abs_diff(*runs) <= 1e-12


class SharedBlocks(nn.Module):
    """One layer applied three times under reentrant checkpointing (ALBERT-style sharing): the
    shared weight gets three gradients in one backward, each in its own inner backward."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp, self.shared, self.out = nn.Linear(12, 16), nn.Linear(16, 16), nn.Linear(16, 5)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        for _ in range(3):
            h = checkpoint(lambda t: torch.tanh(self.shared(t)), h, use_reentrant=True)
        return self.out(h + self.shared(h))     # and once more outside any checkpoint


@pytest.mark.parametrize("accum_dtype", [None, torch.float64])
def test_a_shared_layer_under_reentrant_checkpointing(accum_dtype):
    model = SharedBlocks().double()
    ref = copy.deepcopy(model)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    trainer = autoaccum.fit(model, 40, opt, loss_fn=mse_loss, micro_batch=9, accum_dtype=accum_dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")     # reentrant checkpointing warns about inputs without grad
        for s in range(2):
            batch = regression_batch(40, seed=s)
            ref_opt.zero_grad()
            mse_loss(ref, batch).backward()
            ref_opt.step()
            trainer.step(batch)
    assert max_abs_diff(ref, model) <= 1e-12


def conv_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Tanh(), nn.Conv2d(8, 4, 3, padding=1), nn.Flatten(),
                         nn.Linear(4 * 6 * 6, 5)).double().to(memory_format=torch.channels_last)


def conv_loss(model, batch):
    x, y = batch
    return F.mse_loss(model(x), y)


@pytest.mark.parametrize("fused", [False, True])
def test_channels_last_parameters_with_a_fused_optimizer(fused):
    """Fused optimizers read a parameter and its gradient as flat memory: the buffer's view of a
    channels_last weight must be channels_last too."""
    model = conv_model()
    assert not model[0].weight.is_contiguous()
    ref = copy.deepcopy(model)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, fused=fused)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=fused)
    trainer = autoaccum.fit(model, 24, opt, loss_fn=conv_loss, micro_batch=5, accum_dtype=torch.float64,
                            max_grad_norm=0.5)
    assert trainer.buffer.views[id(model[0].weight)].stride() == model[0].weight.stride()
    g = torch.Generator().manual_seed(3)
    for _ in range(2):
        batch = (torch.randn(24, 3, 6, 6, generator=g, dtype=torch.float64).contiguous(memory_format=torch.channels_last),
                 torch.randn(24, 5, generator=g, dtype=torch.float64))
        ref_opt.zero_grad()
        conv_loss(ref, batch).backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
        ref_opt.step()
        trainer.step(batch)
    assert max_abs_diff(ref, model) <= 1e-12


def test_a_float64_parameter_in_a_bf16_model_keeps_float64_gradients():
    model = mlp(torch.bfloat16)
    model.scale = nn.Parameter(torch.tensor(1.0, dtype=torch.float64))
    loss_fn = lambda m, b: mse_loss(m, b) * m.scale
    trainer = autoaccum.fit(model, 16, torch.optim.SGD(model.parameters(), lr=0.1), loss_fn=loss_fn, micro_batch=4)
    assert trainer.buffer.dtype == torch.float32 and trainer.buffer.views[id(model.scale)].dtype == torch.float64
    batch = regression_batch(16, torch.bfloat16)
    stats = trainer.step(batch)
    assert not stats.skipped and model.scale.item() != 1.0
    assert model.scale.dtype == torch.float64 and model[0].weight.dtype == torch.bfloat16


def test_master_weights_resume_from_a_checkpoint_bit_for_bit(tmp_path):
    def build():
        model = mlp(torch.bfloat16)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.9)
        return model, opt, autoaccum.fit(model, 32, opt, loss_fn=mse_loss, micro_batch=8, master_weights=True,
                                         scheduler=sched)
    model, opt, trainer = build()
    for s in range(2):
        trainer.step(regression_batch(32, torch.bfloat16, seed=s))
    torch.save({"model": model.state_dict(), "trainer": trainer.state_dict()}, tmp_path / "ckpt.pt")
    trainer.step(regression_batch(32, torch.bfloat16, seed=2))

    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    model2, opt2, trainer2 = build()
    model2.load_state_dict(ckpt["model"])
    trainer2.load_state_dict(ckpt["trainer"])
    assert {v.dtype for st in opt2.state.values() for k, v in st.items() if k != "step"} == {torch.float32}
    trainer2.step(regression_batch(32, torch.bfloat16, seed=2))
    assert max_abs_diff(model, model2) == 0 and trainer2.steps == trainer.steps
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]

    # Optimizer.load_state_dict alone rounds the fp32 state to bf16: it still runs, with a warning.
    model3, opt3, trainer3 = build()
    model3.load_state_dict(ckpt["model"])
    opt3.load_state_dict(ckpt["trainer"]["optimizer"])
    with pytest.warns(UserWarning, match="trainer.state_dict"):
        assert not trainer3.step(regression_batch(32, torch.bfloat16, seed=2)).skipped


def test_a_checkpoint_for_another_model_is_rejected_before_anything_loads():
    model = mlp(torch.bfloat16)
    trainer = autoaccum.fit(model, 16, torch.optim.AdamW(model.parameters()), loss_fn=mse_loss, micro_batch=8,
                            master_weights=True)
    trainer.step(regression_batch(16, torch.bfloat16))
    state = trainer.state_dict()
    other = mlp(torch.bfloat16, hidden=8)
    fresh = autoaccum.fit(other, 16, torch.optim.AdamW(other.parameters()), loss_fn=mse_loss, micro_batch=8,
                          master_weights=True)
    with pytest.raises(ValueError, match="another model"):
        fresh.load_state_dict(state)
    assert len(fresh.optimizer.state) == 0
    with pytest.raises(TypeError, match="Trainer.state_dict"):
        fresh.load_state_dict({"masters": []})


def test_a_rejected_batch_on_a_regrowth_step_leaves_the_plan_alone():
    model = mlp()
    trainer = autoaccum.fit(model, 64, torch.optim.SGD(model.parameters(), lr=0.1), loss_fn=mse_loss,
                            micro_batch=32, regrow_after=1)
    trainer.set_micro_batch(16)
    trainer.step(regression_batch(64))
    x, y = regression_batch(64)
    with pytest.raises(ValueError, match="disagree on dim 0"):
        trainer.step((x, y[:-1]))
    assert trainer.plan.micro_batch == 16


def test_sparse_gradients_are_rejected_by_fit():
    model = nn.Sequential(nn.Embedding(10, 4, sparse=True), nn.Flatten(), nn.Linear(12, 5))
    with pytest.raises(ValueError, match="sparse=False"):
        autoaccum.fit(model, 8, torch.optim.SGD(model.parameters(), lr=0.1), loss_fn=mse_loss, micro_batch=4)


def test_a_master_weight_checkpoint_loads_into_a_trainer_without_masters():
    model = mlp(torch.bfloat16)
    trainer = autoaccum.fit(model, 16, torch.optim.AdamW(model.parameters()), loss_fn=mse_loss, micro_batch=8,
                            master_weights=True)
    trainer.step(regression_batch(16, torch.bfloat16))
    state = {"model": model.state_dict(), "trainer": trainer.state_dict()}
    other = mlp(torch.bfloat16)
    opt = torch.optim.AdamW(other.parameters())
    plain = autoaccum.fit(other, 16, opt, loss_fn=mse_loss, micro_batch=8, master_weights=False)
    other.load_state_dict(state["model"])
    plain.load_state_dict(state["trainer"])
    assert {v.dtype for st in opt.state.values() for k, v in st.items() if k != "step"} == {torch.bfloat16}
    assert not plain.step(regression_batch(16, torch.bfloat16, seed=2)).skipped


def test_a_buffer_rebuild_that_fails_is_retried_at_the_next_step(monkeypatch):
    model = mlp(torch.bfloat16)
    model[0].requires_grad_(False)
    trainer = autoaccum.fit(model, 16, torch.optim.SGD(model.parameters(), lr=0.1), loss_fn=mse_loss, micro_batch=8)
    trainer.step(regression_batch(16, torch.bfloat16))
    model[0].requires_grad_(True)
    import autoaccum.trainer as trainer_module
    real = trainer_module.GradBuffer

    def fail_once(*args, **kwargs):
        monkeypatch.setattr(trainer_module, "GradBuffer", real)
        raise torch.OutOfMemoryError("CUDA out of memory (injected while rebuilding the buffer)")
    monkeypatch.setattr(trainer_module, "GradBuffer", fail_once)
    before = model[0].weight.detach().clone()
    with pytest.raises(torch.OutOfMemoryError):
        trainer.step(regression_batch(16, torch.bfloat16))
    assert torch.equal(model[0].weight, before)
    trainer.step(regression_batch(16, torch.bfloat16))
    assert trainer.buffer is not None and id(model[0].weight) in trainer.buffer.views
    assert not torch.equal(model[0].weight, before)
