"""The one plain runner of a registered analysis: compute, record, log and report an epoch, outside any Trainer.

:class:`AnalysisRunner` is what ``analyze.py`` runs once on a finished model and what the Lightning callback
(``featurelens.callbacks.AnalysisCallback``) runs at every scheduled epoch. For each analysed epoch it

- puts the model in eval mode, disables gradients and forks the RNG, restoring all of it afterwards, so an
  analysis never perturbs training;
- writes one line to the run log (``train.log``): the analysis' ``headline`` values and how long the
  computation and the report took;
- logs ``<name>/<key>`` scalars to every logger (and the report's tables, figures, galleries and histograms to
  W&B), appends the record to ``<run_dir>/analysis/<name>/results.jsonl`` and keeps it in ``history`` (which
  the callback checkpoints, so a resumed run rewrites the file from it);
- on a shard other than rank 0 only computes (its torchmetrics states sync); rank 0 writes.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import Logger, WandbLogger
from torch import nn

from featurelens.analysis.base import Analysis, Result
from featurelens.analysis.hooks import analysis_mode
from featurelens.api import get as get_analysis
from featurelens.results import ResultsFile, jsonable, write_json

log = logging.getLogger("featurelens")

#: the keys of an ``analysis=<name>`` config node that are not the analysis' own config
SCHEDULE_KEYS = ("_target_", "_convert_", "analysis", "every_n_epochs")


@dataclass
class AnalysisContext:
    """Everything an analysed epoch needs besides the model."""

    run_dir: Path
    epoch: int
    step: int
    final: bool = False
    loggers: list[Logger] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)  # the epoch's training metrics, kept in the record
    data: Any = None  # the analysis' data (an ImageDataModule or anything with its batches/probe_set)
    shard: tuple[int, int] = (0, 1)  # (rank, world size): streaming analyses split their data across ranks


def log_scalars(loggers: list[Logger], scalars: dict[str, float], step: int) -> None:
    for lg in loggers:
        lg.log_metrics(scalars, step=step)


class AnalysisRunner:
    """Runs ``analysis`` (a registered :class:`~featurelens.analysis.base.Analysis`) epoch by epoch and keeps
    its records (``history``) and last typed result (``result``); see the module docstring."""

    def __init__(self, analysis: Analysis):
        self.analysis = analysis
        self.name, self.headline = analysis.name, analysis.headline
        self.result: Result | None = None
        self.history: list[dict[str, Any]] = []
        self.run_dir: Path | None = None

    @classmethod
    def from_node(cls, node: DictConfig) -> AnalysisRunner:
        """The runner of a composed ``analysis=<name>`` node (its schedule keys are the callback's)."""
        params = OmegaConf.to_container(node, resolve=True)
        name = params["analysis"]
        return cls(get_analysis(name)(**{k: v for k, v in params.items() if k not in SCHEDULE_KEYS}))

    @property
    def out_dir(self) -> Path:
        assert self.run_dir is not None, "run_dir is set by the callback's setup() or by run_once()"
        return self.run_dir / "analysis" / self.name

    @property
    def results(self) -> ResultsFile:
        return ResultsFile(self.out_dir / "results.jsonl")

    def analyze(self, model: nn.Module, ctx: AnalysisContext) -> dict[str, Any]:
        """Compute, record, log and report one epoch; returns its record."""
        if ctx.data is None:
            raise RuntimeError(f"{self.name} needs data (training or validation images)")
        if ctx.shard[0] == 0:
            log.info("%s: analysing epoch %d ...", self.name, ctx.epoch)
        start = time.perf_counter()
        with analysis_mode(model):
            self.result = self.analysis.run(model, ctx.data, epoch=ctx.epoch, shard=ctx.shard, final=ctx.final)
        values = self.result.values
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

    def report(self, ctx: AnalysisContext) -> None:
        """Write this epoch's files and figures; its tables, figures, galleries and histograms go to W&B too."""
        written = self.analysis.report(self.result, self.out_dir, final=ctx.final, history=self.history)
        loggers = [lg for lg in ctx.loggers if isinstance(lg, WandbLogger)]
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

    def finish(self, ctx: AnalysisContext) -> dict[str, float]:
        """End-of-run scalars (``<name>/summary/<key>``), logged and in ``summary.json`` with the epochs."""
        summary = {f"{self.name}/summary/{k}": v for k, v in self.analysis.summarize(self.history).items()}
        if summary:
            log_scalars(ctx.loggers, summary, ctx.step)
        write_json(self.out_dir / "summary.json", {"epochs": [r["epoch"] for r in self.history], **summary})
        return summary

    def run_once(self, model: nn.Module, ctx: AnalysisContext) -> dict[str, Any]:
        """Analyse a finished model outside training (``analyze.py``): a fresh results file, one record."""
        self.run_dir = ctx.run_dir
        self.history = []
        self.results.rewrite([])
        record = self.analyze(model, ctx)
        self.finish(ctx)
        return record
