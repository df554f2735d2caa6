"""What local specialization writes: ``nodes.csv`` (the graph's nodes at the latest analysed epoch: a resumed
run writes what the uninterrupted one does), ``labels_<partition>_epoch<E>.npy``, ``shuffles.csv`` (every
analysed epoch's shuffled n-cuts, from the run's history), ``subclusters_epoch<E>.csv``, and at epoch 0, every
``figures_every``-th and the last: ``cluster_sizes.png`` (layer × cluster sizes), ``ncut_shuffles.png``
(shuffled n-cuts and the true one); with visualisation ``vis_grid_<partition>.png``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from featurelens import plots
from featurelens.analysis.base import Report
from featurelens.results import atomic_write


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
