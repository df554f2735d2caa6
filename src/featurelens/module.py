"""The LightningModule: a classifier around any ``nn.Module`` built from a primitive model config."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torch import nn
from torchmetrics import MaxMetric, MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from featurelens.errors import NonFiniteLossError


class Classifier(pl.LightningModule):
    """Cross-entropy classifier; ``net`` is built from ``model_cfg`` so a checkpoint rebuilds itself.

    ``model_cfg`` is the composed ``model`` config as plain containers (``_target_`` plus arguments);
    ``optimizer`` and ``scheduler`` are ``_partial_`` configs completed in ``configure_optimizers``;
    ``data_info`` records what the net was trained on (classes, channels, input size, normalisation),
    so ``analyze.py`` can rebuild the preprocessing from the checkpoint alone. ``net`` passes an already
    built (and initialised) net; a checkpoint rebuilds it from ``model_cfg``.
    """

    def __init__(self, model_cfg: dict[str, Any], optimizer: dict[str, Any],
                 scheduler: dict[str, Any] | None = None, data_info: dict[str, Any] | None = None,
                 run_info: dict[str, Any] | None = None, net: nn.Module | None = None):
        super().__init__()
        self.save_hyperparameters(logger=False, ignore=["net"])
        self.net: nn.Module = net if net is not None else instantiate(model_cfg)
        num_classes = model_cfg["num_classes"]
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        self.train_loss, self.val_loss, self.test_loss = MeanMetric(), MeanMetric(), MeanMetric()
        self.val_acc_best = MaxMetric()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, y = batch
        logits = self(x)
        return F.cross_entropy(logits, y), logits.argmax(dim=1), y

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        loss, pred, y = self._step(batch)
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"training loss became {loss.item()} at epoch {self.current_epoch}, step {self.global_step} "
                f"(lr too high? optimizer={self.hparams.optimizer.get('_target_')}, "
                f"lr={self.hparams.optimizer.get('lr')})")
        self.train_loss(loss)
        self.train_acc(pred, y)
        self.log("train/loss", self.train_loss, on_step=True, on_epoch=True, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        loss, pred, y = self._step(batch)
        self.val_loss(loss)
        self.val_acc(pred, y)
        self.log("val/loss", self.val_loss, on_step=False, on_epoch=True, prog_bar=True)
        self.log("val/acc", self.val_acc, on_step=False, on_epoch=True, prog_bar=True)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        self.val_acc_best(self.val_acc.compute())
        self.log("val/acc_best", self.val_acc_best.compute(), sync_dist=True)

    def test_step(self, batch, batch_idx: int) -> None:
        loss, pred, y = self._step(batch)
        self.test_loss(loss)
        self.test_acc(pred, y)
        self.log("test/loss", self.test_loss, on_step=False, on_epoch=True)
        self.log("test/acc", self.test_acc, on_step=False, on_epoch=True)

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = instantiate(self.hparams.optimizer)(params=self.trainer.model.parameters())
        if not self.hparams.scheduler:
            return {"optimizer": optimizer}
        scheduler = instantiate(self.hparams.scheduler)(optimizer=optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

