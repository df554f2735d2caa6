"""What the linking analysis writes (the latest analysed epoch): ``keep_rates.csv`` and, with a fitted map,
``linking_map.npz``, ``activation_ranges.csv``, ``unit_changes.csv``, ``unit_summary.csv``,
``selective_units.csv``, ``counterfactuals.csv``, ``unit_sweeps.png`` and ``counterfactuals.png``; and the
sweep tables."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from featurelens import plots
from featurelens.analysis.base import Report
from featurelens.tables import SweepJob, mean_sd, without_empty_setting


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


KEYS = ("keep_rate", "n_pairs", "r2_heldout", "r2_pooled", "cycle_top1", "w_cos", "r_cycle_corr_unit",
                "units/fidelity_rate", "units/n_selective", "cf/success_rate", "cf/steps_median")


def _frames(jobs: list[SweepJob]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The last analysed epoch of every job, and its selective units (one row per unit, part and measure)."""
    rows, selective = [], []
    for job in jobs:
        r = job.records[-1]
        head = job.config.analysis.linking.head_module or "last Linear"
        rows.append({**job.row(), "layer": f"input of {head}", "epoch": r["epoch"],
                     **{k: r.get(f"linking/{k}") for k in KEYS}})
        units = job.file("linking", "selective_units.csv")
        if units.exists() and units.stat().st_size > 1:
            selective += [{"model": job.config.model.arch, "data": job.config.data.name, "seed": job.config.seed,
                           **row} for row in pd.read_csv(units).to_dict("records")]
    return pd.DataFrame(rows), pd.DataFrame(selective)


def tables(jobs: list[SweepJob], grouped_by: Callable[..., str], out: Path) -> list[Path]:
    """``linking.{csv,md}`` (per classifier and layer at the last analysed epoch: keep rate, held-out R², cycle
    agreement, fidelity, counterfactual success and steps) and ``linking_selective.csv`` (units per concept)."""
    frame, selective = _frames(jobs)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for (model, data, setting, layer), g in frame.groupby(["model", "data", "setting", "layer"], sort=False):
        rows.append({"model": model, "data": data, "setting": setting, "layer": layer, "n_seeds": g.seed.nunique(),
                     **{k: mean_sd(g[k].astype(float)) for k in KEYS}})
    table = without_empty_setting(pd.DataFrame(rows))
    table.to_csv(out / "linking.csv", index=False)
    lines = ["# Linking classifier features to a generator (last analysed epoch, mean ± sd over seeds)", "",
             "R² is on held-out pairs that passed the keep filter; cycle_top1: argmax E(G(L(E(x)))) = argmax E(x);",
             "cf: counterfactual success rate and median steps over the ordered class pairs.", "",
             grouped_by(["model", "data", "layer"]), "",
             table.to_markdown(index=False)]
    written = [out / "linking.csv"]
    if not selective.empty:
        concepts = (selective.groupby(["model", "data", "part", "measure"]).agg(
            units=("unit", "nunique"), seeds=("seed", "nunique"), median_z=("z", "median")).reset_index())
        concepts.to_csv(out / "linking_selective.csv", index=False)
        written.append(out / "linking_selective.csv")
        lines += ["", "## Units selective for each concept (part, measure)", "", concepts.to_markdown(index=False)]
    (out / "linking.md").write_text("\n".join(lines) + "\n")
    return [*written, out / "linking.md"]
