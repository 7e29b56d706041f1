"""The default count for models that compute their own loss, on models that are not Hugging Face's:
other ignore values, outputs without a loss in eval mode, a first micro-batch with nothing to check."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import autoaccum


class Tagger(nn.Module):
    """Token classification with its own loss; ``ignore`` is the label value its loss skips."""

    def __init__(self, ignore=-100, loss_in_eval=True):
        super().__init__()
        self.emb, self.head = nn.Embedding(20, 8), nn.Linear(8, 5)
        self.ignore, self.loss_in_eval = ignore, loss_in_eval

    def forward(self, input_ids, labels):
        logits = self.head(self.emb(input_ids))
        out = {"logits": logits}
        if self.training or self.loss_in_eval:
            out["loss"] = F.cross_entropy(logits.reshape(-1, 5), labels.reshape(-1), ignore_index=self.ignore)
        return out


def batch(n=12, seq=6, ignore=-100, seed=0, blank_first=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 20, (n, seq), generator=g)
    labels = torch.randint(0, 5, (n, seq), generator=g)
    labels[torch.rand(n, seq, generator=g) < 0.4] = ignore
    labels[:blank_first] = ignore
    return {"input_ids": ids, "labels": labels}


def step(model, b, micro=4):
    trainer = autoaccum.fit(model, len(b["labels"]), torch.optim.SGD(model.parameters(), lr=0.1), micro_batch=micro)
    return trainer, trainer.step(b)


def test_labels_are_counted_and_checked_for_a_model_that_is_not_hugging_faces():
    torch.manual_seed(0)
    b = batch()
    trainer, stats = step(Tagger(), b)
    assert stats.items == int((b["labels"] != -100).sum())
    assert trainer.count_fn == autoaccum.count.labels()


def test_another_ignore_value_is_found_out_not_a_crash():
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="not the mean cross-entropy over its labels"):
        trainer, stats = step(Tagger(ignore=-1), batch(ignore=-1))
    assert stats.items == 12 and trainer.count_fn is None


def test_an_output_without_a_loss_in_eval_mode_keeps_the_class_rule():
    torch.manual_seed(0)
    b = batch()
    trainer, stats = step(Tagger(loss_in_eval=False), b)
    assert stats.items == int((b["labels"] != -100).sum())


def test_a_first_micro_batch_with_nothing_to_count_does_not_decide_the_run():
    torch.manual_seed(0)
    b = batch(blank_first=4)                       # the first micro-batch of 4 has no counted label
    trainer, stats = step(Tagger(), b)
    assert trainer.count_fn == autoaccum.count.labels() and not trainer._count_pending
    assert stats.items == int((b["labels"] != -100).sum()) and not stats.skipped
    everything_blank = batch(blank_first=12)
    tagger = Tagger()
    trainer2 = autoaccum.fit(tagger, 12, torch.optim.SGD(tagger.parameters(), lr=0.1), micro_batch=4)
    with pytest.raises(ValueError, match="0 items for every micro-batch"):
        trainer2.step(everything_blank)
    assert trainer2._count_pending, "nothing could be checked: asked again on the next batch"
