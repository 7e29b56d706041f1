"""The integrations: HF Trainer arguments from tune(), Lightning's AutoAccum callback, and their examples."""
import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from ruler import StorageCensus  # noqa: E402  (the independent ruler: shares no code with the probe)

transformers = pytest.importorskip("transformers")
from autoaccum.integrations import largest_divisor_at_most  # noqa: E402
from autoaccum.integrations.transformers import tune  # noqa: E402


def gpt2():
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=2, n_head=2, n_embd=64, vocab_size=512, n_positions=64, bos_token_id=0, eos_token_id=0))


def batch(n, seq=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 512, (n, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def hf_args(**kw):
    base = dict(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=4, gradient_accumulation_steps=4,
                max_steps=2, use_cpu=True, report_to="none", save_strategy="no", disable_tqdm=True)
    base.update(kw)
    return transformers.TrainingArguments(**base)


@pytest.mark.parametrize("budget", ["8MiB", "20MiB"])
def test_tune_sets_a_split_that_multiplies_to_the_target_and_fits(budget):
    model, args = gpt2(), hf_args()
    tuned = tune(args, model, batch(16), memory_budget=budget, cache=False)
    micro, accum = tuned.per_device_train_batch_size, tuned.gradient_accumulation_steps
    assert micro * accum == 16 and 16 % micro == 0
    assert micro <= tuned.autoaccum_probe.max_micro_batch
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (4, 4), "args is not changed"
    rows = batch(32, seed=1)
    data = [{k: v[i] for k, v in rows.items()} for i in range(32)]
    trainer = transformers.Trainer(model=model, args=tuned, train_dataset=data)
    with StorageCensus(list(model.parameters()) + list(model.buffers())) as census:
        trainer.train()                                   # two real HF steps
    assert trainer.state.global_step == 2
    assert census.peak <= tuned.autoaccum_probe.limit_bytes, (census.peak, tuned.autoaccum_probe.limit_bytes)


def test_tune_defaults_to_the_effective_batch_args_ask_for_and_checks_its_input():
    model = gpt2()
    tuned = tune(hf_args(per_device_train_batch_size=2, gradient_accumulation_steps=3), model, batch(6),
                 memory_budget="64MiB", cache=False)
    assert tuned.per_device_train_batch_size * tuned.gradient_accumulation_steps == 6
    with pytest.raises(TypeError, match="args must be a transformers.TrainingArguments"):
        tune({"per_device_train_batch_size": 4}, model, batch(4))
    with pytest.raises(ValueError, match="target_batch"):
        tune(hf_args(), model, batch(4), target_batch=0)


def test_largest_divisor():
    assert [largest_divisor_at_most(16, k) for k in (1, 3, 5, 11, 16, 99)] == [1, 2, 4, 8, 16, 16]
    assert largest_divisor_at_most(13, 12) == 1


def test_the_hf_example_runs():
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "hf_trainer_tune.py")], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "gradient_accumulation_steps=" in r.stdout and "train_loss" in r.stdout + r.stderr


def lightning_module():
    """The example's module, recording the micro-batch sizes its training_step sees (and returning its
    optimizer as a dict, the other form configure_optimizers may take)."""
    if importlib.util.find_spec("lightning") is None and importlib.util.find_spec("pytorch_lightning") is None:
        pytest.skip("Lightning is not installed (pip install -e '.[test]')")
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        from lightning_autoaccum import Regressor, pl     # the Lightning the example (and AutoAccum) use
    finally:
        sys.path.pop(0)

    class Recording(Regressor):
        def __init__(self):
            super().__init__()
            self.seen = []

        def training_step(self, batch, batch_idx):
            self.seen.append(len(batch[0]))
            return super().training_step(batch, batch_idx)

        def configure_optimizers(self):
            return {"optimizer": super().configure_optimizers()}

    return pl, Recording()


@pytest.mark.parametrize("budget, splits", [("8MiB", True), ("256MiB", False)])
def test_lightning_callback_sets_batch_size_and_accumulation(budget, splits):
    pl, model = lightning_module()
    from autoaccum.integrations.lightning import AutoAccum
    callback = AutoAccum(128, memory_budget=budget, cache=False)
    trainer = pl.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[callback])
    trainer.fit(model)
    assert model.batch_size * trainer.accumulate_grad_batches == 128
    assert (trainer.accumulate_grad_batches > 1) == splits
    assert model.batch_size <= callback.result.max_micro_batch and trainer.global_step == 2
    assert set(model.seen[-trainer.accumulate_grad_batches:]) == {model.batch_size}, "the loader uses the new size"


def test_lightning_callback_needs_a_batch_size_to_set():
    pl, model = lightning_module()
    from autoaccum.integrations.lightning import AutoAccum
    del model.batch_size
    trainer = pl.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[AutoAccum(64, memory_budget="64MiB", cache=False)])
    with pytest.raises(ValueError, match="sets the micro-batch through `batch_size`"):
        trainer.fit(model)
    with pytest.raises(ValueError, match="target_batch"):
        AutoAccum(0)


def test_the_lightning_example_runs():
    lightning_module()                                   # skips without Lightning
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "lightning_autoaccum.py")], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "accumulate_grad_batches=" in r.stdout and "steps=2" in r.stdout


def test_tune_leaves_the_random_streams_and_the_model_alone():
    import random

    import numpy as np
    model = gpt2()
    torch.manual_seed(7)
    np.random.seed(7)
    random.seed(7)
    streams = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    weights = [p.detach().clone() for p in model.parameters()]
    tune(hf_args(seed=1234), model, batch(16), memory_budget="20MiB", cache=False)
    assert torch.equal(streams[0], torch.get_rng_state()) and np.array_equal(streams[1], np.random.get_state()[1])
    assert streams[2] == random.getstate()
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))
