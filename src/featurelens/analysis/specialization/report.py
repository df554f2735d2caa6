"""What local specialization writes: ``nodes.csv`` (the graph's nodes at the latest analysed epoch: a resumed
run writes what the uninterrupted one does), ``labels_<partition>_epoch<E>.npy``, ``shuffles.csv`` (every
analysed epoch's shuffled n-cuts, from the run's history), ``subclusters_epoch<E>.csv``, and at epoch 0, every
``figures_every``-th and the last: ``cluster_sizes.png`` (layer × cluster sizes), ``ncut_shuffles.png``
(shuffled n-cuts and the true one); with visualisation ``vis_grid_<partition>.png``; and the sweep tables."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from featurelens import plots
from featurelens.analysis.base import Report
from featurelens.analysis.specialization.measure import bates_cdf, benjamini_hochberg
from featurelens.results import atomic_write
from featurelens.tables import SweepJob, mean_sd, without_empty_setting


def report(result, out_dir: Path, config, *, final: bool, history: list[dict]) -> Report:
    v, d, epoch = result.values, result.details, result.epoch
    out_dir.mkdir(parents=True, exist_ok=True)
    rep = Report()
    nodes = out_dir / "nodes.csv"
    pd.DataFrame(d["nodes"]).to_csv(nodes, index=False)
    for name, labels in d["labels"].items():
        np.save(out_dir / f"labels_{name}_epoch{epoch}.npy", labels.astype(np.int32))
    if d["subclusters"]:
        pd.DataFrame(d["subclusters"]).to_csv(out_dir / f"subclusters_epoch{epoch}.csv", index=False)
    for partition, grid in d["vis_grids"].items():
        rep.figures[f"vis_grid_{partition}"] = plots.image_grid(
            [img.permute(1, 2, 0).numpy() for _, img in grid], [t for t, _ in grid],
            out_dir / f"vis_grid_{partition}.png",
            title=f"Feature visualisations of {partition}-partition sub-clusters")
    # from the records, so a resumed run (whose history is checkpointed) writes every epoch's rows exactly once
    shuffles = pd.DataFrame([{"partition": name, "epoch": r["epoch"], "shuffle_id": i, "ncut": ncut}
                             for r in history for name in ("weights", "weights_unfolded", "activations")
                             for i, ncut in enumerate(r.get(f"specialization/{name}/shuffled_ncuts") or [])],
                            columns=["partition", "epoch", "shuffle_id", "ncut"])
    path = out_dir / "shuffles.csv"
    atomic_write(path, lambda fh: fh.write(shuffles.to_csv(index=False).encode()))
    if epoch == 0 or epoch % config.figures_every == 0 or final:
        bn = "BN folded" if config.fold_bn is not False else "BN not folded"
        rep.figures["cluster_sizes"] = plots.heatmap(
            np.asarray(v["weights/cluster_sizes"]), out_dir / "cluster_sizes.png", xlabel="cluster",
            ylabel="layer (forward order)", title=f"Weight-graph clusters ({bn}): units per layer and cluster "
                                                  f"(k = {config.k})")
        if v["weights/shuffled_ncuts"]:
            rep.figures["ncut_shuffles"] = plots.histogram_with_marker(
                v["weights/shuffled_ncuts"], v["weights/ncut"], out_dir / "ncut_shuffles.png", xlabel="n-cut",
                title=f"n-cut vs {config.n_shuffles} shuffled networks ({bn}; line: trained)")
    return rep


STATS = {  # cell statistic -> (record key under specialization/weights/, subclusters part, p column)
    "importance_mean": ("importance/fisher_p_mean", "importance", "p_mean"),
    "importance_range": ("importance/fisher_p_range", "importance", "p_range"),
    "coherence_dataset": ("coherence/dataset/fisher_p", "coherence_dataset", "p"),
    "coherence_vis_score": ("coherence/vis_score/fisher_p", "coherence_vis", "p_vis_score"),
    "coherence_vis_entropy": ("coherence/vis_entropy/fisher_p", "coherence_vis", "p_vis_entropy"),
}


# weights: the graph the run partitions (fold_bn as configured); weights_unfolded: the raw-kernel graph's n-cut
# (fold_bn=both); *_local: the [LS] per-layer partitions (local=true; sub-cluster statistics, no n-cut)
PARTITIONS = ("weights", "weights_unfolded", "activations", "weights_local", "activations_local")


def _frame(jobs: list[SweepJob]) -> pd.DataFrame:
    """One row per job and analysed epoch, labelled ``init`` (epoch 0) or ``trained`` (the last epoch)."""
    rows = []
    p = "specialization/"
    for job in jobs:
        last = max(r["epoch"] for r in job.records)
        for r in job.records:
            if r["epoch"] not in (0, last):
                continue
            row = {**job.row(), "state": "init" if r["epoch"] == 0 else "trained",
                   **{k.removeprefix(p): v for k, v in r.items() if k.startswith(p) and isinstance(v, int | float)}}
            table = job.file("specialization", f"subclusters_epoch{r['epoch']}.csv")
            sub = pd.read_csv(table) if table.exists() else pd.DataFrame(columns=["part", "partition"])
            for partition in PARTITIONS:
                for stat, (_, part, col) in STATS.items():
                    mine = sub[(sub.part == part) & (sub.partition == partition)]
                    cells = mine[col].dropna() if col in mine else pd.Series(dtype=float)
                    row[f"{partition}/{stat}/frac_significant"] = float((cells <= 0.05).mean()) if len(cells) \
                        else np.nan
            rows.append(row)
    return pd.DataFrame(rows)


def tables(jobs: list[SweepJob], grouped_by: Callable[..., str], out: Path) -> list[Path]:
    """``specialization.{csv,md}`` per model × data × state (init = epoch 0, trained = the last epoch) and
    partition: n-cut with its z and percentile against shuffles, the weight–activation ARI, and per statistic the
    Bates-combined Fisher p over seeds, the share of significant sub-clusters and Benjamini–Hochberg over all
    cells."""
    frame = _frame(jobs)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for (model, data, setting, state), g in frame.groupby(["model", "data", "setting", "state"]):
        for partition in PARTITIONS:
            w = partition + "/"
            has_ncut = w + "ncut" in g and g[w + "ncut"].notna().any()
            has_stats = any(w + key in g and g[w + key].notna().any() for key, _, _ in STATS.values())
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
            for stat, (key, _, _) in STATS.items():
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
             "percentile 0.05.", "", grouped_by(["model", "data", "state", "partition"]), ""]
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
