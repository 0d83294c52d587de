"""Recipe: ProdigyPlusScheduleFree in a PyTorch Lightning module.

    pip install lightning
    python examples/recipes/lightning_module.py --steps 100

What matters:

* ``configure_optimizers`` returns the optimizer alone (no LR scheduler: Schedule-Free needs none; lr=1.0);
* the hooks switch the Schedule-Free mode: ``optimizer.train()`` before training batches, ``optimizer.eval()``
  before validation and at the end of training (the weights then hold the average, which is what you evaluate and
  export); both calls are idempotent and cheap, so calling ``train()`` at every batch start is fine;
* ``training_step`` logs ``d`` (``optimizer.metrics()`` costs no device synchronisation).

A small character model learns the bytes of Python's documentation (``pydoc_data.topics``).
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn

from prodigy_dist import ProdigyPlusScheduleFree

CONTEXT = 16


def byte_windows(count: int, seed: int) -> torch.utils.data.TensorDataset:
    from pydoc_data.topics import topics

    data = torch.tensor(list("\n".join(topics[k] for k in sorted(topics)).encode("ascii", "replace")))
    starts = torch.randint(0, data.numel() - CONTEXT - 1, (count,), generator=torch.Generator().manual_seed(seed))
    windows = data[starts[:, None] + torch.arange(CONTEXT + 1)]
    return torch.utils.data.TensorDataset(windows[:, :-1], windows[:, -1])


class CharModel(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Embedding(128, 32), nn.Flatten(), nn.Linear(CONTEXT * 32, 256), nn.GELU(),
                                 nn.Linear(256, 128))
        self.d: list[float] = []

    def configure_optimizers(self):
        return ProdigyPlusScheduleFree(self.parameters(), d0=1e-5)

    def _prodigy(self) -> ProdigyPlusScheduleFree:
        return self.optimizers().optimizer  # Lightning wraps it in a LightningOptimizer

    def on_train_batch_start(self, batch, batch_idx):
        self._prodigy().train()

    def on_validation_epoch_start(self):
        if self.trainer.training:  # validation during fit: the averaged weights
            self._prodigy().eval()

    def on_train_end(self):
        self._prodigy().eval()  # what you export or test afterwards

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        d = self._prodigy().metrics()["d/0"]
        self.d.append(d)
        self.log("d", d, prog_bar=True)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self.net(x), y), prog_bar=True)


def main(argv: list[str] | None = None) -> list[float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--out", default="runs/lightning")
    args = parser.parse_args(argv)

    pl.seed_everything(0, verbose=False)
    model = CharModel()
    train = torch.utils.data.DataLoader(byte_windows(64 * args.steps, 0), batch_size=64, shuffle=True)
    val = torch.utils.data.DataLoader(byte_windows(512, 1), batch_size=256)
    trainer = pl.Trainer(max_steps=args.steps, accelerator="cpu", devices=1, default_root_dir=args.out,
                         logger=False, enable_checkpointing=False, enable_model_summary=False,
                         enable_progress_bar=False, val_check_interval=max(1, args.steps // 2))
    trainer.fit(model, train, val)
    print(f"d: {model.d[0]:.3g} -> {model.d[-1]:.3g}; val loss {trainer.callback_metrics['val_loss']:.3f}")
    return model.d


if __name__ == "__main__":
    main()
