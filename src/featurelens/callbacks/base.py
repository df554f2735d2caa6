"""The analysis-callback framework: when analyses run, where their results go, how they survive a resume.

A registered analysis (``featurelens.analysis.base``) runs in this generic callback as
``AnalysisCallback(analysis=<name>, every_n_epochs=…, **its config)``, the node ``analysis=<name>`` composes;
its state (``Analysis.state_dict``) is checkpointed with the callback. Analyses not yet registered subclass
:class:`AnalysisCallback` and implement :meth:`compute` (scalars) and optionally :meth:`report` (figures,
tables) and :meth:`summarize` (end-of-run scalars). The base class

- runs it at epoch 0 (``on_train_start``, before any optimiser step) and after every ``every_n_epochs``-th
  epoch (``on_validation_end``, after the epoch's validation metrics exist and before ``ModelCheckpoint``
  saves, so the checkpoint holds the record; ``on_train_epoch_end`` when no validation ran), never during
  Lightning's sanity check;
- puts the model in eval mode, disables gradients and forks the RNG, restoring all of it afterwards, so an
  analysis never perturbs training;
- writes one line per analysed epoch to the run log (``train.log``): its ``headline`` values and how long the
  computation and the report took;
- logs ``<name>/<key>`` scalars to every logger, appends the record to
  ``<run_dir>/analysis/<name>/results.jsonl`` and keeps it in ``history``, which is checkpointed, so a
  resumed run rewrites the file from the history and continues without duplicated or lost epochs.

``run_once`` is the same pipeline without a Trainer, used by ``analyze.py``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import Logger, WandbLogger
from torch import nn

from featurelens.analysis.base import Analysis, Result, model_input
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
    probe: Callable[[], tuple[torch.Tensor, torch.Tensor]] | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    datamodule: Any = None  # the ImageDataModule, for analyses that stream over a split
    shard: tuple[int, int] = (0, 1)  # (rank, world size): streaming analyses split their data across ranks
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))


def model_preprocess(ctx: AnalysisContext) -> Callable[[torch.Tensor], torch.Tensor]:
    """[0, 1] images (rendered or generated) -> the model's input: channels, size, training normalisation."""
    if ctx.datamodule is None or not hasattr(ctx.datamodule, "setup"):
        raise RuntimeError("the model's preprocessing needs a featurelens ImageDataModule")
    return model_input(ctx.datamodule, ctx.device)


def wandb_loggers(loggers: list[Logger]) -> list[WandbLogger]:
    return [lg for lg in loggers if isinstance(lg, WandbLogger)]


def log_scalars(loggers: list[Logger], scalars: dict[str, float], step: int) -> None:
    for lg in loggers:
        lg.log_metrics(scalars, step=step)


class AnalysisCallback(pl.Callback):
    """Base class of the analysis callbacks; see the module docstring."""

    name = "analysis"
    #: analyses on identical weights need only rank 0; accumulating (torchmetrics) analyses set False
    rank_zero_only = True
    #: the keys of :meth:`compute`'s values that the per-epoch log line shows
    headline: tuple[str, ...] = ()

    def __init__(self, every_n_epochs: int = 1, probe_size: int = 500, probe_seed: int = 0, *,
                 analysis: str | None = None, **params: Any):
        super().__init__()
        self.analysis: Analysis | None = None
        if analysis is not None:
            cls = get_analysis(analysis)
            self.analysis = cls(**params)
            self.name, self.headline, self.rank_zero_only = cls.name, cls.headline, not cls.sharded
        elif params:
            raise TypeError(f"unexpected parameters {sorted(params)} (no registered analysis given)")
        self.result: Result | None = None  # a registered analysis' last typed result
        self.every_n_epochs = every_n_epochs
        self.probe_size, self.probe_seed = probe_size, probe_seed
        self.history: list[dict[str, Any]] = []
        self.run_dir: Path | None = None
        self._probe: tuple[torch.Tensor, torch.Tensor] | None = None

    # ------------------------------------------------------------------ subclass API
    def compute(self, model: nn.Module, ctx: AnalysisContext) -> dict[str, Any]:
        """Return the analysis values for this epoch; scalars (floats) are logged, other values kept."""
        if self.analysis is None:
            raise NotImplementedError
        if ctx.datamodule is None:
            raise RuntimeError(f"{self.name} needs the data module (training or validation images)")
        self.result = self.analysis.run(model, ctx.datamodule, epoch=ctx.epoch, shard=ctx.shard, final=ctx.final)
        return self.result.values

    def report(self, model: nn.Module, ctx: AnalysisContext, record: dict[str, Any]) -> None:
        """Write figures and tables for this epoch (optional); a registered analysis' tables and figures go to
        W&B as well."""
        if self.analysis is None or self.result is None:
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

    def summarize(self, ctx: AnalysisContext) -> dict[str, float]:
        """End-of-run scalars computed from ``history`` (optional)."""
        return self.analysis.summarize(self.history) if self.analysis is not None else {}

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
            with analysis_mode(model):
                self.report(model, ctx, record)
            shown = ", ".join(f"{k}={values[k]:.4g}" for k in self.headline if isinstance(values.get(k), int | float))
            log.info("%s epoch %d: %s (%.1f s, report %.1f s)", self.name, ctx.epoch, shown or "done",
                     computed - start, time.perf_counter() - computed)
        return record

    def finish(self, ctx: AnalysisContext) -> dict[str, float]:
        summary = {f"{self.name}/summary/{k}": v for k, v in self.summarize(ctx).items()}
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
                               lambda: self._probe_batch(trainer, pl_module), metrics, trainer.datamodule,
                               (trainer.global_rank, trainer.world_size), pl_module.device)

    @staticmethod
    def _final(trainer: pl.Trainer, epoch: int) -> bool:
        return bool((trainer.max_epochs is not None and 0 < trainer.max_epochs <= epoch) or trainer.should_stop)

    def _probe_batch(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> tuple[torch.Tensor, torch.Tensor]:
        if self._probe is None:
            datamodule = trainer.datamodule
            if datamodule is None or not hasattr(datamodule, "probe_set"):
                raise RuntimeError(f"{self.name}: the probe set needs a featurelens ImageDataModule")
            self._probe = datamodule.probe_set(self.probe_size, self.probe_seed)
        x, y = self._probe
        return x.to(pl_module.device), y.to(pl_module.device)

    def _active(self, trainer: pl.Trainer) -> bool:
        return (trainer.is_global_zero or not self.rank_zero_only) and not trainer.sanity_checking

    def _maybe_analyze(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        due = epoch % self.every_n_epochs == 0 or self._final(trainer, epoch)
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
    def state_key(self) -> str:  # one generic callback per registered analysis, each with its own state
        return self._generate_state_key(analysis=self.name) if self.analysis is not None else super().state_key

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history, **({"analysis": self.analysis.state_dict()} if self.analysis else {})}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))
        if self.analysis is not None and "analysis" in state_dict:
            self.analysis.load_state_dict(state_dict["analysis"])
