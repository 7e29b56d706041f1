"""Let autoaccum size a Lightning run: AutoAccum(target_batch) sets batch_size and accumulate_grad_batches.

    python examples/lightning_autoaccum.py        # a small MLP on the CPU, two steps, in seconds
"""
import logging

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

try:
    import lightning.pytorch as pl
except ImportError:
    import pytorch_lightning as pl

from autoaccum.integrations.lightning import AutoAccum


class Regressor(pl.LightningModule):
    def __init__(self, batch_size=8):
        super().__init__()
        self.batch_size = batch_size
        self.net = nn.Sequential(nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 1))   # per sample: 64 x 256
        g = torch.Generator().manual_seed(0)
        self.data = TensorDataset(torch.randn(256, 64, 256, generator=g), torch.randn(256, 64, 1, generator=g))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)

    def train_dataloader(self):
        return DataLoader(self.data, batch_size=self.batch_size)


def main():
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    model = Regressor()
    trainer = pl.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[AutoAccum(128, memory_budget="8MiB")])   # a tiny budget, so that it splits
    trainer.fit(model)
    print(f"batch_size={model.batch_size}, accumulate_grad_batches={trainer.accumulate_grad_batches}, "
          f"steps={trainer.global_step}")


if __name__ == "__main__":
    main()
