"""Feature chirality per epoch (spec: ``shared/spec/chirality.md``); the measure is in ``analysis.chirality``.

Files under ``<run_dir>/analysis/chirality/``: ``results.jsonl`` (every value, every epoch, including the
per-layer ρ histograms), ``summary.json``, and at the histogram epochs (0, every ``hist_every``-th, last)
``table_epoch<E>.csv`` and the figures:
``chirality_vs_epoch.png`` (C_ℓ per layer and C_model vs epoch),
``c_norm_by_layer.png`` (C_ℓ/c₀ against layer index, one curve per histogram epoch),
``rho_hist_first_last.png`` (per-kernel ρ at the first and the latest epoch) and, at the final epoch,
``conv1_by_rho.png`` (the first layer's filters sorted by ρ).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from torch import nn

from featurelens import plots
from featurelens.analysis import chirality as chi
from featurelens.callbacks.base import AnalysisCallback, AnalysisContext, wandb_loggers
from featurelens.errors import ConfigError

TABLE_COLUMNS = ["layer", "kernel", "n_slices", "C", "C_pooled", "C_norm", "frac_sym", "frac_anti"]


class ChiralityCallback(AnalysisCallback):
    """Kernel chirality of every eligible conv at epoch 0 and after every ``every_n_epochs`` epochs.

    ``fmap`` switches the activation-level variant on the fixed probe set (``n_probe`` validation images,
    at ``width``: ``auto`` picks the input width if it commutes with the mirror, else the nearest width
    that does); ``setlevel`` adds the conv1 set-level value.
    """

    name = "chirality"
    headline = ("model", "model_pooled")

    def __init__(self, every_n_epochs: int = 1, flips: Sequence[str] = ("h", "v", "d4"), eps: float = 1e-12,
                 include_fc_as_conv: bool = False, hist_bins: int = 40, sym_threshold: float = 0.9,
                 hist_every: int = 5, fmap: dict[str, Any] | None = None, setlevel: bool = False):
        fmap = {"enabled": True, "n_probe": 500, "width": "auto", "seed": 0, "every_n_epochs": 5, **(fmap or {})}
        super().__init__(every_n_epochs, probe_size=fmap["n_probe"], probe_seed=fmap["seed"])
        valid = ("h", "v", "d4")
        if not set(flips) <= set(valid) or "h" not in flips:
            raise ConfigError(f"analysis.chirality.flips={list(flips)} must include 'h' and be drawn from "
                              f"{list(valid)}")
        if hist_bins < 2 or not 0 < sym_threshold < 1 or eps <= 0 or hist_every < 1:
            raise ConfigError(f"analysis.chirality: need hist_bins >= 2, 0 < sym_threshold < 1, eps > 0, "
                              f"hist_every >= 1 (got {hist_bins}, {sym_threshold}, {eps}, {hist_every})")
        if fmap["width"] != "auto" and not (isinstance(fmap["width"], int) and fmap["width"] > 0):
            raise ConfigError(f"analysis.chirality.fmap.width={fmap['width']!r}: use 'auto' or a positive int")
        self.flips, self.eps, self.include_fc_as_conv = tuple(flips), eps, include_fc_as_conv
        self.hist_bins, self.sym_threshold, self.hist_every = hist_bins, sym_threshold, hist_every
        self.fmap, self.setlevel = fmap, setlevel
        self._warned = False

    # ------------------------------------------------------------------ analysis
    def compute(self, model: nn.Module, ctx: AnalysisContext) -> dict[str, Any]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            res = chi.model_chirality(model, flips=self.flips, eps=self.eps, hist_bins=self.hist_bins,
                                      sym_threshold=self.sym_threshold,
                                      include_fc_as_conv=self.include_fc_as_conv)
        if caught and not self._warned:  # e.g. an MLP has no eligible layer: say so once per run
            self._warned = True
            for w in caught:
                warnings.warn(str(w.message), stacklevel=2)
        values: dict[str, Any] = dict(res["scalars"])
        for name, stats in res["layers"].items():
            values[f"hist/{name}"] = stats["hist"]
            values[f"kernel/{name}"] = f"{stats['kh']}x{stats['kw']}"
            values[f"layer/{name}/n_slices"] = int(stats["n_slices"])
        if self.fmap["enabled"] and res["layers"] and ctx.probe is not None and (
                ctx.epoch % self.fmap["every_n_epochs"] == 0 or ctx.final):
            x, _ = ctx.probe()
            width = self.fmap["width"]
            if width == "auto":
                width = chi.compatible_width(model, x.shape[-1], in_channels=x.shape[1])
            if width != x.shape[-1]:
                x = F.interpolate(x, size=(width, width), mode="bilinear", align_corners=False, antialias=True)
            values.update(chi.fmap_chirality(model, x))
            values["fmap_width"] = int(width)
        if self.setlevel and res["layers"]:
            values["set_conv1"] = chi.set_level_conv1(chi.eligible_convs(model)[0][1])
        return values

    def summarize(self, ctx: AnalysisContext) -> dict[str, float]:
        pairs = [(r["chirality/model"], r["val/acc"]) for r in self.history
                 if r["epoch"] >= 1 and r.get("val/acc") is not None and r.get("chirality/model") is not None]
        if len(pairs) < 3:
            return {}
        c, acc = np.array(pairs).T
        rho = spearmanr(c, acc).statistic
        return {"spearman_acc": float(rho)} if np.isfinite(rho) else {}

    # ------------------------------------------------------------------ reporting
    def _hist_epoch(self, ctx: AnalysisContext) -> bool:
        return ctx.epoch == 0 or ctx.epoch % self.hist_every == 0 or ctx.final

    def report(self, model: nn.Module, ctx: AnalysisContext, record: dict[str, Any]) -> None:
        layers = [k.removeprefix("chirality/hist/") for k in record if k.startswith("chirality/hist/")]
        if not layers:
            return
        edges = np.linspace(-1, 1, self.hist_bins + 1)
        self._log_wandb_histograms(ctx, record, layers, edges)
        if self._hist_epoch(ctx):  # figures cost more than the measure itself: draw them at hist epochs
            self._plot_trajectory(layers)
            self._plot_histograms(layers, edges)
            self._plot_layer_profile(layers)
            self._write_table(ctx, record, layers)
            for key in ("chirality_vs_epoch", "rho_hist_first_last", "c_norm_by_layer"):
                self._figure(ctx, key)
        if ctx.final:
            self._plot_conv1(model)
            self._figure(ctx, "conv1_by_rho")

    def _figure(self, ctx: AnalysisContext, key: str) -> None:
        path = self.out_dir / f"{key}.png"
        for lg in wandb_loggers(ctx.loggers):
            if path.exists():
                lg.log_image(key=f"chirality/{key}", images=[str(path)], step=ctx.step)

    def _log_wandb_histograms(self, ctx: AnalysisContext, record: dict, layers: list[str], edges) -> None:
        loggers = wandb_loggers(ctx.loggers)
        if not loggers:
            return
        import wandb

        hists = {f"chirality/rho_hist/{n}": wandb.Histogram(np_histogram=(record[f"chirality/hist/{n}"], edges))
                 for n in layers}
        for lg in loggers:
            lg.log_metrics(hists, step=ctx.step)

    def _plot_trajectory(self, layers: list[str]) -> None:
        epochs = [r["epoch"] for r in self.history]
        series = {n: [r.get(f"chirality/layer/{n}/c") for r in self.history] for n in layers}
        series = {"model (mean of layers)": [r.get("chirality/model") for r in self.history], **series}
        plots.line_plot(epochs, series, self.out_dir / "chirality_vs_epoch.png", xlabel="epoch",
                        ylabel="kernel chirality C (mean over slices)", title="Feature chirality per layer",
                        legend_cols=2)

    def _plot_histograms(self, layers: list[str], edges: np.ndarray) -> None:
        first, last = self.history[0], self.history[-1]
        hists = {n: {f"epoch {first['epoch']}": first[f"chirality/hist/{n}"],
                     **({f"epoch {last['epoch']}": last[f"chirality/hist/{n}"]} if last is not first else {})}
                 for n in layers if f"chirality/hist/{n}" in first}
        plots.histogram_grid(edges, hists, self.out_dir / "rho_hist_first_last.png",
                             xlabel="ρ = cos(w, Tw)", title="Per-kernel ρ, first vs latest epoch")

    def _plot_layer_profile(self, layers: list[str]) -> None:
        hist_records = [r for r in self.history if r["epoch"] == 0 or r["epoch"] % self.hist_every == 0
                        or r is self.history[-1]]
        series = {f"epoch {r['epoch']}": [r.get(f"chirality/layer/{n}/c_norm") for n in layers]
                  for r in hist_records}
        plots.line_plot(list(range(len(layers))), series, self.out_dir / "c_norm_by_layer.png",
                        xlabel="layer", ylabel="C / c₀ (1 = random init)", hline=1.0,
                        xticks=layers, title="Chirality relative to the random-init baseline")

    def _write_table(self, ctx: AnalysisContext, record: dict, layers: list[str]) -> None:
        rows = [[n, record[f"chirality/kernel/{n}"], record[f"chirality/layer/{n}/n_slices"],
                 record.get(f"chirality/layer/{n}/c"), record.get(f"chirality/layer/{n}/c_pooled"),
                 record.get(f"chirality/layer/{n}/c_norm"), record.get(f"chirality/layer/{n}/frac_sym"),
                 record.get(f"chirality/layer/{n}/frac_anti")] for n in layers]
        import pandas as pd

        pd.DataFrame(rows, columns=TABLE_COLUMNS).to_csv(self.out_dir / f"table_epoch{ctx.epoch}.csv", index=False)
        for lg in wandb_loggers(ctx.loggers):
            lg.log_table(key="chirality/table", columns=TABLE_COLUMNS, data=rows, step=ctx.step)

    def _plot_conv1(self, model: nn.Module) -> None:
        convs = chi.eligible_convs(model)
        if not convs:
            return
        name, weight = convs[0]
        w = weight.detach().double().cpu()
        rho = chi.layer_stats(w, eps=self.eps, flips=("h",))["rho_filter"].nan_to_num(-2.0)  # dead filters last
        order = torch.argsort(rho, descending=True)[:64]
        labels = [f"{rho[i]:+.2f}" if rho[i] >= -1 else "zero" for i in order]
        plots.filter_montage(w[order].numpy(), labels, self.out_dir / "conv1_by_rho.png",
                             title=f"{name} filters sorted by per-filter ρ (pooled over input channels)")
