"""Ji et al.'s feature chirality of one model: kernel chirality of every eligible conv, and optionally the
activation-level (feature-map) variant on a fixed probe set and the conv1 set-level value."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from featurelens.analysis.base import Analysis, Data, Result, model_device, register
from featurelens.analysis.chirality import measure as chi
from featurelens.errors import ConfigError
from featurelens.models.names import display_name, paper_layer_names


@dataclass
class FmapConfig:
    """Activation-level chirality on a fixed, seeded probe set of validation images."""

    enabled: bool = True
    n_probe: int = 500
    width: Any = "auto"  # auto: the input width if mirror-compatible, else the nearest compatible width; or an int
    seed: int = 0
    every_n_epochs: int = 5  # and at epoch 0 and the last epoch (costs forward passes; kernels are cheap)


@dataclass
class ChiralityConfig:
    """The parameters of the chirality analysis (``analysis.chirality.<key>``)."""

    flips: list[str] = field(default_factory=lambda: ["h", "v", "d4"])  # h primary; v vertical; d4 best of 4
    eps: float = 1e-12  # slices with ||w|| <= eps are skipped and counted
    include_fc_as_conv: bool = False  # AlexNet/VGG first FC reshaped to a conv
    hist_bins: int = 40  # histogram of per-kernel rho on [-1, 1]
    sym_threshold: float = 0.9  # frac_sym: rho > t; frac_anti: rho < -t
    hist_every: int = 5  # tables and layer profiles at epoch 0, every hist_every-th and the last epoch
    setlevel: bool = False  # conv1 set-level value
    fmap: FmapConfig = field(default_factory=FmapConfig)

    def __post_init__(self):
        if isinstance(self.fmap, dict):
            self.fmap = FmapConfig(**self.fmap)
        self.flips = list(self.flips)
        valid = ("h", "v", "d4")
        if not set(self.flips) <= set(valid) or "h" not in self.flips:
            raise ConfigError(f"analysis.chirality.flips={self.flips} must include 'h' and be drawn from {list(valid)}")
        if self.hist_bins < 2 or not 0 < self.sym_threshold < 1 or self.eps <= 0 or self.hist_every < 1:
            raise ConfigError(f"analysis.chirality: need hist_bins >= 2, 0 < sym_threshold < 1, eps > 0, "
                              f"hist_every >= 1 (got {self.hist_bins}, {self.sym_threshold}, {self.eps}, "
                              f"{self.hist_every})")
        width = self.fmap.width
        if width != "auto" and not (isinstance(width, int) and not isinstance(width, bool) and width > 0):
            raise ConfigError(f"analysis.chirality.fmap.width={width!r}: use 'auto' or a positive int")
        if self.fmap.n_probe < 1 or self.fmap.every_n_epochs < 1:
            raise ConfigError(f"analysis.chirality.fmap: need n_probe >= 1 and every_n_epochs >= 1 (got "
                              f"{self.fmap.n_probe}, {self.fmap.every_n_epochs})")


@dataclass
class ChiralityResult(Result):
    """One analysed epoch: ``values`` as the results file stores them; ``layers`` the eligible layers in order
    (module paths) and ``layer_names`` how figures and tables show them (``conv13 (features.28)``,
    :func:`featurelens.models.display_name`); ``conv1`` (name, float64 weight) of the first eligible conv, for
    the filter figure."""

    name: ClassVar[str] = "chirality"
    layers: list[str] = field(default_factory=list)
    conv1: tuple[str, torch.Tensor] | None = field(default=None, repr=False)
    layer_names: dict[str, str] = field(default_factory=dict)

    def to_frame(self):
        """The per-layer table: kernel size, slices, C, C pooled, C/c₀ and the symmetric/antisymmetric shares."""
        import pandas as pd

        v = self.values
        return pd.DataFrame([{"layer": n, "name": self.layer_names.get(n, n), "kernel": v[f"kernel/{n}"],
                              "n_slices": v[f"layer/{n}/n_slices"],
                              **{col: v.get(f"layer/{n}/{key}") for col, key in (
                                  ("C", "c"), ("C_pooled", "c_pooled"), ("C_norm", "c_norm"),
                                  ("frac_sym", "frac_sym"), ("frac_anti", "frac_anti"))}}
                             for n in self.layers], columns=TABLE_COLUMNS)


TABLE_COLUMNS = ["layer", "name", "kernel", "n_slices", "C", "C_pooled", "C_norm", "frac_sym", "frac_anti"]


@register
class Chirality(Analysis):
    """Ji et al.: kernel chirality of every eligible conv, feature-map chirality on a probe set."""

    name = "chirality"
    Config = ChiralityConfig
    headline = ("model", "model_pooled")
    constants = ("fmap_width", "layer/*/n_slices")

    def __init__(self, config: ChiralityConfig | None = None, **params: Any):
        super().__init__(config, **params)
        self._warned = False

    def run(self, model: nn.Module, data: Data, *, epoch: int = 0, shard: tuple[int, int] = (0, 1),
            final: bool = True) -> ChiralityResult:
        c = self.config
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            res = chi.model_chirality(model, flips=tuple(c.flips), eps=c.eps, hist_bins=c.hist_bins,
                                      sym_threshold=c.sym_threshold, include_fc_as_conv=c.include_fc_as_conv)
        if caught and not self._warned:  # e.g. an MLP has no eligible layer: say so once per run
            self._warned = True
            for w in caught:
                warnings.warn(str(w.message), stacklevel=2)
        values: dict[str, Any] = dict(res["scalars"])
        for name, stats in res["layers"].items():
            values[f"hist/{name}"] = stats["hist"]
            values[f"kernel/{name}"] = f"{stats['kh']}x{stats['kw']}"
            values[f"layer/{name}/n_slices"] = int(stats["n_slices"])
        if c.fmap.enabled and res["layers"] and (epoch % c.fmap.every_n_epochs == 0 or final):
            x, _ = data.probe_set(c.fmap.n_probe, c.fmap.seed)
            x = x.to(model_device(model))
            width = c.fmap.width
            if width == "auto":
                width = chi.compatible_width(model, x.shape[-1], in_channels=x.shape[1])
            if width != x.shape[-1]:
                x = F.interpolate(x, size=(width, width), mode="bilinear", align_corners=False, antialias=True)
            values.update(chi.fmap_chirality(model, x))
            values["fmap_width"] = int(width)
        convs = chi.eligible_convs(model) if res["layers"] else []
        if c.setlevel and convs:
            values["set_conv1"] = chi.set_level_conv1(convs[0][1])
        conv1 = (convs[0][0], convs[0][1].detach().double().cpu()) if final and convs else None
        names = paper_layer_names(model)
        return ChiralityResult(epoch, values, list(res["layers"]), conv1,
                               {n: display_name(n, names) for n in res["layers"]})

    def summarize(self, history: list[dict[str, Any]]) -> dict[str, float]:
        """Spearman's ρ of C_model against val accuracy over the trained epochs (needs 3)."""
        from scipy.stats import spearmanr

        pairs = [(r["chirality/model"], r["val/acc"]) for r in history
                 if r["epoch"] >= 1 and r.get("val/acc") is not None and r.get("chirality/model") is not None]
        if len(pairs) < 3:
            return {}
        rho = spearmanr(*np.array(pairs).T).statistic
        return {"spearman_acc": float(rho)} if np.isfinite(rho) else {}

    def report(self, result: Result, out_dir: Path, *, final: bool = True, history: list[dict] | None = None):
        from featurelens.analysis.chirality.report import report

        return report(result, out_dir, self.config, final=final, history=history or [result.record()])

    @staticmethod
    def tables(jobs, grouped_by, out: Path) -> list[Path]:
        from featurelens.analysis.chirality.report import tables

        return tables(jobs, grouped_by, out)
