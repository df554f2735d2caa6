"""The one plain runner of a registered analysis: compute, record, log and report an epoch, outside any Trainer.

:class:`AnalysisRunner` is what ``analyze.py`` runs once on a finished model and what the Lightning callback
(``featurelens.callbacks.AnalysisCallback``) runs at every scheduled epoch. For each analysed epoch it

- puts the model in eval mode, disables gradients and forks the RNG, restoring all of it afterwards, so an
  analysis never perturbs training;
- shows a progress bar over every pass an analysis makes over batches of the data (on a terminal), and
  writes a line to the run log (``train.log``) when it starts and when it ends: the analysis' ``headline``
  values and how long the computation and the report took;
- logs its scalars to every logger (:meth:`AnalysisRunner.log`; and the report's tables, figures, galleries
  and histograms to W&B), appends the record to ``<run_dir>/analysis/<name>/results.jsonl``, keeps it in
  ``history`` (which the callback checkpoints, so a resumed run rewrites the file from it) and refreshes the
  run's report page (``<run_dir>/report.html``, :mod:`featurelens.report_page`);
- on a shard other than rank 0 only computes (its torchmetrics states sync); rank 0 writes.
"""

from __future__ import annotations

import fnmatch
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import Logger, WandbLogger
from torch import nn
from tqdm.auto import tqdm

from featurelens import plots
from featurelens.analysis.base import Analysis, Result
from featurelens.analysis.hooks import analysis_mode
from featurelens.api import get as get_analysis
from featurelens.report_page import write_run_report
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


class _WithProgress:
    """``data`` whose ``batches(...)`` passes show a progress bar (``tqdm``, on a terminal only, so logs and
    batch jobs stay clean); everything else is ``data``'s own."""

    def __init__(self, data: Any, desc: str):
        self._data, self._desc = data, desc

    def batches(self, split: str, *args: Any, **kwargs: Any) -> Iterable:
        loader = self._data.batches(split, *args, **kwargs)
        total = len(loader) if hasattr(loader, "__len__") else None
        return tqdm(loader, desc=f"{self._desc} ({split} images)", total=total, leave=False, disable=None,
                    unit="batch")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._data, name)


def detail_key(name: str, key: str) -> str:
    """The logged name of analysis ``name``'s non-headline scalar ``key`` (see :meth:`AnalysisRunner.log`)."""
    return f"{name}_detail/{key}"


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
            data = _WithProgress(ctx.data, f"{self.name} epoch {ctx.epoch}") if ctx.shard[0] == 0 else ctx.data
            self.result = self.analysis.run(model, data, epoch=ctx.epoch, shard=ctx.shard, final=ctx.final)
        values = self.result.values
        computed = time.perf_counter()
        scalars = {f"{self.name}/{k}": float(v) for k, v in values.items() if isinstance(v, int | float)}
        record = {"epoch": ctx.epoch, "step": ctx.step, **ctx.metrics, **scalars,
                  **{f"{self.name}/{k}": v for k, v in values.items() if not isinstance(v, int | float)}}
        record = jsonable(record)
        self.history = [r for r in self.history if r["epoch"] != ctx.epoch] + [record]
        if ctx.shard[0] == 0:  # every rank computes (and syncs); rank 0 writes
            self.results.append(record)
            self.log(ctx, scalars)
            self.report(ctx)
            shown = ", ".join(f"{k}={values[k]:.4g}" for k in self.headline if isinstance(values.get(k), int | float))
            log.info("%s epoch %d: %s (%.1f s, report %.1f s)", self.name, ctx.epoch, shown or "done",
                     computed - start, time.perf_counter() - computed)
        return record

    def log(self, ctx: AnalysisContext, scalars: dict[str, float]) -> None:
        """The epoch's scalars to every logger: the headline ones as ``<name>/<key>``, the rest as
        ``<name>_detail/<key>`` (in W&B two sections, the headline apart from the per-layer detail), both with
        the ``epoch`` they are plotted against; the setup constants as hyperparameters (W&B: the run config)."""
        p = f"{self.name}/"
        constants = {k: v for k, v in scalars.items()
                     if any(fnmatch.fnmatchcase(k.removeprefix(p), pat) for pat in self.analysis.constants)}
        series = {k if k.removeprefix(p) in self.headline else detail_key(self.name, k.removeprefix(p)): v
                  for k, v in scalars.items() if k not in constants}
        for lg in ctx.loggers:
            if constants:
                lg.log_hyperparams(constants)
            lg.log_metrics({**series, "epoch": ctx.epoch}, step=ctx.step)

    def report(self, ctx: AnalysisContext) -> None:
        """Write this epoch's files and figures and refresh the run's ``report.html``; its tables, figures,
        galleries and histograms go to W&B too."""
        with plots.epoch_stamp(ctx.epoch):  # every figure says its epoch and is kept per epoch
            written = self.analysis.report(self.result, self.out_dir, final=ctx.final, history=self.history)
        write_run_report(ctx.run_dir)
        loggers = [lg for lg in ctx.loggers if isinstance(lg, WandbLogger)]
        if not loggers:
            return
        import wandb

        histograms = {f"{self.name}/{key}": wandb.Histogram(np_histogram=(counts, edges))
                      for key, (counts, edges) in written.histograms.items()}
        for lg in loggers:
            if histograms:
                lg.log_metrics(histograms, step=ctx.step)
            for key, (columns, rows) in written.tables.items():  # each with its epoch, to read across epochs
                lg.log_table(key=f"{self.name}/{key}", columns=["epoch", *columns],
                             data=[[ctx.epoch, *row] for row in rows], step=ctx.step)
            for key, path in written.figures.items():
                lg.log_image(key=f"{self.name}/{key}", images=[str(path)], step=ctx.step)
            for key, paths in written.galleries.items():
                if paths:
                    lg.log_image(key=f"{self.name}/{key}", images=[str(p) for p in paths],
                                 caption=[p.stem for p in paths], step=ctx.step)

    def finish(self, ctx: AnalysisContext) -> dict[str, float]:
        """End-of-run scalars (``<name>/summary/<key>``), logged and in ``summary.json`` with the epochs."""
        summary = {f"{self.name}/summary/{k}": v for k, v in self.analysis.summarize(self.history).items()}
        if summary:  # end-of-run values: W&B's run summary, not a one-point series
            for lg in ctx.loggers:
                if isinstance(lg, WandbLogger):
                    lg.experiment.summary.update(summary)
                else:
                    lg.log_metrics(summary, step=ctx.step)
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
