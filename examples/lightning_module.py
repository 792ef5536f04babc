"""AdaBound in a Lightning module, with a checkpoint and a resume.

``configure_optimizers`` returns dynabound's AdaBound and a learning-rate scheduler stepped
every batch. The same training runs twice: once straight through, once for the first epoch
only, then resumed from that epoch's checkpoint with ``trainer.fit(..., ckpt_path=...)`` in a
fresh Trainer and module. Both end with the same weights, bit for bit.

Lightning starts an epoch that was cut short over from its first batch, so the resumable
checkpoint here is the one written at the end of an epoch.

Needs ``pip install lightning``. Run ``python examples/lightning_module.py``.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch

from dynabound import AdaBound

BATCH = 4


class Regression(pl.LightningModule):
    """A small MLP fitting a linear map, trained with AdaBound."""

    def __init__(self, lr: float = 1e-2, final_lr: float = 0.05, gamma: float = 0.5) -> None:
        super().__init__()
        self.save_hyperparameters()  # stored in the checkpoint with the weights
        self.net = torch.nn.Sequential(
            torch.nn.Linear(6, 16), torch.nn.LayerNorm(16), torch.nn.Tanh(), torch.nn.Linear(16, 2)
        )

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        hp = self.hparams
        optimizer = AdaBound(self.parameters(), lr=hp.lr, final_lr=hp.final_lr, gamma=hp.gamma)
        # the decayed lr scales both bounds too; final_lr stays relative to base_lr
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.8)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }


def make_loader(batches: int) -> torch.utils.data.DataLoader:
    """``batches`` batches of a fixed regression problem, always in the same order."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batches * BATCH, 6, generator=g)
    y = x @ torch.randn(6, 2, generator=g) + 0.1 * torch.randn(len(x), 2, generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=BATCH)


def fit(
    checkpoint_dir: Path, epochs: int, batches: int, ckpt_path: Path | None = None
) -> pl.Trainer:
    """Trains a fresh module for ``epochs`` epochs, from ``ckpt_path`` if given, writing a
    checkpoint after every epoch."""
    checkpoints = pl.callbacks.ModelCheckpoint(
        dirpath=checkpoint_dir, every_n_epochs=1, save_top_k=-1, save_on_train_epoch_end=True
    )
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        callbacks=[checkpoints],
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
    )
    with warnings.catch_warnings():
        # a loader this small needs no worker processes
        warnings.filterwarnings("ignore", message=".*(num_workers|bottleneck).*")
        pl.seed_everything(0, verbose=False)  # the same initial weights in every run
        trainer.fit(Regression(), make_loader(batches), ckpt_path=ckpt_path)
    return trainer


def main(steps: int = 12, workdir: str | Path | None = None) -> dict[str, pl.Trainer]:
    """Train ``steps`` steps (two epochs) straight through, then again as one epoch and a
    resume from its checkpoint; returns both trainers, ``{"uninterrupted": ...,
    "resumed": ...}``."""
    batches = steps // 2
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(workdir or tmp)

        uninterrupted = fit(root / "uninterrupted", epochs=2, batches=batches)

        fit(root / "interrupted", epochs=1, batches=batches)
        (checkpoint,) = (root / "interrupted").glob("*.ckpt")
        resumed = fit(root / "resumed", epochs=2, batches=batches, ckpt_path=checkpoint)

    a, b = uninterrupted.lightning_module.state_dict(), resumed.lightning_module.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a), "the resumed run ended elsewhere"
    return {"uninterrupted": uninterrupted, "resumed": resumed}


if __name__ == "__main__":
    runs = main()
    lr = runs["resumed"].optimizers[0].param_groups[0]["lr"]
    print(f"resumed run equals the uninterrupted one after {runs['resumed'].global_step} steps")
    print(f"lr after the scheduler: {lr:.2e}")
