"""Bau et al.'s network dissection of one model: unit-concept IoUs of the chosen layers over a Broden-format
concept set, interpretable-unit counts, and the random-init and random-rotation baselines.

The concept set is ``broden_dir`` when given (e.g. ``broden1_224``, which users download themselves), otherwise
the procedural set of ``featurelens.data.synthbroden``, written once per size and seed under
``<data_dir>/synthbroden/`` and held in memory. Images go through the model's own preprocessing (resize to its
input size, the training normalisation: :func:`featurelens.analysis.base.model_input`). The tallies are
``torchmetrics.Metric``s: under DDP every rank reads its shard of the images and they sync.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from featurelens.analysis.base import Analysis, Data, Result, model_device, model_input, register
from featurelens.analysis.dissection import measure as nd
from featurelens.data.broden import DEFAULT_CATEGORIES, BrodenDataset, BrodenError
from featurelens.data.synthbroden import cached_synthbroden
from featurelens.errors import ConfigError
from featurelens.models.names import display_name, paper_layer_names

log = logging.getLogger("featurelens")


@dataclass
class SynthBrodenConfig:
    """The procedural concept set used when ``broden_dir`` is null."""

    n_images: int = 500
    size: Any = "auto"  # auto = the model's input size; or an int >= 8
    seed: int = 0
    image_format: str = "png"  # png | jpg


@dataclass
class QuantileConfig:
    q: float = 0.005  # T_k: the top-q quantile of unit k's activations
    method: str = "exact_topk"  # exact_topk | sort | subsample
    max_bytes: int = 2 * 1024**3


@dataclass
class RotationConfig:
    """The random-rotation baseline (final epoch only)."""

    enabled: bool = False
    alphas: list[float] = field(default_factory=lambda: [0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    seeds: int = 3


@dataclass
class RandomInitConfig:
    """The same architecture, untrained (PyTorch default init; final epoch only)."""

    enabled: bool = False
    seed: int = 0


@dataclass
class DissectionConfig:
    """The parameters of network dissection (``analysis.dissection.<key>``)."""

    # module names; None: ResNet layer4, else the last ReLU of `features`; the first is the primary layer
    layers: list[str] | None = None
    broden_dir: str | None = None  # e.g. /data/broden1_224 (downloaded by you); None: the procedural concept set
    split: str | None = None  # None (all) | train | val
    categories: list[str] = field(default_factory=lambda: list(DEFAULT_CATEGORIES))
    synthbroden: SynthBrodenConfig = field(default_factory=SynthBrodenConfig)
    quantile: QuantileConfig = field(default_factory=QuantileConfig)
    iou_threshold: float = 0.04  # detector: score > tau
    denominator: str = "paper"  # paper | lite (NetDissect-Lite's overlap-restricted denominator)
    upsample: str = "bilinear"
    batch_size: int = 64  # memory knob: pass 2 holds only the active pixels of M (about q of B*U*sh*sw)
    num_workers: int = 0  # DataLoader workers decoding Broden images and masks
    threads: int | None = None  # CPU: batches at once, one per thread (None: torch's thread count; 1: one)
    cache_bytes: int = 1024**3  # pass 1 keeps activations, then parsed masks, up to this: one forward pass, one read
    topn_images: int = 10  # top-activating images per unit (strips in topimages/)
    top_units: int = 8  # units (by score) that get a strip, at figure epochs
    figures_every: int = 5
    rotation: RotationConfig = field(default_factory=RotationConfig)
    random_init: RandomInitConfig = field(default_factory=RandomInitConfig)
    data_dir: str = "data"  # where the procedural set is written (train.py: paths.data_dir)

    def __post_init__(self):
        for name, cls in (("synthbroden", SynthBrodenConfig), ("quantile", QuantileConfig),
                          ("rotation", RotationConfig), ("random_init", RandomInitConfig)):
            if isinstance(getattr(self, name), dict):
                setattr(self, name, cls(**getattr(self, name)))
        problems = []
        if self.denominator not in ("paper", "lite"):
            problems.append(f"denominator={self.denominator!r} (valid: paper, lite)")
        if self.upsample != "bilinear":
            problems.append(f"upsample={self.upsample!r} (valid: bilinear; the receptive-field variant is not "
                            "implemented)")
        if self.quantile.method not in nd.QUANTILE_METHODS:
            problems.append(f"quantile.method={self.quantile.method!r} (valid: {list(nd.QUANTILE_METHODS)})")
        if not 0 < float(self.quantile.q) < 1:
            problems.append(f"quantile.q={self.quantile.q} (need 0 < q < 1)")
        if self.threads is not None and (isinstance(self.threads, bool) or not isinstance(self.threads, int)
                                         or self.threads < 1):
            problems.append(f"threads={self.threads!r} (need an integer >= 1, or null: torch's thread count)")
        if not 0 <= self.iou_threshold < 1:
            problems.append(f"iou_threshold={self.iou_threshold} (need 0 <= tau < 1)")
        bad_cats = [c for c in self.categories if c not in DEFAULT_CATEGORIES]
        if bad_cats or not self.categories:
            problems.append(f"categories={list(self.categories)} (choose from {list(DEFAULT_CATEGORIES)})")
        size = self.synthbroden.size
        if size != "auto" and not (isinstance(size, int) and size >= 8):
            problems.append(f"synthbroden.size={size!r} (valid: auto or an int >= 8)")
        if not (isinstance(self.synthbroden.n_images, int) and self.synthbroden.n_images >= 1):
            problems.append(f"synthbroden.n_images={self.synthbroden.n_images!r} (need an int >= 1)")
        if self.synthbroden.image_format not in ("png", "jpg"):
            problems.append(f"synthbroden.image_format={self.synthbroden.image_format!r} (valid: png, jpg)")
        if self.split not in (None, "train", "val"):
            problems.append(f"split={self.split!r} (valid: null, train, val)")
        alphas = self.rotation.alphas
        if not alphas or any(not 0 <= float(a) <= 1 for a in alphas) or int(self.rotation.seeds) < 1:
            problems.append(f"rotation.alphas={list(alphas)} / seeds={self.rotation.seeds} "
                            "(alphas in [0, 1], seeds >= 1)")
        if (self.batch_size < 1 or self.topn_images < 0 or self.top_units < 0 or self.figures_every < 1
                or self.cache_bytes < 0):
            problems.append("batch_size, figures_every must be >= 1 and topn_images, top_units, cache_bytes >= 0")
        if self.layers is not None and (isinstance(self.layers, str) or not self.layers):
            problems.append(f"layers={self.layers!r} (a non-empty list of module names, or null for the default)")
        if problems:
            raise ConfigError("analysis.dissection: " + "; ".join(problems))
        self.categories = list(self.categories)
        self.layers = list(self.layers) if self.layers is not None else None


@dataclass
class DissectionResult(Result):
    """One analysed epoch. ``layers`` holds each dissected layer's full result (thresholds, tally, IoU, unit
    labels, counts, table, top images; :func:`featurelens.analysis.dissection.dissect_layers`), ``strips`` the
    top-image strips (unit -> (n·W, H, 3) uint8 image) of the best units at figure epochs, ``label_names`` the
    concept names."""

    name: ClassVar[str] = "dissection"
    layers: dict[str, dict[str, Any]] = field(default_factory=dict, repr=False)
    strips: dict[str, dict[int, np.ndarray]] = field(default_factory=dict, repr=False)
    label_names: list[str] = field(default_factory=list, repr=False)
    layer_names: dict[str, str] = field(default_factory=dict)  # how figures show a layer: conv13 (features.29)

    def to_frame(self):
        """The primary layer's tally: one row per unit with its best concept, score and per-category IoUs."""
        return next(iter(self.layers.values()))["table"]


class _InMemory(torch.utils.data.Dataset):
    """A small Broden dataset decoded and parsed once (the procedural set: a few MB), with the loader's
    attributes."""

    def __init__(self, ds: BrodenDataset):
        self.items = [(ds.load_image(i), nd.parse_labels(ds.load_labels(i))) for i in range(len(ds))]
        self.categories, self.label_names, self.primary_category = ds.categories, ds.label_names, ds.primary_category

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


@register
class Dissection(Analysis):
    """Bau et al.: unit-concept IoUs and interpretable-unit counts of ``layers`` (spec §2, §5)."""

    name = "dissection"
    Config = DissectionConfig
    headline = ("unique_detectors", "detectors", "mean_score")
    sharded = True
    hydra_defaults: ClassVar[dict[str, str]] = {"data_dir": "${paths.data_dir}"}

    def __init__(self, config: DissectionConfig | None = None, **params: Any):
        super().__init__(config, **params)
        self._concepts: torch.utils.data.Dataset | None = None

    # ------------------------------------------------------------------ data
    def concepts(self, data: Data) -> torch.utils.data.Dataset:
        """The concept set (read once per analysis object)."""
        if self._concepts is not None:
            return self._concepts
        c = self.config
        if c.broden_dir:
            root = Path(c.broden_dir).expanduser()
            if not root.is_dir():
                raise ConfigError(f"analysis.dissection.broden_dir={c.broden_dir!r} does not exist; see the "
                                  "README (Network dissection) for getting broden1_224, or set it to null for the "
                                  "procedural concept set")
        else:
            size = c.synthbroden.size
            if size == "auto":
                width = getattr(data, "input_size", None)
                if width is None:
                    raise ConfigError("analysis.dissection.synthbroden.size=auto needs the model's input size "
                                      "(give input_size=, or synthbroden={'size': …})")
                size = max(8, int(width))
                size += size % 2
            root = cached_synthbroden(c.data_dir, c.synthbroden.n_images, size, c.synthbroden.seed,
                                      c.synthbroden.image_format)
        try:
            ds = BrodenDataset(root, split=c.split, categories=c.categories)
        except BrodenError as e:
            raise ConfigError(f"analysis.dissection: {e}") from None
        if len(ds) == 0:
            raise ConfigError(f"analysis.dissection: {root} has no image with data in {c.categories}")
        summary = ", ".join(f"{k} {v['images']} images/{v['labels']} labels" for k, v in ds.summary().items())
        log.info("dissection: %d images from %s (%s)", len(ds), root, summary)
        self._concepts = _InMemory(ds) if not c.broden_dir else ds
        return self._concepts

    def _dissect(self, model: nn.Module, layers: dict[str, str], data: Data, shard: tuple[int, int],
                 **kwargs) -> dict[str, dict[str, Any]]:
        """Dissect {result name: module name} of ``model`` in one pair of passes."""
        c, concepts = self.config, self.concepts(data)
        try:
            modules = {name: nd.resolve_layer(model, layer) for name, layer in layers.items()}
        except ValueError as e:
            raise ConfigError(f"analysis.dissection.layers: {e}") from None
        device = model_device(model)
        return nd.dissect_layers(model, modules, concepts, len(concepts.label_names), concepts.primary_category,
                                 q=c.quantile.q, denominator=c.denominator, device=device, batch_size=c.batch_size,
                                 tau=c.iou_threshold, quantile_method=c.quantile.method,
                                 max_bytes=int(c.quantile.max_bytes), preprocess=model_input(data, device),
                                 shard=shard, num_workers=c.num_workers, threads=c.threads,
                                 progress=len(concepts) >= 2000,
                                 cache_bytes=c.cache_bytes, **kwargs)

    # ------------------------------------------------------------------ the method
    def run(self, model: nn.Module, data: Data, *, epoch: int = 0, shard: tuple[int, int] = (0, 1),
            final: bool = True) -> DissectionResult:
        c = self.config
        try:
            layers = c.layers or [nd.default_layer(model)]
        except ValueError as e:
            raise ConfigError(f"analysis.dissection.layers: {e}") from None
        values: dict[str, Any] = {}
        results = self._dissect(model, {layer: layer for layer in layers}, data, shard, topn=c.topn_images)
        for i, layer in enumerate(layers):
            res = results[layer]
            scalars = self._scalars(res)
            values.update({f"{layer}/{k}": v for k, v in scalars.items()})
            if i == 0:
                values.update(scalars)
            values[f"{layer}/quantile_method"] = res["quantile_method"]
            values[f"{layer}/counts"] = res["counts_json"] = self._counts(res)
        primary = layers[0]
        if c.random_init.enabled and final:
            res = self._dissect(nd.random_init_copy(model, int(c.random_init.seed)), {primary: primary}, data,
                                shard)[primary]
            values.update({f"random_init/{k}": v for k, v in self._scalars(res).items()
                           if k.startswith(("unique", "detectors"))})
        if c.rotation.enabled and final:
            values.update(self._rotation(model, primary, results[primary], data, shard))
        figures = epoch == 0 or epoch % c.figures_every == 0 or final
        strips = {layer: self._top_image_strips(model, layer, res, data) for layer, res in results.items()
                  if figures and c.top_units and res["top_images"] is not None and shard[0] == 0}
        names = paper_layer_names(model)
        return DissectionResult(epoch, values, results, strips, list(self.concepts(data).label_names),
                                {layer: display_name(layer, names) for layer in results})

    def _rotation(self, model: nn.Module, layer: str, res: dict[str, Any], data: Data, shard: tuple[int, int]
                  ) -> dict[str, Any]:
        """All seeds x powers in one pair of passes: each rotation hooks the same layer under its own name."""
        c = self.config
        units = res["thresholds"].numel()
        runs = {f"seed{seed}_alpha{float(alpha):g}": (seed, float(alpha))
                for seed in range(int(c.rotation.seeds)) for alpha in c.rotation.alphas}
        rotations = {name: nd.random_rotation(units, alpha, torch.Generator().manual_seed(seed))
                     for name, (seed, alpha) in runs.items()}
        results = self._dissect(model, dict.fromkeys(runs, layer), data, shard, rotations=rotations)
        rows = [{"seed": seed, "alpha": alpha, **{k: v for k, v in self._scalars(results[name]).items()
                                                 if "/" not in k}} for name, (seed, alpha) in runs.items()]
        out: dict[str, Any] = {"rotation/table": rows}
        for alpha in c.rotation.alphas:
            sel = [r for r in rows if r["alpha"] == float(alpha)]
            for key in ("unique_detectors", "unique_detectors_percat", "detectors"):
                out[f"rotation/alpha_{float(alpha):g}/{key}"] = float(np.mean([r[key] for r in sel]))
        return out

    def _scalars(self, res: dict[str, Any]) -> dict[str, float]:
        c, score = res["counts"], res["labels"]["score"].numpy()
        out: dict[str, float] = {"unique_detectors": c["unique_A"], "unique_detectors_percat": c["unique_B"],
                                 "detectors": c["detectors"], "mean_score": float(score.mean()),
                                 "median_score": float(np.median(score)), "frac_active": res["frac_active"],
                                 "frac_active_raw": res["frac_active_raw"],
                                 "threshold_mean": float(res["thresholds"].mean())}
        for k, cat in enumerate(self.config.categories):
            out[f"unique/{cat}"] = c["unique_B_percat"][k]
            out[f"detectors/{cat}"] = c["detectors_percat"][k]
        return out

    def _counts(self, res: dict[str, Any]) -> dict[str, Any]:
        c, cats, tau = res["counts"], self.config.categories, self.config.iou_threshold
        n_units = int(res["thresholds"].numel())
        return {"units": n_units, "detectors": c["detectors"], "iou_threshold": tau,
                "denominator": self.config.denominator, "categories": cats,
                "quantile_method": res["quantile_method"],
                "unique_A": c["unique_A"], "unique_B": c["unique_B"],
                "unique_A_percat": dict(zip(cats, c["unique_A_percat"], strict=True)),
                "unique_B_percat": dict(zip(cats, c["unique_B_percat"], strict=True)),
                "detectors_percat": dict(zip(cats, c["detectors_percat"], strict=True)),
                "header": f"{c['detectors']}/{n_units} units covering {c['unique_A']} concepts with IoU > {tau:g}"}

    def _top_image_strips(self, model: nn.Module, layer: str, res: dict[str, Any], data: Data
                          ) -> dict[int, np.ndarray]:
        """For the best ``top_units`` units: their top images side by side, outside the mask S_k > T_k dimmed
        to 0.2, as (H, n·W, 3) uint8 arrays."""
        concepts, device = self.concepts(data), model_device(model)
        prep, module = model_input(data, device), nd.resolve_layer(model, layer)
        order = torch.argsort(res["labels"]["score"], descending=True)[: self.config.top_units]
        strips = {}
        for unit in order.tolist():
            idx = [i for i in res["top_images"][:, unit].tolist() if i >= 0]
            if not idx:
                continue
            items = [concepts[i] for i in idx]
            x = torch.stack([item[0] for item in items])
            sh, sw = nd.parse_labels(items[0][1]).size or x.shape[-2:]
            masks = nd.unit_masks(model, module, x.to(device), unit, float(res["thresholds"][unit]),
                                  (int(sh), int(sw)), prep).cpu()
            up = F.interpolate(masks[:, None].float(), size=x.shape[-2:], mode="nearest")
            strip = (x * (0.2 + 0.8 * up)).permute(0, 2, 3, 1)  # (n, H, W, 3)
            strips[unit] = torch.cat(list(strip), dim=1).clamp(0, 1).mul(255).round().to(torch.uint8).numpy()
        return strips

    def report(self, result: Result, out_dir: Path, *, final: bool = True, history: list[dict] | None = None):
        from featurelens.analysis.dissection.report import report

        return report(result, out_dir, self.config, history=history or [result.record()])

    @staticmethod
    def tables(jobs, grouped_by, out: Path) -> list[Path]:
        from featurelens.analysis.dissection.report import tables

        return tables(jobs, grouped_by, out)
