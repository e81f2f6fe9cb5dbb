"""A Lightning module of one linear layer, for tests of callbacks in a real fit.

    trainer.fit(TinyModule(poisoned={4}))   # step 4 reports itself skipped as non-finite
"""

from __future__ import annotations

import lightning as L
import torch


class TinyModule(L.LightningModule):
    """Steps whose number is in `poisoned` report themselves skipped as non-finite."""

    def __init__(self, poisoned=()):
        super().__init__()
        self.layer = torch.nn.Linear(3, 1)
        self.poisoned = set(poisoned)
        self.last_step_nonfinite = False

    def training_step(self, batch, batch_idx):
        return self.layer(batch).pow(2).mean()

    def on_after_backward(self):  # decided before the optimizer step, as the guard does
        self.last_step_nonfinite = self.global_step + 1 in self.poisoned

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.randn(64, 3), batch_size=4)
