"""Hugging Face models trained with no loss_fn and no count_fn: the items are what the model's own
loss averages over (shifted labels for a causal LM, masked positions for an MLM, samples for a
classifier), so the accumulated update equals the full-batch update to float64 rounding.

HF's losses upcast logits to float32 even in a float64 model; for a float64 comparison each model
gets the same loss computed in float64 (``model.loss_function``), which is what the check runs.
"""
import copy
import logging
import warnings

import pytest
import torch
import torch.nn.functional as F

import autoaccum

transformers = pytest.importorskip("transformers")


def causal_loss(logits, labels, vocab_size, num_items_in_batch=None, ignore_index=-100, **kw):
    shifted = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    return F.cross_entropy(logits.reshape(-1, vocab_size), shifted.reshape(-1), ignore_index=ignore_index)


def masked_loss(logits, labels, vocab_size, num_items_in_batch=None, ignore_index=-100, **kw):
    return F.cross_entropy(logits.reshape(-1, vocab_size), labels.reshape(-1), ignore_index=ignore_index)


def classifier_loss(labels, pooled_logits, config, **kw):
    return F.cross_entropy(pooled_logits.reshape(-1, config.num_labels), labels.reshape(-1))


def gpt2():
    cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=64, n_positions=32, bos_token_id=0,
                                  eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(cfg).double()
    model.loss_function = causal_loss
    return model


def bert(kind):
    cfg = transformers.BertConfig(num_hidden_layers=1, num_attention_heads=2, hidden_size=32, intermediate_size=64,
                                  vocab_size=64, max_position_embeddings=32, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0, num_labels=3)
    model = (transformers.BertForMaskedLM if kind == "mlm" else transformers.BertForSequenceClassification)(cfg).double()
    model.loss_function = masked_loss if kind == "mlm" else classifier_loss
    return model


def padded_batch(n=20, seq=24, seed=0, mask_rate=None, classes=None):
    """Sequences of 3..seq tokens, right-padded; labels -100 on padding (and, for an MLM, on every
    position that is not masked)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, seq + 1, (n,), generator=g)
    ids = torch.randint(1, 64, (n, seq), generator=g)
    mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
    ids = ids * mask
    if classes is not None:
        labels = torch.randint(0, classes, (n,), generator=g)
    else:
        labels = ids.masked_fill(mask == 0, -100)
        if mask_rate is not None:
            chosen = torch.rand(n, seq, generator=g) < mask_rate
            labels = labels.masked_fill(~chosen, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def full_batch_step(model, batch, lr):
    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(ref.parameters(), lr=lr)
    ref(**batch).loss.backward()
    opt.step()
    return ref


@pytest.mark.parametrize("kind", ["causal", "mlm", "classifier"])
def test_no_count_fn_counts_what_the_models_own_loss_averages_over(kind, caplog):
    torch.manual_seed(0)
    model = {"causal": gpt2, "mlm": lambda: bert("mlm"), "classifier": lambda: bert("cls")}[kind]()
    batch = padded_batch(mask_rate=0.3 if kind == "mlm" else None, classes=3 if kind == "classifier" else None)
    expected_items = {"causal": lambda: int((batch["labels"][:, 1:] != -100).sum()),
                      "mlm": lambda: int((batch["labels"] != -100).sum()), "classifier": lambda: 20}[kind]()
    reference = full_batch_step(model, batch, lr=1.0)
    trainer = autoaccum.fit(model, 20, torch.optim.SGD(model.parameters(), lr=1.0), micro_batch=7)
    with caplog.at_level(logging.INFO, logger="autoaccum"):
        stats = trainer.step(batch)
    assert stats.micro_batches == [7, 7, 6] and stats.items == expected_items
    diff = max((p - q).abs().max().item() for p, q in zip(model.parameters(), reference.parameters()))
    assert diff <= 1e-12, diff
    said = [r.getMessage() for r in caplog.records if "counting" in r.getMessage()]
    assert len(said) == 1 and ("shift=True" in said[0]) == (kind == "causal"), said


def test_the_count_is_checked_against_the_models_loss_and_corrected():
    """A causal model whose loss does *not* shift (a custom head) is found out on the first batch."""
    torch.manual_seed(0)
    model = gpt2()
    model.loss_function = masked_loss                  # scores every label, no shift
    batch = padded_batch()
    reference = full_batch_step(model, batch, lr=1.0)
    trainer = autoaccum.fit(model, 20, torch.optim.SGD(model.parameters(), lr=1.0), micro_batch=7)
    stats = trainer.step(batch)
    assert stats.items == int((batch["labels"] != -100).sum())
    assert max((p - q).abs().max().item() for p, q in zip(model.parameters(), reference.parameters())) <= 1e-12


def test_a_loss_that_is_no_mean_over_labels_falls_back_to_samples_with_a_warning():
    torch.manual_seed(0)
    model = gpt2()
    model.loss_function = lambda logits, labels, vocab_size, **kw: causal_loss(logits, labels, vocab_size) * 3.0 + 1.0
    trainer = autoaccum.fit(model, 20, torch.optim.SGD(model.parameters(), lr=0.1), micro_batch=7)
    with pytest.warns(UserWarning, match="not the mean cross-entropy over its labels.*pass count_fn="):
        stats = trainer.step(padded_batch())
    assert stats.items == 20


def test_a_users_loss_over_ignored_labels_without_count_fn_warns_once():
    torch.manual_seed(0)
    model = gpt2()
    trainer = autoaccum.fit(model, 20, torch.optim.SGD(model.parameters(), lr=0.1), micro_batch=7,
                            loss_fn=lambda m, b: m(**b).loss)
    with pytest.warns(UserWarning, match=r"count_fn=autoaccum.count.labels\(\)"):
        trainer.step(padded_batch())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trainer.step(padded_batch(seed=1))


def test_the_check_leaves_training_untouched():
    """The check's extra forward runs in eval mode under no_grad with the random streams forked:
    a model with dropout trains exactly as with the count given by hand."""
    cfg = dict(n_layer=1, n_head=2, n_embd=16, vocab_size=64, n_positions=32, bos_token_id=0, eos_token_id=0)
    results = []
    for count_fn in (None, autoaccum.count.labels(shift=True)):
        torch.manual_seed(0)
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**cfg)).double()
        model.loss_function = causal_loss
        trainer = autoaccum.fit(model, 20, torch.optim.AdamW(model.parameters(), lr=1e-3), micro_batch=7,
                                count_fn=count_fn)
        torch.manual_seed(5)
        for seed in range(3):
            trainer.step(padded_batch(seed=seed))
        results.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_count_helpers():
    batch = {"labels": torch.tensor([[5, 6, -100], [-100, 7, 8]])}
    assert int(autoaccum.count.labels()(batch)) == 4
    assert int(autoaccum.count.labels(shift=True)(batch)) == 3
    assert autoaccum.count.samples(batch) == 2
    assert repr(autoaccum.count.labels(shift=True)) == "labels(ignore_index=-100, shift=True, key='labels')"
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        autoaccum.count.labels(ignore_index="x")
    with pytest.raises(TypeError, match="micro_batch\\['labels'\\]"):
        autoaccum.count.labels()((torch.zeros(2),))


def test_a_tuple_batch_for_a_keyword_model_is_refused_with_the_fix():
    model = gpt2()
    trainer = autoaccum.fit(model, 4, torch.optim.SGD(model.parameters(), lr=0.1), micro_batch=2)
    b = padded_batch(4)
    params = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(TypeError, match="takes keyword arguments.*Give batches as dicts"):
        trainer.step((b["input_ids"], b["attention_mask"], b["labels"]))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
