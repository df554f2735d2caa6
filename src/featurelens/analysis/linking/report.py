"""What the linking analysis writes (the latest analysed epoch): ``keep_rates.csv`` and, with a fitted map,
``linking_map.npz``, ``activation_ranges.csv``, ``unit_changes.csv``, ``unit_summary.csv``,
``selective_units.csv``, ``counterfactuals.csv``, ``unit_sweeps.png`` and ``counterfactuals.png``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from featurelens import plots
from featurelens.analysis.base import Report


def report(result, out_dir: Path, config) -> Report:
    last, out = result.details, out_dir
    out.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"class": last["classes"], "keep_rate": last["keep_rates"], "draws": last["n_draws"]}).to_csv(
        out / "keep_rates.csv", index=False)
    rep = Report()
    if "lmap" not in last:
        return rep
    gen = config.generator
    last["lmap"].save(out / "linking_map.npz", epoch=result.epoch, layer=last["layer"],
                      classes=np.asarray(last["classes"]), psi=config.psi, seed_base=last["seed_base"],
                      heldout_base=last["heldout_base"], n_pairs_kept=int(result.values["n_pairs"]),
                      keep_rates=np.asarray(last["keep_rates"]),
                      generator=str(gen.get("ckpt") or gen.get("pkl") or gen.get("name")))
    for key, name in (("ranges", "activation_ranges"), ("changes", "unit_changes"), ("summary", "unit_summary"),
                      ("selective", "selective_units"), ("cf", "counterfactuals")):
        last[key].to_csv(out / f"{name}.csv", index=False)
    for key in ("selective", "cf"):
        if not last[key].empty:
            split = last[key].to_dict("split")
            rep.tables[key] = (split["columns"], split["data"])
    order = list(dict.fromkeys(last["selective"]["unit"].tolist())) + sorted(last["sweep_images"])
    sweeps = [(u, last["sweep_images"][u]) for u in dict.fromkeys(order) if u in last["sweep_images"]][:4]
    if sweeps:
        imgs, titles = [], []
        for u, im in sweeps:  # (samples, steps, C, H, W): first sample, min / mid / max
            steps = im.shape[1]
            for j, name in zip((0, steps // 2, steps - 1), ("min", "mid", "max"), strict=True):
                imgs.append(im[0, j].permute(1, 2, 0).numpy())
                titles.append(f"unit {u} {name}")
        rep.figures["unit_sweeps"] = plots.image_grid(imgs, titles, out / "unit_sweeps.png", max_cols=3,
                                                      title="Unit sweeps (most selective units first)")
    if last["cf_strips"]:
        imgs, titles = [], []
        for o, t, ok, path in last["cf_strips"]:
            for j in range(path.shape[0]):
                imgs.append(path[j].permute(1, 2, 0).numpy())
                titles.append(f"{o}->{t} a={j / (path.shape[0] - 1):.2f}" + ("" if ok or j < path.shape[0] - 1
                                                                             else " (failed)"))
        rep.figures["counterfactuals"] = plots.image_grid(
            imgs, titles, out / "counterfactuals.png", max_cols=5,
            title="Counterfactual paths relu(r - a*s): original (a=0) to a=1")
    return rep
