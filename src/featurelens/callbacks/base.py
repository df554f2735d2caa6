"""The one Lightning callback of the analyses: when they run, where their results go, how they survive a resume.

Every registered analysis (``featurelens.analysis.base``) runs in :class:`AnalysisCallback` as
``AnalysisCallback(analysis=<name>, every_n_epochs=…, **its config)``, the node ``analysis=<name>`` composes.
The callback

- runs it at epoch 0 (``on_train_start``, before any optimiser step) and after every ``every_n_epochs``-th
  epoch (``on_validation_end``, after the epoch's validation metrics exist and before ``ModelCheckpoint``
  saves, so the checkpoint holds the record; ``on_train_epoch_end`` when no validation ran), never during
  Lightning's sanity check;
- puts the model in eval mode, disables gradients and forks the RNG, restoring all of it afterwards, so an
  analysis never perturbs training;
- writes one line per analysed epoch to the run log (``train.log``): its ``headline`` values and how long the
  computation and the report took;
- logs ``<name>/<key>`` scalars to every logger (and the report's tables, figures, galleries and histograms to
  W&B), appends the record to ``<run_dir>/analysis/<name>/results.jsonl`` and keeps it in ``history``, which is
  checkpointed with the analysis' own state (``Analysis.state_dict``), so a resumed run rewrites the file from
  the history and continues without duplicated or lost epochs;
- runs on every rank for a ``sharded`` analysis (its torchmetrics states sync), else on rank 0 only.

``run_once`` is the same pipeline without a Trainer, used by ``analyze.py``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.loggers import Logger, WandbLogger
from torch import nn

from featurelens.analysis.base import Analysis, Result
from featurelens.analysis.hooks import analysis_mode
from featurelens.api import get as get_analysis
from featurelens.results import ResultsFile, jsonable, write_json

log = logging.getLogger("featurelens")


@dataclass
class AnalysisContext:
    """Everything an analysis may need besides the model."""

    run_dir: Path
    epoch: int
    step: int
    final: bool = False
    loggers: list[Logger] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    datamodule: Any = None  # the ImageDataModule, for analyses that stream over a split
    shard: tuple[int, int] = (0, 1)  # (rank, world size): streaming analyses split their data across ranks


def wandb_loggers(loggers: list[Logger]) -> list[WandbLogger]:
    return [lg for lg in loggers if isinstance(lg, WandbLogger)]


def log_scalars(loggers: list[Logger], scalars: dict[str, float], step: int) -> None:
    for lg in loggers:
        lg.log_metrics(scalars, step=step)


class AnalysisCallback(pl.Callback):
    """Schedules the registered analysis ``analysis`` (built from ``params``, its config fields) in training and
    serves ``analyze.py`` through :meth:`run_once`; see the module docstring. ``every_n_epochs``: None analyses
    epoch 0 and the last epoch only."""

    def __init__(self, analysis: str, every_n_epochs: int | None = 1, **params: Any):
        super().__init__()
        cls = get_analysis(analysis)
        self.analysis: Analysis = cls(**params)
        self.name, self.headline = cls.name, cls.headline
        self.rank_zero_only = not cls.sharded  # analyses on identical weights need only rank 0
        self.result: Result | None = None  # the last typed result
        self.every_n_epochs = every_n_epochs
        self.history: list[dict[str, Any]] = []
        self.run_dir: Path | None = None

    # ------------------------------------------------------------------ the analysis
    def compute(self, model: nn.Module, ctx: AnalysisContext) -> dict[str, Any]:
        """The analysis' values for this epoch; scalars (floats) are logged, other values kept."""
        if ctx.datamodule is None:
            raise RuntimeError(f"{self.name} needs the data module (training or validation images)")
        self.result = self.analysis.run(model, ctx.datamodule, epoch=ctx.epoch, shard=ctx.shard, final=ctx.final)
        return self.result.values

    def report(self, ctx: AnalysisContext) -> None:
        """Write this epoch's files and figures; its tables, figures, galleries and histograms go to W&B too."""
        if self.result is None:
            return
        written = self.analysis.report(self.result, self.out_dir, final=ctx.final, history=self.history)
        loggers = wandb_loggers(ctx.loggers)
        if not loggers:
            return
        import wandb

        histograms = {f"{self.name}/{key}": wandb.Histogram(np_histogram=(counts, edges))
                      for key, (counts, edges) in written.histograms.items()}
        for lg in loggers:
            if histograms:
                lg.log_metrics(histograms, step=ctx.step)
            for key, (columns, rows) in written.tables.items():
                lg.log_table(key=f"{self.name}/{key}", columns=columns, data=rows, step=ctx.step)
            for key, path in written.figures.items():
                lg.log_image(key=f"{self.name}/{key}", images=[str(path)], step=ctx.step)
            for key, paths in written.galleries.items():
                if paths:
                    lg.log_image(key=f"{self.name}/{key}", images=[str(p) for p in paths],
                                 caption=[p.stem for p in paths], step=ctx.step)

    # ------------------------------------------------------------------ engine
    @property
    def out_dir(self) -> Path:
        assert self.run_dir is not None, "run_dir is set in setup() or run_once()"
        return self.run_dir / "analysis" / self.name

    @property
    def results(self) -> ResultsFile:
        return ResultsFile(self.out_dir / "results.jsonl")

    def analyze(self, model: nn.Module, ctx: AnalysisContext) -> dict[str, Any]:
        """Compute, record, log and report one epoch."""
        if ctx.shard[0] == 0:
            log.info("%s: analysing epoch %d ...", self.name, ctx.epoch)
        start = time.perf_counter()
        with analysis_mode(model):
            values = self.compute(model, ctx)
        computed = time.perf_counter()
        scalars = {f"{self.name}/{k}": float(v) for k, v in values.items() if isinstance(v, int | float)}
        record = {"epoch": ctx.epoch, "step": ctx.step, **ctx.metrics, **scalars,
                  **{f"{self.name}/{k}": v for k, v in values.items() if not isinstance(v, int | float)}}
        record = jsonable(record)
        self.history = [r for r in self.history if r["epoch"] != ctx.epoch] + [record]
        if ctx.shard[0] == 0:  # every rank computes (and syncs); rank 0 writes
            self.results.append(record)
            log_scalars(ctx.loggers, {**scalars, "epoch": ctx.epoch}, ctx.step)
            self.report(ctx)
            shown = ", ".join(f"{k}={values[k]:.4g}" for k in self.headline if isinstance(values.get(k), int | float))
            log.info("%s epoch %d: %s (%.1f s, report %.1f s)", self.name, ctx.epoch, shown or "done",
                     computed - start, time.perf_counter() - computed)
        return record

    def finish(self, ctx: AnalysisContext) -> dict[str, float]:
        summary = {f"{self.name}/summary/{k}": v for k, v in self.analysis.summarize(self.history).items()}
        if summary:
            log_scalars(ctx.loggers, summary, ctx.step)
        write_json(self.out_dir / "summary.json", {"epochs": [r["epoch"] for r in self.history], **summary})
        return summary

    def run_once(self, model: nn.Module, ctx: AnalysisContext) -> dict[str, Any]:
        """Analyse a finished model outside training (``analyze.py``)."""
        self.run_dir = ctx.run_dir
        self.history = []
        self.results.rewrite([])
        record = self.analyze(model, ctx)
        self.finish(ctx)
        return record

    # ------------------------------------------------------------------ Lightning hooks
    def _context(self, trainer: pl.Trainer, pl_module: pl.LightningModule, epoch: int) -> AnalysisContext:
        # val/* of this epoch's validation; train/* of this epoch, computed by the module after validation
        # (Lightning's own train epoch values only appear after the callbacks ran, one epoch late)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/") and v.numel() == 1}
        metrics.update(getattr(pl_module, "epoch_train_metrics", {}))
        return AnalysisContext(self.run_dir, epoch, trainer.global_step, self._final(trainer, epoch), trainer.loggers,
                               metrics, trainer.datamodule,
                               (trainer.global_rank, trainer.world_size))

    @staticmethod
    def _final(trainer: pl.Trainer, epoch: int) -> bool:
        return bool((trainer.max_epochs is not None and 0 < trainer.max_epochs <= epoch) or trainer.should_stop)

    def _active(self, trainer: pl.Trainer) -> bool:
        return (trainer.is_global_zero or not self.rank_zero_only) and not trainer.sanity_checking

    def _maybe_analyze(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        due = (self.every_n_epochs is not None and epoch % self.every_n_epochs == 0) or self._final(trainer, epoch)
        if not self._active(trainer) or not due or any(r["epoch"] == epoch for r in self.history):
            return
        self.analyze(pl_module.net if hasattr(pl_module, "net") else pl_module,
                     self._context(trainer, pl_module, epoch))

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.run_dir = Path(trainer.default_root_dir)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._active(trainer):
            return
        if trainer.is_global_zero:
            self.results.rewrite(self.history)  # a resumed run continues the restored history
        if trainer.global_step == 0 and not any(r["epoch"] == 0 for r in self.history):
            self.analyze(pl_module.net if hasattr(pl_module, "net") else pl_module,
                         self._context(trainer, pl_module, 0))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == "fit" and trainer.val_check_batch == trainer.num_training_batches:
            self._maybe_analyze(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._maybe_analyze(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero and self.history:
            self.finish(self._context(trainer, pl_module, self.history[-1]["epoch"]))

    @property
    def state_key(self) -> str:  # one callback per analysis, each with its own state
        return self._generate_state_key(analysis=self.name)

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history, "analysis": self.analysis.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))
        self.analysis.load_state_dict(state_dict.get("analysis", {}))
