"""The LightningModule: a classifier around any ``nn.Module`` built from a primitive model config."""

from __future__ import annotations

import math
import random
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torch import nn
from torchmetrics import MaxMetric, MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from featurelens.analysis.hooks import find_head
from featurelens.errors import ConfigError, DivergedError, NonFiniteLossError


def bn_settle_steps(net: nn.Module) -> int:
    """Training steps after which every BatchNorm's running statistics weigh their initial values below 1%:
    (1 - momentum)^n < 0.01, 44 steps at torch's momentum 0.1; 0 without BatchNorm or with cumulative averages
    (``momentum=None``)."""
    momenta = [m.momentum for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
               and m.track_running_stats and m.momentum is not None and 0 < m.momentum < 1]
    return max((math.ceil(math.log(0.01) / math.log1p(-m)) for m in momenta), default=0)


class Classifier(pl.LightningModule):
    """Cross-entropy classifier; ``net`` is built from ``model_cfg`` so a checkpoint rebuilds itself.

    ``model_cfg`` is the composed ``model`` config as plain containers (``_target_`` plus arguments);
    ``optimizer`` and ``scheduler`` are ``_partial_`` configs completed in ``configure_optimizers``;
    ``data_info`` records what the net was trained on (classes, channels, input size, normalisation),
    so ``analyze.py`` can rebuild the preprocessing from the checkpoint alone. ``net`` passes an already
    built (and initialised) net; a checkpoint rebuilds it from ``model_cfg``.

    ``divergence_factor``: the run stops with :class:`DivergedError` when a training step's loss, or the
    validation loss of two epochs in a row, exceeds this multiple of the reference max(ln C, first training
    loss): ln C is the loss of a uniform guess and the first loss what the init gives, so a loss 20 times both
    means logits that grew far past anything the model started from (null: only NaN/inf stop the run). One
    epoch's validation loss alone is not enough: early in training a BN net evaluated with running statistics
    that lag the fast-moving weights can score far above the bound (ResNet-50 on shapes, epoch 0, warm-up to
    lr 0.1: val loss 4224, 65x the bound, with a training loss of 3-5) and recover (at lr 0.025: val loss 430
    at epoch 0, 3.97 at epoch 1). Nor does a validation loss count before :func:`bn_settle_steps` training steps:
    until then the running statistics are mostly their initial values (``debug=limit`` on ResNet-18, 5 steps
    an epoch: val loss 631 at epoch 2, training loss about 2.4).
    At the start of every training epoch the global RNGs (torch, numpy, python; dropout and the like) are
    re-seeded from (``run_info.seed``, epoch), so a resumed run continues exactly as the uninterrupted one.
    """

    def __init__(self, model_cfg: dict[str, Any], optimizer: dict[str, Any],
                 scheduler: dict[str, Any] | None = None, data_info: dict[str, Any] | None = None,
                 run_info: dict[str, Any] | None = None, net: nn.Module | None = None,
                 divergence_factor: float | None = 20.0):
        super().__init__()
        self.save_hyperparameters(logger=False, ignore=["net"])
        self.net: nn.Module = net if net is not None else instantiate(model_cfg)
        num_classes = model_cfg["num_classes"]
        self.loss_ref: float | None = None  # max(ln C, first training loss); checkpointed
        self.val_over_bound = 0  # consecutive validation epochs above the bound; checkpointed
        self.epoch_train_metrics: dict[str, float] = {}  # this epoch's train/acc and train/loss_epoch
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

    def _optimizer_settings(self) -> str:
        opt = self.hparams.optimizer
        args = ", ".join(f"{k}={v}" for k, v in opt.items() if not k.startswith("_"))
        return f"{str(opt.get('_target_')).rsplit('.', 1)[-1]}({args})"

    def _check_loss(self, loss: float, what: str, patience: int = 1, bounded: bool = True) -> None:
        """NaN/inf stop at once; a loss above the bound stops once ``patience`` checks in a row were above it
        (``bounded=False``: NaN/inf only, and the count restarts)."""
        where = f"at epoch {self.current_epoch}, step {self.global_step}"
        hint = f"optimizer {self._optimizer_settings()}; checkpoints/last.ckpt keeps the last good epoch"
        if not math.isfinite(loss):
            raise NonFiniteLossError(f"{what} loss became {loss} {where} (lr too high? {hint})")
        factor = self.hparams.divergence_factor
        over = bounded and factor is not None and self.loss_ref is not None and loss > factor * self.loss_ref
        if patience > 1:
            self.val_over_bound = self.val_over_bound + 1 if over else 0
            over = self.val_over_bound >= patience
        if over:
            again = f" ({patience} epochs in a row)" if patience > 1 else ""
            raise DivergedError(f"{what} loss {loss:.4g} {where} exceeds {factor:g} x {self.loss_ref:.4g}{again} "
                                f"(max of ln C and the first training loss): the run diverged; {hint}; "
                                "lower optimizer.lr or raise model.recipe.warmup_epochs")

    def on_train_epoch_start(self) -> None:
        self.epoch_train_metrics = {}
        seed = int((self.hparams.run_info or {}).get("seed") or 0)
        state = np.random.SeedSequence([seed, self.current_epoch]).generate_state(1)[0]
        torch.manual_seed(int(state))
        np.random.seed(int(state))
        random.seed(int(state))

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        loss, pred, y = self._step(batch)
        value = float(loss.detach())
        if self.loss_ref is None:
            self.loss_ref = max(math.log(self.hparams.model_cfg["num_classes"]), value)
        self._check_loss(value, "training")
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
        if self.trainer.state.fn == "fit" and self.train_loss.update_count:
            # Lightning logs the train epoch metrics only after validation: computed here (on every rank),
            # the analyses that run after validation record this epoch's values, not the previous one's
            self.epoch_train_metrics = {"train/acc": float(self.train_acc.compute()),
                                        "train/loss_epoch": float(self.train_loss.compute())}
            self._check_loss(float(self.val_loss.compute()), "validation", patience=2,
                             bounded=self.global_step >= bn_settle_steps(self.net))

    def test_step(self, batch, batch_idx: int) -> None:
        loss, pred, y = self._step(batch)
        self.test_loss(loss)
        self.test_acc(pred, y)
        self.log("test/loss", self.test_loss, on_step=False, on_epoch=True)
        self.log("test/acc", self.test_acc, on_step=False, on_epoch=True)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # torchmetrics states are not in the state dict: the best val acc so far must survive a resume
        checkpoint["featurelens"] = {"loss_ref": self.loss_ref, "val_over_bound": self.val_over_bound,
                                     "val_acc_best": float(self.val_acc_best.max_value)}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("featurelens", {})
        self.loss_ref = state.get("loss_ref")
        self.val_over_bound = int(state.get("val_over_bound", 0))
        if state.get("val_acc_best") is not None:
            self.val_acc_best.max_value.fill_(state["val_acc_best"])

    def _param_groups(self, lr: float, head_lr_scale: float) -> list[dict[str, Any]]:
        """One group, or two when the head (``model_cfg.head_module``) learns at ``head_lr_scale`` × ``lr``."""
        if head_lr_scale == 1:
            return [{"params": list(self.net.parameters())}]
        name = self.hparams.model_cfg["head_module"]
        try:
            in_head = {id(p) for p in find_head(self.net, head_module=name)[1].parameters()}
        except ValueError as err:
            raise ConfigError(f"model.head_module={name!r} (for optimizer.head_lr_scale={head_lr_scale}): "
                              f"{err}") from None
        return [{"params": [p for p in self.net.parameters() if id(p) not in in_head]},
                {"params": [p for p in self.net.parameters() if id(p) in in_head], "lr": lr * head_lr_scale}]

    def configure_optimizers(self) -> dict[str, Any]:
        opt_cfg = dict(self.hparams.optimizer)
        groups = self._param_groups(opt_cfg["lr"], opt_cfg.pop("head_lr_scale", 1))
        optimizer = instantiate(opt_cfg)(params=groups)
        if not self.hparams.scheduler:
            return {"optimizer": optimizer}
        cfg = dict(self.hparams.scheduler)
        interval = cfg.pop("interval", "epoch")  # per-batch schedules are told the run's length in steps
        extra = {"total_steps": self.trainer.estimated_stepping_batches} if interval == "step" else {}
        scheduler = instantiate(cfg)(optimizer=optimizer, **extra)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": interval}}

