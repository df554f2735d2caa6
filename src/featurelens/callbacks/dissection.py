"""Network dissection per epoch (spec: ``shared/spec/dissection.md``); the method is in ``analysis.dissection``.

Every analysed epoch dissects the chosen ``layers`` (default: ResNet ``layer4``, else the last ReLU of
``features``) over a Broden-format concept set: ``broden_dir`` when given (e.g. ``broden1_224``, which users
download themselves), otherwise the procedural set of ``featurelens.data.synthbroden``, written once per size
and seed under ``<data_dir>/synthbroden/`` and held in memory. Images go through the model's own
preprocessing (``model_preprocess``: resize to the model's input size, the training normalisation).

Scalars (primary layer = first entry of ``layers``, also logged per layer as ``dissection/<layer>/<metric>``):
``unique_detectors`` (method A), ``unique_detectors_percat`` (method B), ``detectors``, ``unique/<cat>`` and
``detectors/<cat>`` (method B), ``mean_score``, ``median_score``, ``frac_active`` (upsampled masks),
``frac_active_raw`` (raw values above T_k, ≈ q unless ties fill the top quantile), ``threshold_mean``; with the
baselines ``random_init/unique_detectors`` and ``rotation/alpha_<a>/unique_detectors``.

Files under ``<run_dir>/analysis/dissection/<layer>/`` (rewritten at each analysed epoch, so they describe the
latest one): ``tally.csv``, ``thresholds.npy``, ``iou.npy``, ``counts.json``, ``detectors_per_label.png``,
``score_hist.png`` and, at figure epochs, ``topimages/unit_XXXX.jpg``; in ``analysis/dissection/``:
``unique_vs_epoch.png`` and, with the rotation baseline, ``rotation.csv`` and ``unique_vs_alpha.png``.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from featurelens import plots
from featurelens.analysis import dissection as nd
from featurelens.callbacks.base import AnalysisCallback, AnalysisContext, model_preprocess, wandb_loggers
from featurelens.data.broden import DEFAULT_CATEGORIES, BrodenDataset, BrodenError
from featurelens.data.synthbroden import cached_synthbroden
from featurelens.errors import ConfigError

log = logging.getLogger("featurelens")

PLOT_ORDER = ("object", "scene", "part", "material", "texture", "color")  # §5 bar-chart grouping


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


class DissectionCallback(AnalysisCallback):
    """Unit-concept IoUs and interpretable-unit counts of ``layers`` per epoch (spec §2, §5)."""

    name = "dissection"
    headline = ("unique_detectors", "detectors", "mean_score")
    rank_zero_only = False  # the tallies are torchmetrics Metrics: every rank reads its shard, then they sync

    def __init__(self, every_n_epochs: int = 1, layers: Sequence[str] | None = None, broden_dir: str | None = None,
                 split: str | None = None, categories: Sequence[str] = DEFAULT_CATEGORIES,
                 synthbroden: dict[str, Any] | None = None, quantile: dict[str, Any] | None = None,
                 iou_threshold: float = 0.04, denominator: str = "paper", upsample: str = "bilinear",
                 batch_size: int = 64, num_workers: int = 0, cache_bytes: int = 1024**3, topn_images: int = 10,
                 top_units: int = 8, rotation: dict[str, Any] | None = None,
                 random_init: dict[str, Any] | None = None, figures_every: int = 5, data_dir: str = "data"):
        super().__init__(every_n_epochs)
        self.synthbroden = {"n_images": 500, "size": "auto", "seed": 0, "image_format": "png", **(synthbroden or {})}
        self.quantile = {"q": 0.005, "method": "exact_topk", "max_bytes": 2 * 1024**3, **(quantile or {})}
        self.rotation = {"enabled": False, "alphas": [0.0, 0.2, 0.4, 0.6, 0.8, 1.0], "seeds": 3, **(rotation or {})}
        self.random_init = {"enabled": False, "seed": 0, **(random_init or {})}
        problems = []
        if denominator not in ("paper", "lite"):
            problems.append(f"denominator={denominator!r} (valid: paper, lite)")
        if upsample != "bilinear":
            problems.append(f"upsample={upsample!r} (valid: bilinear; the receptive-field variant is not implemented)")
        if self.quantile["method"] not in nd.QUANTILE_METHODS:
            problems.append(f"quantile.method={self.quantile['method']!r} (valid: {list(nd.QUANTILE_METHODS)})")
        if not 0 < float(self.quantile["q"]) < 1:
            problems.append(f"quantile.q={self.quantile['q']} (need 0 < q < 1)")
        if not 0 <= iou_threshold < 1:
            problems.append(f"iou_threshold={iou_threshold} (need 0 <= tau < 1)")
        bad_cats = [c for c in categories if c not in DEFAULT_CATEGORIES]
        if bad_cats or not categories:
            problems.append(f"categories={list(categories)} (choose from {list(DEFAULT_CATEGORIES)})")
        size = self.synthbroden["size"]
        if size != "auto" and not (isinstance(size, int) and size >= 8):
            problems.append(f"synthbroden.size={size!r} (valid: auto or an int >= 8)")
        if not (isinstance(self.synthbroden["n_images"], int) and self.synthbroden["n_images"] >= 1):
            problems.append(f"synthbroden.n_images={self.synthbroden['n_images']!r} (need an int >= 1)")
        if self.synthbroden["image_format"] not in ("png", "jpg"):
            problems.append(f"synthbroden.image_format={self.synthbroden['image_format']!r} (valid: png, jpg)")
        if split not in (None, "train", "val"):
            problems.append(f"split={split!r} (valid: null, train, val)")
        alphas = self.rotation["alphas"]
        if not alphas or any(not 0 <= float(a) <= 1 for a in alphas) or int(self.rotation["seeds"]) < 1:
            problems.append(f"rotation.alphas={list(alphas)} / seeds={self.rotation['seeds']} "
                            "(alphas in [0, 1], seeds >= 1)")
        if batch_size < 1 or topn_images < 0 or top_units < 0 or figures_every < 1 or cache_bytes < 0:
            problems.append("batch_size, figures_every must be >= 1 and topn_images, top_units, cache_bytes >= 0")
        if layers is not None and (isinstance(layers, str) or not layers):
            problems.append(f"layers={layers!r} (a non-empty list of module names, or null for the default)")
        if problems:
            raise ConfigError("analysis.dissection: " + "; ".join(problems))
        self.layers = list(layers) if layers is not None else None
        self.broden_dir, self.split, self.categories = broden_dir, split, list(categories)
        self.tau, self.denominator = float(iou_threshold), denominator
        self.batch_size, self.num_workers, self.cache_bytes = batch_size, num_workers, int(cache_bytes)
        self.topn_images, self.top_units, self.figures_every = topn_images, top_units, figures_every
        self.data_dir = data_dir
        self._data: torch.utils.data.Dataset | None = None
        self._last: dict[str, dict[str, Any]] = {}

    # ------------------------------------------------------------------ data
    def dataset(self, ctx: AnalysisContext) -> torch.utils.data.Dataset:
        if self._data is not None:
            return self._data
        if self.broden_dir:
            root = Path(self.broden_dir).expanduser()
            if not root.is_dir():
                raise ConfigError(f"analysis.dissection.broden_dir={self.broden_dir!r} does not exist; see the "
                                  "README (Network dissection) for getting broden1_224, or set it to null for the "
                                  "procedural concept set")
        else:
            size = self.synthbroden["size"]
            if size == "auto":
                size = max(8, int(ctx.datamodule.input_size))
                size += size % 2
            root = cached_synthbroden(self.data_dir, self.synthbroden["n_images"], size, self.synthbroden["seed"],
                                   self.synthbroden["image_format"])
        try:
            ds = BrodenDataset(root, split=self.split, categories=self.categories)
        except BrodenError as e:
            raise ConfigError(f"analysis.dissection: {e}") from None
        if len(ds) == 0:
            raise ConfigError(f"analysis.dissection: {root} has no image with data in {self.categories}")
        summary = ", ".join(f"{c} {v['images']} images/{v['labels']} labels" for c, v in ds.summary().items())
        log.info("dissection: %d images from %s (%s)", len(ds), root, summary)
        self._data = _InMemory(ds) if not self.broden_dir else ds
        return self._data

    def _dissect(self, model: nn.Module, layers: dict[str, str], ctx: AnalysisContext,
                 **kwargs) -> dict[str, dict[str, Any]]:
        """Dissect {result name: module name} of ``model`` in one pair of passes."""
        data = self.dataset(ctx)
        try:
            modules = {name: nd.resolve_layer(model, layer) for name, layer in layers.items()}
        except ValueError as e:
            raise ConfigError(f"analysis.dissection.layers: {e}") from None
        return nd.dissect_layers(model, modules, data, len(data.label_names), data.primary_category,
                                 q=self.quantile["q"], denominator=self.denominator, device=ctx.device,
                                 batch_size=self.batch_size, tau=self.tau, quantile_method=self.quantile["method"],
                                 max_bytes=int(self.quantile["max_bytes"]), preprocess=model_preprocess(ctx),
                                 shard=ctx.shard, num_workers=self.num_workers, progress=len(data) >= 2000,
                                 cache_bytes=self.cache_bytes, **kwargs)

    # ------------------------------------------------------------------ analysis
    def compute(self, model: nn.Module, ctx: AnalysisContext) -> dict[str, Any]:
        try:
            layers = self.layers or [nd.default_layer(model)]
        except ValueError as e:
            raise ConfigError(f"analysis.dissection.layers: {e}") from None
        values: dict[str, Any] = {}
        self._last = {}
        results = self._dissect(model, {layer: layer for layer in layers}, ctx, topn=self.topn_images)
        for i, layer in enumerate(layers):
            res = self._last[layer] = results[layer]
            scalars = self._scalars(res)
            values.update({f"{layer}/{k}": v for k, v in scalars.items()})
            if i == 0:
                values.update(scalars)
            values[f"{layer}/quantile_method"] = res["quantile_method"]
            values[f"{layer}/counts"] = res["counts_json"] = self._counts(res)
        primary = layers[0]
        if self.random_init["enabled"] and ctx.final:
            res = self._dissect(nd.random_init_copy(model, int(self.random_init["seed"])), {primary: primary},
                                ctx)[primary]
            values.update({f"random_init/{k}": v for k, v in self._scalars(res).items()
                           if k.startswith(("unique", "detectors"))})
        if self.rotation["enabled"] and ctx.final:
            values.update(self._rotation(model, primary, ctx))
        return values

    def _rotation(self, model: nn.Module, layer: str, ctx: AnalysisContext) -> dict[str, Any]:
        """All seeds x powers in one pair of passes: each rotation hooks the same layer under its own name."""
        units = self._last[layer]["thresholds"].numel()
        runs = {f"seed{seed}_alpha{float(alpha):g}": (seed, float(alpha))
                for seed in range(int(self.rotation["seeds"])) for alpha in self.rotation["alphas"]}
        rotations = {name: nd.random_rotation(units, alpha, torch.Generator().manual_seed(seed))
                     for name, (seed, alpha) in runs.items()}
        results = self._dissect(model, dict.fromkeys(runs, layer), ctx, rotations=rotations)
        rows = [{"seed": seed, "alpha": alpha, **{k: v for k, v in self._scalars(results[name]).items()
                                                 if "/" not in k}} for name, (seed, alpha) in runs.items()]
        out: dict[str, Any] = {"rotation/table": rows}
        for alpha in self.rotation["alphas"]:
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
        for k, cat in enumerate(self.categories):
            out[f"unique/{cat}"] = c["unique_B_percat"][k]
            out[f"detectors/{cat}"] = c["detectors_percat"][k]
        return out

    def _counts(self, res: dict[str, Any]) -> dict[str, Any]:
        c = res["counts"]
        n_units = int(res["thresholds"].numel())
        return {"units": n_units, "detectors": c["detectors"], "iou_threshold": self.tau,
                "denominator": self.denominator, "categories": self.categories,
                "quantile_method": res["quantile_method"],
                "unique_A": c["unique_A"], "unique_B": c["unique_B"],
                "unique_A_percat": dict(zip(self.categories, c["unique_A_percat"], strict=True)),
                "unique_B_percat": dict(zip(self.categories, c["unique_B_percat"], strict=True)),
                "detectors_percat": dict(zip(self.categories, c["detectors_percat"], strict=True)),
                "header": f"{c['detectors']}/{n_units} units covering {c['unique_A']} concepts with IoU > {self.tau:g}"}

    # ------------------------------------------------------------------ reporting
    def report(self, model: nn.Module, ctx: AnalysisContext, record: dict[str, Any]) -> None:
        figures = ctx.epoch == 0 or ctx.epoch % self.figures_every == 0 or ctx.final
        data = self.dataset(ctx)
        images: list[tuple[str, Path]] = []
        for layer, res in self._last.items():
            out = self.out_dir / layer
            out.mkdir(parents=True, exist_ok=True)
            table = res["table"]
            table.to_csv(out / "tally.csv", index=False)
            np.save(out / "thresholds.npy", res["thresholds"].numpy())
            np.save(out / "iou.npy", res["iou"].numpy().astype(np.float32))
            counts = res["counts_json"]
            (out / "counts.json").write_text(json.dumps({"epoch": ctx.epoch, **counts}, indent=1))
            log.info("dissection %s, epoch %d: %s (method A; method B: %d unique; %d forward pass%s)", layer,
                     ctx.epoch, counts["header"], counts["unique_B"], res["forward_passes"],
                     "" if res["forward_passes"] == 1 else "es")
            images.append((f"{layer}/detectors_per_label", self._label_bars(res, data, out, counts["header"])))
            plots.histogram_with_marker(res["labels"]["score"].numpy(), self.tau, out / "score_hist.png",
                                        xlabel="unit score (best IoU)", title=f"{layer}: unit scores (line: tau)")
            images.append((f"{layer}/score_hist", out / "score_hist.png"))
            strips = []
            if figures and self.top_units and res["top_images"] is not None:
                strips = self._top_image_strips(model, layer, res, data, ctx, out / "topimages")
            for lg in wandb_loggers(ctx.loggers):
                lg.log_table(key=f"dissection/{layer}/tally", dataframe=table, step=ctx.step)
                if strips:
                    lg.log_image(key=f"dissection/{layer}/topimages", images=[str(p) for p in strips],
                                 caption=[p.stem for p in strips], step=ctx.step)
        epochs = [r["epoch"] for r in self.history]
        series = {m: [r.get(f"dissection/{k}") for r in self.history] for m, k in
                  (("unique (A)", "unique_detectors"), ("unique per category (B)", "unique_detectors_percat"),
                   ("detectors", "detectors"))}
        images.append(("unique_vs_epoch", plots.line_plot(epochs, series, self.out_dir / "unique_vs_epoch.png",
                                                          xlabel="epoch", ylabel="units / concepts",
                                                          title="Interpretable units of the primary layer")))
        if "dissection/rotation/table" in record:
            images.append(("unique_vs_alpha", self._rotation_report(record)))
        for lg in wandb_loggers(ctx.loggers):
            for key, path in images:
                lg.log_image(key=f"dissection/{key}", images=[str(path)], step=ctx.step)

    def _label_bars(self, res: dict[str, Any], data, out: Path, header: str) -> Path:
        """Detector counts per label, grouped object, scene, part, material, texture, color (§5)."""
        lab, cat, det = res["labels"]["label"], res["labels"]["category"], res["labels"]["detector"]
        counts: dict[tuple[int, int], int] = {}
        for c, k in zip(cat[det].tolist(), lab[det].tolist(), strict=True):
            counts[(c, k)] = counts.get((c, k), 0) + 1
        order = {name: i for i, name in enumerate(PLOT_ORDER)}
        keys = sorted(counts, key=lambda ck: (order.get(self.categories[ck[0]], 9), -counts[ck], ck[1]))
        names = [f"{data.label_names[k]} ({self.categories[c]})" for c, k in keys]
        return plots.bar_plot(names, [counts[k] for k in keys], out / "detectors_per_label.png", xlabel="",
                              ylabel="detector units", title=header, rotate_labels=True)

    def _top_image_strips(self, model: nn.Module, layer: str, res: dict[str, Any], data, ctx: AnalysisContext,
                          out: Path) -> list[Path]:
        """For the best ``top_units`` units: their top images, outside the mask S_k > T_k dimmed to 0.2."""
        shutil.rmtree(out, ignore_errors=True)  # the strips describe the latest figure epoch only
        out.mkdir(parents=True)
        module = nd.resolve_layer(model, layer)
        order = torch.argsort(res["labels"]["score"], descending=True)[: self.top_units]
        paths = []
        for unit in order.tolist():
            idx = [i for i in res["top_images"][:, unit].tolist() if i >= 0]
            if not idx:
                continue
            x = torch.stack([data[i][0] for i in idx])
            sh, sw = nd.parse_labels(data[idx[0]][1]).size or x.shape[-2:]
            masks = nd.unit_masks(model, module, x.to(ctx.device), unit, float(res["thresholds"][unit]),
                                  (int(sh), int(sw)), model_preprocess(ctx)).cpu()
            up = F.interpolate(masks[:, None].float(), size=x.shape[-2:], mode="nearest")
            strip = (x * (0.2 + 0.8 * up)).permute(0, 2, 3, 1)  # (n, H, W, 3)
            strip = torch.cat(list(strip), dim=1).clamp(0, 1).mul(255).round().to(torch.uint8).numpy()
            img = Image.fromarray(strip)
            scale = max(1, 96 // x.shape[-1])
            paths.append(out / f"unit_{unit + 1:04d}.jpg")
            img.resize((img.width * scale, img.height * scale), Image.NEAREST).save(paths[-1], quality=92)
        return paths

    def _rotation_report(self, record: dict[str, Any]) -> Path:
        import pandas as pd

        table = pd.DataFrame(record["dissection/rotation/table"])
        table.to_csv(self.out_dir / "rotation.csv", index=False)
        mean = table.groupby("alpha")[["unique_detectors", "unique_detectors_percat", "detectors"]].agg(["mean", "std"])
        alphas = list(mean.index)
        return plots.line_plot(alphas, {"unique (A)": mean[("unique_detectors", "mean")].tolist(),
                                        "unique per category (B)": mean[("unique_detectors_percat", "mean")].tolist()},
                               self.out_dir / "unique_vs_alpha.png", xlabel="rotation power alpha",
                               ylabel="unique detectors",
                               bands={"unique (A)": mean[("unique_detectors", "std")].fillna(0).tolist(),
                                      "unique per category (B)":
                                          mean[("unique_detectors_percat", "std")].fillna(0).tolist()},
                               title=f"Random-rotation baseline ({int(self.rotation['seeds'])} seeds)")
