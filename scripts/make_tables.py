"""Turn the results files of one or more sweeps into the papers' tables and figures (no W&B needed).

    python scripts/make_tables.py outputs/multiruns/<date>/<time> [more sweep dirs] [--out outputs/tables]

Each job directory of a sweep holds ``.hydra/config.yaml`` and ``analysis/<name>/results.jsonl``; jobs that failed
(a ``FAILED`` file, or no results) are listed and left out, and so are jobs whose model did not learn: best
validation accuracy not above chance (one-sided binomial test against 1/C on the job's ``data.n_val`` images, p >
0.001), whose "trained" analyses would describe a random net (``--keep-untrained`` keeps them). Every table groups
its rows by model, data and every override that differs across the jobs (``.hydra/overrides.yaml``: e.g. ``init``,
``optimizer.lr``), so only seeds are averaged; each markdown table says what it grouped by. Writes, for feature
chirality: ``chirality_init.{csv,md}`` (chirality at init and after training per model × init × flip augmentation,
mean ± sd over seeds, with val accuracy and the ANOVA test of "the init does not matter", spec §7) and
``chirality_vs_epoch.png`` (C_model vs epoch, one line per init, one panel per model). For class-specific filters
(final epoch of every job): ``class_filters_k.{csv,md}`` (decomposed accuracy per k with the full head's, mean ± sd
over seeds, plus union, overlap, MI and MAC reduction at the default k), ``class_filters_depth.{csv,md}`` (features
per class, set size, Ψ and decomposed accuracy per model and depth, with the Spearman correlation of depth against
both readings of "proportional to depth": the absolute count K(0.5) and the share K(0.5)/D) and
``class_filters_acc_vs_k.png``. For local specialization (epoch 0 = random init, and the final epoch = trained):
``specialization.{csv,md}`` per model × data × state: n-cut, z and percentile against shuffles for the weight
partition, the activation partition's n-cut and its agreement with the weights (ARI), and for each statistic
(importance: mean and range; coherence: dataset examples, visualisation score and entropy) the share of significant
sub-clusters (percentile 0.05), the mean shifted-Fisher p over seeds combined by the Bates CDF, and
Benjamini–Hochberg at q = 0.05 over all cells. For network dissection: ``dissection_layers.{csv,md}`` (detectors
and unique detectors, both counting methods and per category, per model × layer at the last epoch, with the random-
init and rotation baselines), ``dissection_epochs.{csv,md}`` and ``dissection_vs_epoch.png`` (unique detectors per
epoch and layer). For linking: ``linking.{csv,md}`` (per classifier and layer: keep rate, held-out R², cycle
agreement, fidelity, counterfactual success and steps) and ``linking_selective.csv`` (units selective per concept)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf
from scipy.stats import binomtest, f_oneway

from featurelens import plots
from featurelens.analysis.base import Analysis
from featurelens.api import REGISTRY
from featurelens.results import read_results
from featurelens.tables import mean_sd, without_empty_setting


def find_jobs(sweep_dirs: list[Path]) -> tuple[list[Path], list[Path]]:
    """Job dirs (those with a composed config) below the sweep dirs, split into finished and failed."""
    jobs = sorted({p.parent.parent for d in sweep_dirs for p in Path(d).rglob(".hydra/config.yaml")})
    failed = [j for j in jobs if (j / "FAILED").exists() or not (j / "metrics.json").exists()]
    return [j for j in jobs if j not in failed], failed


def failure(job: Path) -> str:
    """Why a job is left out of the tables: its FAILED file's last line (a diverged run says so), or unfinished."""
    if not (job / "FAILED").exists():
        return "unfinished (no metrics.json)"
    lines = [line for line in (job / "FAILED").read_text().splitlines() if line.strip()]
    reason = lines[-1] if lines else "no reason recorded"
    return f"{'diverged' if reason.startswith(('DivergedError', 'NonFiniteLossError')) else 'failed'} ({reason})"


def at_chance(job: Path, alpha: float = 1e-3) -> str | None:
    """Why a finished job's model counts as not trained (its best val accuracy is not above 1/C), else None.

    Judged only where the job logged a validation accuracy and its data config names ``num_classes`` and
    ``n_val`` (the embedded datasets); a run with no training epoch is not judged."""
    metrics = json.loads((job / "metrics.json").read_text())
    acc = metrics.get("val/acc_best", metrics.get("val/acc"))
    data = OmegaConf.load(job / ".hydra" / "config.yaml").get("data", {})
    n, classes = data.get("n_val"), data.get("num_classes")
    if acc is None or not isinstance(n, int) or not isinstance(classes, int) or classes < 2 or n < 1:
        return None
    p = binomtest(round(acc * n), n, 1 / classes, alternative="greater").pvalue
    if p <= alpha:
        return None
    return f"not trained: best val acc {acc:.3f} with {classes} classes on {n} images is not above chance (p = {p:.2g})"


# never a setting: the seed is what the tables average over; the rest names where and how a job logged
NOT_SETTINGS = ("seed", "paths.", "logger", "callbacks.", "ckpt_path", "tags", "test", "hydra.")
CHOICE_COLUMNS = ("model", "data")  # model= and data= are the tables' own model and data columns


def _overrides(job: Path) -> dict[str, str]:
    """The job's command-line and sweep overrides (``.hydra/overrides.yaml``) as key -> value."""
    path = job / ".hydra" / "overrides.yaml"
    items = OmegaConf.to_container(OmegaConf.load(path)) if path.exists() else []
    pairs = (item.lstrip("+~").split("=", 1) for item in items if "=" in item)
    return {key: value for key, value in pairs}


class Settings:
    """The overrides that differ across the jobs (the swept settings), per job. The seed is never a setting
    (the tables average over it), nor are the model and data choices (their own columns; ``model.channels``
    and the like are settings). A table groups by its own columns plus ``setting``, the text of the swept
    settings it does not show itself."""

    def __init__(self, jobs: list[Path]):
        self.given = {job: _overrides(job) for job in jobs}
        keys = sorted({k for o in self.given.values() for k in o})
        self.swept = [k for k in keys if k not in CHOICE_COLUMNS and not k.startswith(NOT_SETTINGS)
                      and len({o.get(k) for o in self.given.values()}) > 1]

    def of(self, job: Path, shown: tuple[str, ...] = ()) -> str:
        return ", ".join(f"{k}={self.given[job].get(k, '–')}" for k in self.swept if k not in shown)

    def line(self, columns: list[str], shown: tuple[str, ...] = ()) -> str:
        """The markdown line that says what a table's rows are grouped by."""
        rest = [k for k in self.swept if k not in shown]
        setting = f" and the swept setting ({', '.join(rest)})" if rest else ""
        return f"Rows grouped by {', '.join(columns)}{setting}; seeds averaged."


def analysed_jobs(jobs: list[Path], name: str) -> Iterator[tuple[Path, DictConfig, list[dict]]]:
    """(job dir, its composed config, its records) for each job with records of analysis ``name``."""
    for job in jobs:
        results = job / "analysis" / name / "results.jsonl"
        records = read_results(results) if results.exists() else []
        if records:
            yield job, OmegaConf.load(job / ".hydra" / "config.yaml"), records


CHIRALITY_SHOWN = ("init", "data.flip_aug")  # the chirality table's own init and flip_aug columns


def chirality_frame(jobs: list[Path], settings: Settings) -> pd.DataFrame:
    """One row per job and analysed epoch."""
    rows = []
    for job, cfg, records in analysed_jobs(jobs, "chirality"):
        for r in records:
            if r.get("chirality/model") is None:
                continue
            rows.append({"job": job.name, "model": cfg.model.arch, "init": cfg.init.method, "seed": cfg.seed,
                         "flip_aug": bool(cfg.data.get("flip_aug")), "setting": settings.of(job, CHIRALITY_SHOWN),
                         "epoch": r["epoch"],
                         "C": r["chirality/model"], "C_pooled": r.get("chirality/model_pooled"),
                         "C_norm": r.get("chirality/model_norm"), "C_paramw": r.get("chirality/model_paramw"),
                         "val_acc": r.get("val/acc")})
    return pd.DataFrame(rows)


def holm(pvalues: list[float]) -> list[float]:
    """Holm–Bonferroni adjusted p-values."""
    order = np.argsort(pvalues)
    adjusted, running = np.empty(len(pvalues)), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(pvalues) - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted.tolist()


def init_anova(final: pd.DataFrame) -> pd.DataFrame:
    """Spec §7: one-way ANOVA of final C_model over inits, per model, flip augmentation and swept setting (never
    pooled across them; needs >= 2 seeds per init)."""
    rows = []
    for (model, flip_aug, setting), g in final.groupby(["model", "flip_aug", "setting"]):
        groups = [s["C"].to_numpy() for _, s in g.groupby("init")]
        if len(groups) < 2 or min(len(x) for x in groups) < 2:
            continue
        res = f_oneway(*groups)
        grand = np.concatenate(groups).mean()
        ss_between = sum(len(x) * (x.mean() - grand) ** 2 for x in groups)
        ss_total = sum(((x - grand) ** 2).sum() for x in groups)
        means = [x.mean() for x in groups]
        s_w = np.sqrt(np.mean([x.var(ddof=1) for x in groups]))
        n = min(len(x) for x in groups)
        rows.append({"model": model, "flip_aug": flip_aug, "setting": setting, "F": res.statistic, "p": res.pvalue,
                     "eta2": ss_between / ss_total if ss_total > 0 else np.nan,
                     "range": max(means) - min(means), "range_limit": max(0.01, 4 * s_w / np.sqrt(n))})
    table = without_empty_setting(pd.DataFrame(rows))
    if not table.empty:
        table["p_holm"] = holm(table["p"].tolist())
        table["init_does_not_matter"] = (table["p_holm"] >= 0.05) & (table["range"] <= table["range_limit"])
    return table


def chirality_tables(frame: pd.DataFrame, settings: Settings, out: Path, name: str = "chirality_init") -> list[Path]:
    keys = ["model", "init", "flip_aug", "setting"]
    first = frame[frame.epoch == 0]
    last = frame.loc[frame.groupby("job").epoch.idxmax()]
    rows = []
    for key, g in last.groupby(keys):
        g0 = first.set_index(keys).loc[[key]] if key in first.set_index(keys).index else pd.DataFrame()
        rows.append({**dict(zip(keys, key, strict=True)), "n_seeds": g.seed.nunique(),
                     "epochs": int(g.epoch.max()),
                     "C_init_mean": g0["C"].mean() if len(g0) else np.nan,
                     "C_init_sd": g0["C"].std(ddof=1) if len(g0) > 1 else np.nan,
                     "C_final_mean": g["C"].mean(), "C_final_sd": g["C"].std(ddof=1) if len(g) > 1 else np.nan,
                     "C_pooled_final": g["C_pooled"].mean(), "C_norm_final": g["C_norm"].mean(),
                     "val_acc_final": g["val_acc"].mean(),
                     "C_init": mean_sd(g0["C"]) if len(g0) else "–", "C_final": mean_sd(g["C"]),
                     "val_acc": mean_sd(g["val_acc"])})
    table = pd.DataFrame(rows)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / f"{name}.csv", out / f"{name}.md"]
    table = without_empty_setting(table)
    table.drop(columns=["C_init", "C_final", "val_acc"]).to_csv(written[0], index=False)
    shown = [k for k in keys if k in table]
    md = ["# Feature chirality at init and after training (mean ± sd over seeds)", "",
          settings.line(["model", "init", "flip_aug"], CHIRALITY_SHOWN), "",
          table[[*shown, "n_seeds", "epochs", "C_init", "C_final", "C_pooled_final", "C_norm_final", "val_acc"]]
          .to_markdown(index=False, floatfmt=".4f")]
    anova = init_anova(last)
    if not anova.empty:
        md += ["", "## Does the init matter after training? (one-way ANOVA over inits, Holm over models)", "",
               anova.to_markdown(index=False, floatfmt=".4g")]
        anova.to_csv(out / f"{name}_anova.csv", index=False)
        written.append(out / f"{name}_anova.csv")
    written[1].write_text("\n".join(md) + "\n")
    written.append(chirality_figure(frame, out / f"{name}_vs_epoch.png"))
    return written


def chirality_figure(frame: pd.DataFrame, path: Path) -> Path:
    """C_model vs epoch, mean ± sd over seeds, one line per init; models side by side in one figure each."""
    series, bands = {}, {}
    epochs = sorted(frame.epoch.unique())
    for (model, init, setting), g in frame.groupby(["model", "init", "setting"]):
        stats = g.groupby("epoch")["C"].agg(["mean", "std"]).reindex(epochs)
        label = f"{model} / {init}" if frame.model.nunique() > 1 else init
        label += f" ({setting})" if setting else ""
        series[label], bands[label] = stats["mean"].to_numpy(), stats["std"].fillna(0).to_numpy()
    return plots.line_plot(epochs, series, path, xlabel="epoch", ylabel="C_model (kernel chirality)",
                           title="Feature chirality during training, one line per init", bands=bands)


def final_frame(jobs: list[Path], settings: Settings, name: str) -> pd.DataFrame:
    """One row per job: the scalars of analysis ``name``'s final epoch, with model, setting and seed."""
    rows = []
    p = f"{name}/"
    for job, cfg, records in analysed_jobs(jobs, name):
        last = records[-1]
        channels = cfg.model.get("channels")
        model = cfg.model.arch + (f"[{len(channels)} conv]" if channels is not None else "")
        rows.append({"job": job.name, "model": model, "setting": settings.of(job), "seed": cfg.seed,
                     "epoch": last["epoch"], **{k.removeprefix(p): v for k, v in last.items()
                        if k.startswith(p) and isinstance(v, int | float)}})
    return pd.DataFrame(rows)


SPEC_STATS = {  # cell statistic -> (record key under specialization/weights/, subclusters part, p column)
    "importance_mean": ("importance/fisher_p_mean", "importance", "p_mean"),
    "importance_range": ("importance/fisher_p_range", "importance", "p_range"),
    "coherence_dataset": ("coherence/dataset/fisher_p", "coherence_dataset", "p"),
    "coherence_vis_score": ("coherence/vis_score/fisher_p", "coherence_vis", "p_vis_score"),
    "coherence_vis_entropy": ("coherence/vis_entropy/fisher_p", "coherence_vis", "p_vis_entropy"),
}


# weights: the graph the run partitions (fold_bn as configured); weights_unfolded: the raw-kernel graph's n-cut
# (fold_bn=both); *_local: the [LS] per-layer partitions (local=true; sub-cluster statistics, no n-cut)
SPEC_PARTITIONS = ("weights", "weights_unfolded", "activations", "weights_local", "activations_local")


def specialization_frame(jobs: list[Path], settings: Settings) -> pd.DataFrame:
    """One row per job and analysed epoch, labelled ``init`` (epoch 0) or ``trained`` (the last epoch)."""
    rows = []
    p = "specialization/"
    for job, cfg, records in analysed_jobs(jobs, "specialization"):
        out = job / "analysis" / "specialization"
        last = max(r["epoch"] for r in records)
        for r in records:
            if r["epoch"] not in (0, last):
                continue
            row = {"job": job.name, "model": cfg.model.arch, "data": cfg.data.name, "setting": settings.of(job),
                   "seed": cfg.seed, "state": "init" if r["epoch"] == 0 else "trained",
                   **{k.removeprefix(p): v for k, v in r.items() if k.startswith(p) and isinstance(v, int | float)}}
            table = out / f"subclusters_epoch{r['epoch']}.csv"
            sub = pd.read_csv(table) if table.exists() else pd.DataFrame(columns=["part", "partition"])
            for partition in SPEC_PARTITIONS:
                for stat, (_, part, col) in SPEC_STATS.items():
                    mine = sub[(sub.part == part) & (sub.partition == partition)]
                    cells = mine[col].dropna() if col in mine else pd.Series(dtype=float)
                    row[f"{partition}/{stat}/frac_significant"] = float((cells <= 0.05).mean()) if len(cells) \
                        else np.nan
            rows.append(row)
    return pd.DataFrame(rows)


def specialization_tables(frame: pd.DataFrame, settings: Settings, out: Path) -> list[Path]:
    from featurelens.analysis.specialization.measure import bates_cdf, benjamini_hochberg

    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for (model, data, setting, state), g in frame.groupby(["model", "data", "setting", "state"]):
        for partition in SPEC_PARTITIONS:
            w = partition + "/"
            has_ncut = w + "ncut" in g and g[w + "ncut"].notna().any()
            has_stats = any(w + key in g and g[w + key].notna().any() for key, _, _ in SPEC_STATS.values())
            if not (has_ncut or has_stats):
                continue
            folded = bool(g["fold_bn"].fillna(1).astype(bool).all()) if "fold_bn" in g else True
            bn_folded = {"weights": folded, "weights_local": folded, "weights_unfolded": False}.get(partition, "n/a")
            row = {"model": model, "data": data, "setting": setting, "state": state, "partition": partition,
                   "bn_folded": bn_folded,
                   "n_seeds": g.seed.nunique()}
            if has_ncut:
                row["ncut"] = mean_sd(g[w + "ncut"])
            if w + "ncut_z" in g and g[w + "ncut_z"].notna().any():
                row.update(ncut_z=g[w + "ncut_z"].mean(), ncut_percentile=g[w + "ncut_percentile"].mean())
                if w + "ncut_z_seed_std" in g:
                    row["ncut_z_seed_std"] = g[w + "ncut_z_seed_std"].mean()
            if "ari_weights_vs_activations" in g:
                row["ari_w_vs_act"] = g["ari_weights_vs_activations"].mean()
            for stat, (key, _, _) in SPEC_STATS.items():
                if w + key in g and g[w + key].notna().any():
                    pbar = g[w + key].dropna().mean()
                    row[f"{stat}/p"] = bates_cdf(pbar, int(g[w + key].notna().sum()))
                    row[f"{stat}/frac_significant"] = g[f"{w}{stat}/frac_significant"].mean()
            rows.append(row)
    table = without_empty_setting(pd.DataFrame(rows))
    p_cols = [c for c in table.columns if c.endswith("/p")]
    lines = ["# Local specialization: weight and activation partitions at init and after training", "",
             "bn_folded: whether BN scales were folded into the weight graph (weights_unfolded: the raw kernels, "
             "as the CIFAR reference; the z-score's sign can differ between the two, see the README).",
             "n-cut against shuffled networks (activations: each unit's values permuted over the images), "
             "percentile: share of shuffles below, 1/(n+1) = all above; ncut_z_seed_std: spread of z over "
             "clustering seeds. For each",
             "statistic the Bates-combined Fisher p over seeds and the share of sub-clusters at the minimum",
             "percentile 0.05.", "", settings.line(["model", "data", "state", "partition"]), ""]
    if p_cols:
        flat = table[p_cols].to_numpy().ravel()
        finite = flat[np.isfinite(flat)]
        crit, _ = benjamini_hochberg(finite, 0.05) if finite.size else (0.0, None)
        for c in p_cols:
            table[c.replace("/p", "/significant_BH")] = table[c] <= crit if crit > 0 else False
        lines += [f"Benjamini–Hochberg over {finite.size} cells at q = 0.05: critical p = {crit:.4g}.", ""]
    table.to_csv(out / "specialization.csv", index=False)
    lines.append(table.to_markdown(index=False, floatfmt=".4g"))
    (out / "specialization.md").write_text("\n".join(lines) + "\n")
    return [out / "specialization.csv", out / "specialization.md"]


DISSECTION_CATS = ("object", "part", "scene", "material", "texture", "color")


def dissection_frame(jobs: list[Path], settings: Settings) -> pd.DataFrame:
    """One row per job, analysed epoch and dissected layer (the primary layer carries the baselines)."""
    rows = []
    p = "dissection/"
    for job, cfg, records in analysed_jobs(jobs, "dissection"):
        for r in records:
            layers = [k[len(p):-len("/unique_detectors")] for k in r  # dissection/<layer>/unique_detectors
                      if k.startswith(p) and k.endswith("/unique_detectors") and k.count("/") == 2
                      and not k.startswith(p + "random_init/")]
            for i, layer in enumerate(layers):
                q = f"{p}{layer}/"
                row = {"job": job.name, "model": cfg.model.arch, "data": cfg.data.name,
                       "setting": settings.of(job), "seed": cfg.seed, "epoch": r["epoch"], "layer": layer,
                       "primary": i == 0,
                       "unique_A": r[q + "unique_detectors"], "unique_B": r[q + "unique_detectors_percat"],
                       "detectors": r[q + "detectors"], "mean_score": r[q + "mean_score"],
                       **{f"B/{c}": r.get(f"{q}unique/{c}") for c in DISSECTION_CATS}}
                if i == 0:
                    row["random_init_unique_A"] = r.get(p + "random_init/unique_detectors")
                    row.update({k.removeprefix(p + "rotation/").replace("/unique_detectors", "_unique_A"): v
                                for k, v in r.items() if k.startswith(p + "rotation/alpha_")
                                and k.endswith("/unique_detectors")})
                rows.append(row)
    return pd.DataFrame(rows)


def dissection_tables(frame: pd.DataFrame, settings: Settings, out: Path) -> list[Path]:
    """Detectors per layer at the last epoch (with baselines), unique detectors per epoch, and its figure."""
    out.mkdir(parents=True, exist_ok=True)
    last = frame[frame.epoch == frame.groupby("job").epoch.transform("max")]
    rows = []
    for (model, data, setting, layer), g in last.groupby(["model", "data", "setting", "layer"], sort=False):
        row = {"model": model, "data": data, "setting": setting, "layer": layer, "n_seeds": g.seed.nunique(),
               "detectors": mean_sd(g.detectors, ".1f"), "unique_A": mean_sd(g.unique_A, ".1f"),
               "unique_B": mean_sd(g.unique_B, ".1f"), **{f"B/{c}": g[f"B/{c}"].mean() for c in DISSECTION_CATS}}
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
              settings.line(["model", "data", "layer"]), "", ""]
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


LINKING_KEYS = ("keep_rate", "n_pairs", "r2_heldout", "r2_pooled", "cycle_top1", "w_cos", "r_cycle_corr_unit",
                "units/fidelity_rate", "units/n_selective", "cf/success_rate", "cf/steps_median")


def linking_frame(jobs: list[Path], settings: Settings) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The last analysed epoch of every job, and its selective units (one row per unit, part and measure)."""
    rows, selective = [], []
    for job, cfg, records in analysed_jobs(jobs, "linking"):
        out = job / "analysis" / "linking"
        r = records[-1]
        head = cfg.analysis.linking.head_module or "last Linear"
        rows.append({"job": job.name, "model": cfg.model.arch, "data": cfg.data.name, "setting": settings.of(job),
                     "layer": f"input of {head}",
                     "seed": cfg.seed, "epoch": r["epoch"], **{k: r.get(f"linking/{k}") for k in LINKING_KEYS}})
        if (out / "selective_units.csv").exists() and (out / "selective_units.csv").stat().st_size > 1:
            sel = pd.read_csv(out / "selective_units.csv")
            selective += [{"model": cfg.model.arch, "data": cfg.data.name, "seed": cfg.seed, **row}
                          for row in sel.to_dict("records")]
    return pd.DataFrame(rows), pd.DataFrame(selective)


def linking_tables(frame: pd.DataFrame, selective: pd.DataFrame, settings: Settings, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for (model, data, setting, layer), g in frame.groupby(["model", "data", "setting", "layer"], sort=False):
        rows.append({"model": model, "data": data, "setting": setting, "layer": layer, "n_seeds": g.seed.nunique(),
                     **{k: mean_sd(g[k].astype(float)) for k in LINKING_KEYS}})
    table = without_empty_setting(pd.DataFrame(rows))
    table.to_csv(out / "linking.csv", index=False)
    lines = ["# Linking classifier features to a generator (last analysed epoch, mean ± sd over seeds)", "",
             "R² is on held-out pairs that passed the keep filter; cycle_top1: argmax E(G(L(E(x)))) = argmax E(x);",
             "cf: counterfactual success rate and median steps over the ordered class pairs.", "",
             settings.line(["model", "data", "layer"]), "",
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweeps", nargs="+", type=Path, help="sweep (multirun) directories")
    parser.add_argument("--out", type=Path, default=Path("outputs/tables"))
    parser.add_argument("--name", default="chirality_init", help="file stem of the chirality table")
    parser.add_argument("--keep-untrained", action="store_true",
                        help="keep jobs whose best val accuracy is not above chance")
    args = parser.parse_args(argv)
    missing = [str(d) for d in args.sweeps if not d.is_dir()]
    if missing:
        print(f"make_tables: error: no such directory: {missing}", file=sys.stderr)
        return 2
    jobs, failed = find_jobs(args.sweeps)
    for job in failed:
        print(f"skipping {failure(job)} job {job}", file=sys.stderr)
    if not args.keep_untrained:
        untrained = {job: why for job in jobs if (why := at_chance(job))}
        for job, why in untrained.items():
            print(f"skipping {why}: job {job} (--keep-untrained keeps it)", file=sys.stderr)
        jobs = [job for job in jobs if job not in untrained]
    settings = Settings(jobs)
    print(f"rows grouped by model, data and the swept settings {settings.swept or '(none)'}; seeds averaged")
    written = []
    frame = chirality_frame(jobs, settings)
    if not frame.empty:
        written += chirality_tables(frame, settings, args.out, args.name)
    for name, analysis in REGISTRY.items():
        if analysis.tables is Analysis.tables:  # its tables are still written below; reading its records is wasted
            continue
        final = final_frame(jobs, settings, name)
        if not final.empty:
            written += analysis.tables(final, settings.line, args.out)
    spec_frame = specialization_frame(jobs, settings)
    if not spec_frame.empty:
        written += specialization_tables(spec_frame, settings, args.out)
    nd_frame = dissection_frame(jobs, settings)
    if not nd_frame.empty:
        written += dissection_tables(nd_frame, settings, args.out)
    lk_frame, lk_selective = linking_frame(jobs, settings)
    if not lk_frame.empty:
        written += linking_tables(lk_frame, lk_selective, settings, args.out)
    if not written:
        print(f"make_tables: error: no analysis results in {len(jobs)} finished jobs", file=sys.stderr)
        return 1
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
