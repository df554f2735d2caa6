"""What network dissection writes: per layer (rewritten at each analysed epoch, so they describe the latest
one) ``tally.csv``, ``thresholds.npy``, ``iou.npy``, ``counts.json``, ``detectors_per_label.png``,
``score_hist.png`` and, at figure epochs, ``topimages/unit_XXXX.jpg``; in the analysis folder
``unique_vs_epoch.png`` and, with the rotation baseline, ``rotation.csv`` and ``unique_vs_alpha.png``; and the
sweep tables."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

from featurelens import plots
from featurelens.analysis.base import Report
from featurelens.tables import SweepJob, mean_sd, without_empty_setting

log = logging.getLogger("featurelens")

PLOT_ORDER = ("object", "scene", "part", "material", "texture", "color")  # §5 bar-chart grouping


def report(result, out_dir: Path, config, *, history: list[dict]) -> Report:
    rep = Report()
    for layer, res in result.layers.items():
        out = out_dir / layer
        out.mkdir(parents=True, exist_ok=True)
        res["table"].to_csv(out / "tally.csv", index=False)
        np.save(out / "thresholds.npy", res["thresholds"].numpy())
        np.save(out / "iou.npy", res["iou"].numpy().astype(np.float32))
        counts = res["counts_json"]
        shown = result.layer_names.get(layer, layer)
        (out / "counts.json").write_text(json.dumps({"epoch": result.epoch, "layer_name": shown, **counts}, indent=1))
        log.info("dissection %s, epoch %d: %s (method A; method B: %d unique; %d forward pass%s%s)", layer,
                 result.epoch, counts["header"], counts["unique_B"], res["forward_passes"],
                 "" if res["forward_passes"] == 1 else "es", ", oneDNN layout" if res["onednn"] else "")
        split = res["table"].to_dict("split")
        rep.tables[f"{layer}/tally"] = (split["columns"], split["data"])
        rep.figures[f"{layer}/detectors_per_label"] = _label_bars(res, result.label_names, config.categories, out,
                                                                  f"{shown}: {counts['header']}",
                                                                  config.iou_threshold)
        rep.figures[f"{layer}/score_hist"] = plots.histogram_with_marker(
            res["labels"]["score"].numpy(), config.iou_threshold, out / "score_hist.png",
            xlabel="unit score (best IoU)", title=f"{shown}: unit scores (line: tau)")
        if layer in result.strips:
            rep.galleries[f"{layer}/topimages"] = _write_strips(result.strips[layer], res["table"], out / "topimages")
    epochs = [r["epoch"] for r in history]
    series = {m: [r.get(f"dissection/{k}") for r in history] for m, k in
              (("unique (A)", "unique_detectors"), ("unique per category (B)", "unique_detectors_percat"),
               ("detectors", "detectors"))}
    rep.figures["unique_vs_epoch"] = plots.line_plot(epochs, series, out_dir / "unique_vs_epoch.png", xlabel="epoch",
                                                     ylabel="units / concepts",
                                                     title="Interpretable units of the primary layer")
    if "rotation/table" in result.values:
        rep.figures["unique_vs_alpha"] = _rotation_report(result.values["rotation/table"], config.rotation.seeds,
                                                          out_dir)
    return rep


def _label_bars(res: dict, label_names: list[str], categories: list[str], out: Path, header: str,
                tau: float) -> Path:
    """Detector counts per label, grouped object, scene, part, material, texture, color (§5)."""
    lab, cat, det = res["labels"]["label"], res["labels"]["category"], res["labels"]["detector"]
    counts: dict[tuple[int, int], int] = {}
    for c, k in zip(cat[det].tolist(), lab[det].tolist(), strict=True):
        counts[(c, k)] = counts.get((c, k), 0) + 1
    order = {name: i for i, name in enumerate(PLOT_ORDER)}
    keys = sorted(counts, key=lambda ck: (order.get(categories[ck[0]], 9), -counts[ck], ck[1]))
    names = [f"{label_names[k]} ({categories[c]})" for c, k in keys]
    return plots.bar_plot(names, [counts[k] for k in keys], out / "detectors_per_label.png", xlabel="",
                          ylabel="detector units", title=header, rotate_labels=True,
                          empty=f"no detectors: no unit's best IoU is above tau = {tau:g}")


def _write_strips(strips: dict[int, np.ndarray], table, out: Path) -> list[Path]:
    """One JPG per unit (the strips describe the latest figure epoch only), scaled up to >= 96 px high, under a
    caption: the unit, its best concept with its category, and that concept's IoU (``table``: the tally)."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    best = table.set_index("unit")
    paths = []
    for unit, strip in strips.items():
        img = Image.fromarray(strip)
        scale = max(1, 96 // img.height)
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
        row = best.loc[unit + 1]
        captioned = Image.new("RGB", (img.width, img.height + 16), "white")
        captioned.paste(img, (0, 16))
        ImageDraw.Draw(captioned).text((3, 2), f"unit {unit + 1}: {row['label']} ({row['category']}), "
                                               f"IoU {row['score']:.3f}", fill="black")
        paths.append(out / f"unit_{unit + 1:04d}.jpg")
        captioned.save(paths[-1], quality=92)
    return paths


def _rotation_report(rows: list[dict], seeds: int, out_dir: Path) -> Path:
    import pandas as pd

    table = pd.DataFrame(rows)
    table.to_csv(out_dir / "rotation.csv", index=False)
    mean = table.groupby("alpha")[["unique_detectors", "unique_detectors_percat", "detectors"]].agg(["mean", "std"])
    return plots.line_plot(list(mean.index), {"unique (A)": mean[("unique_detectors", "mean")].tolist(),
                                              "unique per category (B)":
                                                  mean[("unique_detectors_percat", "mean")].tolist()},
                           out_dir / "unique_vs_alpha.png", xlabel="rotation power alpha", ylabel="unique detectors",
                           bands={"unique (A)": mean[("unique_detectors", "std")].fillna(0).tolist(),
                                  "unique per category (B)":
                                      mean[("unique_detectors_percat", "std")].fillna(0).tolist()},
                           title=f"Random-rotation baseline ({int(seeds)} seeds)")


CATEGORIES = ("object", "part", "scene", "material", "texture", "color")


def _frame(jobs: list[SweepJob]) -> pd.DataFrame:
    """One row per job, analysed epoch and dissected layer (the primary layer carries the baselines)."""
    rows = []
    p = "dissection/"
    for job in jobs:
        for r in job.records:
            layers = [k[len(p):-len("/unique_detectors")] for k in r  # dissection/<layer>/unique_detectors
                      if k.startswith(p) and k.endswith("/unique_detectors") and k.count("/") == 2
                      and not k.startswith(p + "random_init/")]
            for i, layer in enumerate(layers):
                q = f"{p}{layer}/"
                row = {**job.row(), "epoch": r["epoch"], "layer": layer, "primary": i == 0,
                       "unique_A": r[q + "unique_detectors"], "unique_B": r[q + "unique_detectors_percat"],
                       "detectors": r[q + "detectors"], "mean_score": r[q + "mean_score"],
                       **{f"B/{c}": r.get(f"{q}unique/{c}") for c in CATEGORIES}}
                if i == 0:
                    row["random_init_unique_A"] = r.get(p + "random_init/unique_detectors")
                    row.update({k.removeprefix(p + "rotation/").replace("/unique_detectors", "_unique_A"): v
                                for k, v in r.items() if k.startswith(p + "rotation/alpha_")
                                and k.endswith("/unique_detectors")})
                rows.append(row)
    return pd.DataFrame(rows)


def tables(jobs: list[SweepJob], grouped_by: Callable[..., str], out: Path) -> list[Path]:
    """``dissection_layers.{csv,md}`` (detectors per layer at the last epoch, both counting methods and per
    category, with the random-init and rotation baselines), ``dissection_epochs.{csv,md}`` and
    ``dissection_vs_epoch.png`` (unique detectors per epoch and layer)."""
    frame = _frame(jobs)
    if frame.empty:
        return []
    out.mkdir(parents=True, exist_ok=True)
    last = frame[frame.epoch == frame.groupby("job").epoch.transform("max")]
    rows = []
    for (model, data, setting, layer), g in last.groupby(["model", "data", "setting", "layer"], sort=False):
        row = {"model": model, "data": data, "setting": setting, "layer": layer, "n_seeds": g.seed.nunique(),
               "detectors": mean_sd(g.detectors, ".1f"), "unique_A": mean_sd(g.unique_A, ".1f"),
               "unique_B": mean_sd(g.unique_B, ".1f"), **{f"B/{c}": g[f"B/{c}"].mean() for c in CATEGORIES}}
        baselines = [c for c in g.columns if c.startswith(("random_init", "alpha_"))]
        for col in sorted(baselines, key=lambda c: (c.startswith("alpha_"), float(c.split("_")[1]) if
                                                    c.startswith("alpha_") else 0.0)):
            if g[col].notna().any():
                row[col] = g[col].mean()
        rows.append(row)
    layers = without_empty_setting(pd.DataFrame(rows))
    epochs = (frame.groupby(["model", "data", "setting", "layer", "epoch"], sort=False)[
        ["unique_A", "unique_B", "detectors"]].mean().reset_index())
    header = ["# Network dissection: interpretable units per layer (last epoch)", "",
              "IoU > 0.04, `denominator: paper`, all six categories; unique_A = distinct top labels (the paper's",
              "count), unique_B = per-category distinct labels (the released plotting code); B/<cat> per category.",
              "random_init and alpha_<a> (random rotation, mean over seeds) are method A on the primary layer.", "",
              grouped_by(["model", "data", "layer"]), "", ""]
    layers.to_csv(out / "dissection_layers.csv", index=False)
    (out / "dissection_layers.md").write_text("\n".join(header) + layers.to_markdown(index=False, floatfmt=".3g")
                                              + "\n")
    epochs.to_csv(out / "dissection_epochs.csv", index=False)
    (out / "dissection_epochs.md").write_text("# Network dissection: unique detectors per epoch (mean over seeds)\n\n"
                                             + epochs.to_markdown(index=False, floatfmt=".3g") + "\n")
    series = {f"{m} {lay} ({d}{', ' + st if st else ''})": g.sort_values("epoch").unique_A.tolist()
              for (m, d, st, lay), g in epochs.groupby(["model", "data", "setting", "layer"], sort=False)}
    epochs = without_empty_setting(epochs)
    plots.line_plot(sorted(epochs.epoch.unique()), series, out / "dissection_vs_epoch.png", xlabel="epoch",
                    ylabel="unique detectors (method A)", title="Interpretable units during training")
    return [out / "dissection_layers.csv", out / "dissection_layers.md", out / "dissection_epochs.csv",
            out / "dissection_epochs.md", out / "dissection_vs_epoch.png"]
