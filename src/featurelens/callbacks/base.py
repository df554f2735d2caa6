"""The one Lightning callback of the analyses: when they run and how they survive a resume.

Every registered analysis (``featurelens.analysis.base``) runs in :class:`AnalysisCallback` as
``AnalysisCallback(analysis=<name>, every_n_epochs=…, **its config)``, the node ``analysis=<name>`` composes.
The callback schedules :class:`featurelens.runner.AnalysisRunner` (which computes, records, logs and reports an
epoch, with the model in eval mode and the RNG forked):

- at epoch 0 (``on_train_start``, before any optimiser step) and after every ``every_n_epochs``-th epoch
  (``on_validation_end``, after the epoch's validation metrics exist and before ``ModelCheckpoint`` saves, so
  the checkpoint holds the record; ``on_train_epoch_end`` when no validation ran), and the last, never during
  Lightning's sanity check;
- on every rank for a ``sharded`` analysis (its torchmetrics states sync), else on rank 0 only, with the
  other ranks held at an explicit barrier until it is done (the DDP strategy's ``timeout`` bounds the wait:
  ``conf/trainer/ddp.yaml``), so no rank runs ahead into the next collective;
- checkpointing the runner's ``history`` with the analysis' own state (``Analysis.state_dict``), so a resumed
  run rewrites the results file from the history and continues without duplicated or lost epochs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytorch_lightning as pl

from featurelens.api import get as get_analysis
from featurelens.runner import AnalysisContext, AnalysisRunner


class AnalysisCallback(pl.Callback):
    """Schedules the registered analysis ``analysis`` (built from ``params``, its config fields) in training;
    see the module docstring. ``every_n_epochs``: None analyses epoch 0 and the last epoch only."""

    def __init__(self, analysis: str, every_n_epochs: int | None = 1, **params: Any):
        super().__init__()
        cls = get_analysis(analysis)
        self.runner = AnalysisRunner(cls(**params))
        self.name = cls.name
        self.rank_zero_only = not cls.sharded  # analyses on identical weights need only rank 0
        self.every_n_epochs = every_n_epochs
        self._done: set[int] = set()  # analysed epochs, the same on every rank (rank 0 alone keeps the records)

    # ------------------------------------------------------------------ Lightning hooks
    def _context(self, trainer: pl.Trainer, pl_module: pl.LightningModule, epoch: int) -> AnalysisContext:
        # val/* of this epoch's validation; train/* of this epoch, computed by the module after validation
        # (Lightning's own train epoch values only appear after the callbacks ran, one epoch late)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/") and v.numel() == 1}
        metrics.update(getattr(pl_module, "epoch_train_metrics", {}))
        return AnalysisContext(self.runner.run_dir, epoch, trainer.global_step, self._final(trainer, epoch),
                               trainer.loggers, metrics, trainer.datamodule, (trainer.global_rank, trainer.world_size))

    @staticmethod
    def _final(trainer: pl.Trainer, epoch: int) -> bool:
        return bool((trainer.max_epochs is not None and 0 < trainer.max_epochs <= epoch) or trainer.should_stop)

    @staticmethod
    def _net(pl_module: pl.LightningModule):
        return pl_module.net if hasattr(pl_module, "net") else pl_module

    def _analyze(self, trainer: pl.Trainer, pl_module: pl.LightningModule, epoch: int) -> None:
        """Analyse ``epoch`` once: on every rank (sharded), or on rank 0 while the others wait at a barrier."""
        if epoch in self._done:
            return
        self._done.add(epoch)
        if trainer.is_global_zero or not self.rank_zero_only:
            self.runner.analyze(self._net(pl_module), self._context(trainer, pl_module, epoch))
        if self.rank_zero_only and trainer.world_size > 1:
            trainer.strategy.barrier(f"featurelens-{self.name}-epoch{epoch}")

    def _maybe_analyze(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        due = (self.every_n_epochs is not None and epoch % self.every_n_epochs == 0) or self._final(trainer, epoch)
        if due and not trainer.sanity_checking:
            self._analyze(trainer, pl_module, epoch)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.runner.run_dir = Path(trainer.default_root_dir)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            self.runner.results.rewrite(self.runner.history)  # a resumed run continues the restored history
        if trainer.global_step == 0:
            self._analyze(trainer, pl_module, 0)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == "fit" and trainer.val_check_batch == trainer.num_training_batches:
            self._maybe_analyze(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._maybe_analyze(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero and self.runner.history:
            self.runner.finish(self._context(trainer, pl_module, self.runner.history[-1]["epoch"]))

    @property
    def state_key(self) -> str:  # one callback per analysis, each with its own state
        return self._generate_state_key(analysis=self.name)

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.runner.history, "analysis": self.runner.analysis.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.runner.history = list(state_dict.get("history", []))
        self._done = {r["epoch"] for r in self.runner.history}  # every rank loads the same checkpoint
        self.runner.analysis.load_state_dict(state_dict.get("analysis", {}))
