"""Local specialization (spec: ``shared/spec/specialization.md``): spectral clusters of units and how
specialised they are. The measures are in ``analysis.specialization`` (graphs, partitions, n-cut, shuffles),
``analysis.importance`` (lesions, dataset-example coherence) and ``analysis.featvis`` (feature
visualisation).

Each analysed epoch builds the weight graph, partitions it and compares its n-cut with ``n_shuffles``
shuffled networks (``weights``), and does the same without shuffles for the squared-Spearman activation
graph of ``act_samples`` training images (``activations``). The costly parts, ``importance`` (lesion
tests against random same-layer sets), ``coherence`` (top dataset examples) and ``visualisation``
(optimised inputs), run where ``parts`` lists them, by default only in ``analyze.py`` and at the last
epoch of experiment runs.

Files under ``<run_dir>/analysis/specialization/``: ``results.jsonl``, ``nodes.csv``,
``labels_<partition>_epoch<E>.npy``, ``shuffles.csv``, ``subclusters_epoch<E>.csv``,
``cluster_sizes.png`` (layer × cluster sizes), ``ncut_shuffles.png`` (shuffled n-cuts and the true one)
and, with visualisation, ``vis_grid_<partition>.png``. With ``activations`` in ``parts`` the importance and
coherence statistics are computed for both partitions (``specialization/<partition>/…``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import adjusted_rand_score
from torch import nn

from featurelens import plots
from featurelens.analysis import featvis
from featurelens.analysis import importance as imp
from featurelens.analysis import specialization as spec
from featurelens.callbacks.base import AnalysisCallback, AnalysisContext, model_preprocess, wandb_loggers
from featurelens.data.datamodule import targets as targets_of
from featurelens.errors import ConfigError
from featurelens.results import atomic_write

PARTS = ("weights", "activations", "importance", "coherence", "visualisation")


class SpecializationCallback(AnalysisCallback):
    """Spectral clusters of the weight and activation graphs and their n-cut against shuffles (+ optional
    importance and coherence of the sub-clusters). ``every_n_epochs: null`` analyses epoch 0 and the last
    epoch only (the default: it costs more than the other analyses)."""

    name = "specialization"
    headline = ("weights/ncut", "weights/ncut_z", "weights/ncut_percentile")

    def __init__(self, every_n_epochs: int | None = None, parts: Sequence[str] = ("weights", "activations"),
                 k: int = 12, n_shuffles: int = 10, shuffle_method: str = "layer", conv_norm: str = "l1",
                 fold_bn: bool | str = True, act_samples: int = 1000, corr: str = "spearman",
                 act_reduction: str = "mean_abs", seed: int = 0, lesion: dict[str, Any] | None = None,
                 coherence: dict[str, Any] | None = None, vis: dict[str, Any] | None = None,
                 figures_every: int = 5, n_cluster_seeds: int = 3, local: bool = False):
        super().__init__(every_n_epochs or 10**9)
        bad = [p for p in parts if p not in PARTS]
        if bad or not parts:
            raise ConfigError(f"analysis.specialization.parts={list(parts)}: choose from {list(PARTS)}")
        if k < 2 or n_shuffles < 0 or act_samples < 2:
            raise ConfigError(f"analysis.specialization: need k >= 2, n_shuffles >= 0, act_samples >= 2 "
                              f"(got k={k}, n_shuffles={n_shuffles}, act_samples={act_samples})")
        if fold_bn not in (True, False, "both"):
            raise ConfigError(f"analysis.specialization.fold_bn={fold_bn!r}: valid: [true, false, 'both']")
        if n_cluster_seeds < 1:
            raise ConfigError(f"analysis.specialization.n_cluster_seeds={n_cluster_seeds}: must be >= 1")
        if (lesion or {}).get("target", "output") not in ("output", "weights"):
            raise ConfigError(f"analysis.specialization.lesion.target={lesion['target']!r}: "
                              "valid: ['output', 'weights']")
        if shuffle_method not in ("layer", "layer_nonzero"):
            raise ConfigError(f"analysis.specialization.shuffle_method={shuffle_method!r}: "
                              "valid: ['layer', 'layer_nonzero']")
        self.parts, self.k, self.n_shuffles, self.shuffle_method = tuple(parts), k, n_shuffles, shuffle_method
        # fold_bn "both": the folded graph is the partition; the unfolded one gets its own n-cut vs shuffles
        self.graph_kwargs = {"conv_norm": conv_norm, "fold_bn": fold_bn is not False}
        self.also_unfolded = fold_bn == "both"
        self.n_cluster_seeds, self.local = n_cluster_seeds, local
        self.act_samples, self.corr, self.act_reduction, self.seed = act_samples, corr, act_reduction, seed
        self.lesion = {"n_random": 19, "min_size": 2, "max_prop": 0.99, "target": "output", **(lesion or {})}
        self.coherence = {"top_n": 10, "skip_first": False, "min_size": 5, "max_prop": 0.75, **(coherence or {})}
        self.vis = {"steps": 64, "lr": 0.05, "relu_redirect_steps": 16, "n_random": 19, "min_size": 3,
                    "max_prop": 0.99, "max_sets": 8, **(vis or {})}
        self.figures_every = figures_every
        self._prev_labels: dict[str, np.ndarray] = {}

    # ------------------------------------------------------------------ analysis
    def _partition_values(self, name: str, adjacency, labels: np.ndarray) -> dict[str, Any]:
        value = spec.ncut(adjacency, labels)
        kept = labels[labels >= 0]
        out = {f"{name}/ncut": value, f"{name}/ave_in_out": spec.ave_in_out(value, self.k),
               f"{name}/n_isolated": int((labels < 0).sum()),
               f"{name}/largest_cluster_frac": float(np.bincount(kept).max() / kept.size) if kept.size else None}
        prev = self._prev_labels.get(name)
        if prev is not None and prev.shape == labels.shape:
            out[f"{name}/ari_prev_epoch"] = float(adjusted_rand_score(prev, labels))
        self._prev_labels[name] = labels
        return out

    @staticmethod
    def _shuffle_values(name: str, cl: dict[str, Any]) -> dict[str, Any]:
        keys = ("ncut_shuffled_mean", "ncut_shuffled_std", "ncut_z", "ncut_percentile", "ncut_seed_mean",
                "ncut_seed_std", "ncut_z_seed_mean", "ncut_z_seed_std")
        return {**{f"{name}/{key}": cl[key] for key in keys}, f"{name}/shuffled_ncuts": cl["shuffled_ncuts"].tolist()}

    @staticmethod
    def _as_nodes(graph: spec.WeightGraph, act, act_labels: np.ndarray) -> np.ndarray:
        """Activation-graph labels as labels of the weight graph's nodes (-1 where no unit is recorded)."""
        out = np.full(graph.n, -1, dtype=np.int64)
        out[np.concatenate([np.arange(graph.n)[graph.layer_slice(i)] for i in act.weight_layers])] = act_labels
        return out

    def _local_activations(self, act, act_labels: np.ndarray) -> np.ndarray:
        """[LS] local activation partition (spec §2.4): each layer's own r² graph clustered into as many
        clusters as the layer has global labels (one cluster when that is 1 or the layer is too small)."""
        offsets = np.concatenate([[0], np.cumsum(act.layer_sizes)])
        seeds = spec.seed_sequence_ints(self.seed, len(act.layer_sizes))
        out = np.full(act_labels.shape, -1, dtype=np.int64)
        for i in range(len(act.layer_sizes)):
            sl = slice(offsets[i], offsets[i + 1])
            block, own = act.adjacency[sl, sl], act_labels[sl]
            n_live = int((block.sum(1) > 0).sum())
            k_l = min(len(np.unique(own[own >= 0])), n_live - 1)
            if k_l <= 1:
                out[sl] = np.where(own >= 0, 0, -1)
            else:
                out[sl] = spec.spectral_partition(block, k_l, seeds[i])
        return out

    def state_dict(self) -> dict[str, Any]:  # last partitions, for ari_prev_epoch after a resume
        return {**super().state_dict(), "prev_labels": {k: v.tolist() for k, v in self._prev_labels.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._prev_labels = {k: np.asarray(v) for k, v in state_dict.get("prev_labels", {}).items()}

    def compute(self, model: nn.Module, ctx: AnalysisContext) -> dict[str, Any]:
        try:
            graph = spec.weight_graph(model, **self.graph_kwargs)
        except (NotImplementedError, ValueError) as e:
            raise ConfigError(f"specialization: cannot build the weight graph of {type(model).__name__}: {e}") from None
        if graph.n <= self.k:
            raise ConfigError(f"analysis.specialization.k={self.k} must be below the {graph.n} graph nodes")
        values: dict[str, Any] = {"n_nodes": graph.n, "n_layers": len(graph.layer_sizes),
                                  "fold_bn": self.graph_kwargs["fold_bn"]}
        self._write_nodes(graph)
        cl = spec.clusterability(graph, self.k, self.n_shuffles, self.seed, shuffle_method=self.shuffle_method,
                                 n_cluster_seeds=self.n_cluster_seeds)
        labels = cl["labels"]
        values.update(self._partition_values("weights", graph.adjacency, labels))
        values.update(self._shuffle_values("weights", cl))
        values["weights/cluster_sizes"] = self._cluster_sizes(labels, graph.node_layer, len(graph.layer_sizes))
        if self.also_unfolded and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
            unfolded = spec.weight_graph(model, conv_norm=self.graph_kwargs["conv_norm"], fold_bn=False)
            cl_raw = spec.clusterability(unfolded, self.k, self.n_shuffles, self.seed,
                                         shuffle_method=self.shuffle_method, n_cluster_seeds=self.n_cluster_seeds)
            values["weights_unfolded/ncut"] = cl_raw["ncut"]
            values.update(self._shuffle_values("weights_unfolded", cl_raw))
        np.save(self.out_dir / f"labels_weights_epoch{ctx.epoch}.npy", labels.astype(np.int32))
        partitions = {"weights": labels}
        if self.local:
            partitions["weights_local"] = spec.local_partition(graph, labels, self.seed)
        needs_data = {"activations", "importance", "coherence", "visualisation"} & set(self.parts)
        if needs_data and ctx.datamodule is None:
            raise RuntimeError(f"specialization parts {sorted(needs_data)} need the data module")
        act = None
        if needs_data:
            ctx.datamodule.setup("fit")
        if {"activations", "coherence"} & set(self.parts):
            act = self._activation_graph(model, graph, ctx)
            act_cl = spec.activation_clusterability(act.adjacency, act.samples, self.k, self.n_shuffles, self.seed,
                                                    corr=self.corr, n_cluster_seeds=self.n_cluster_seeds)
            act_labels = act_cl["labels"]
            values.update(self._partition_values("activations", act.adjacency, act_labels))
            values.update(self._shuffle_values("activations", act_cl))
            np.save(self.out_dir / f"labels_activations_epoch{ctx.epoch}.npy", act_labels.astype(np.int32))
            common = np.concatenate([labels[graph.layer_slice(i)] for i in act.weight_layers])
            keep = (common >= 0) & (act_labels >= 0)
            values["ari_weights_vs_activations"] = float(adjusted_rand_score(common[keep], act_labels[keep]))
            if "activations" in self.parts:  # the activation partition as labels of the weight graph's nodes
                partitions["activations"] = self._as_nodes(graph, act, act_labels)
                if self.local:
                    partitions["activations_local"] = self._as_nodes(graph, act, self._local_activations(act,
                                                                                                     act_labels))
        for name, part_labels in partitions.items():
            if name.endswith("_local"):
                np.save(self.out_dir / f"labels_{name}_epoch{ctx.epoch}.npy", part_labels.astype(np.int32))
                values[f"{name}/n_clusters"] = sum(len(set(part_labels[graph.layer_slice(i)].tolist()) - {-1})
                                                   for i in range(len(graph.layer_sizes)))
        subclusters: list[dict[str, Any]] = []
        for name, part_labels in partitions.items():
            rows, summary = self._subcluster_statistics(model, graph, name, part_labels, act, ctx)
            folded = self.graph_kwargs["fold_bn"] if name.startswith("weights") else "n/a"  # activations: no graph
            subclusters += [{"partition": name, "bn_folded": folded, **r} for r in rows]
            values.update({f"{name}/{k}": v for k, v in summary.items()})
        if subclusters:
            pd.DataFrame(subclusters).to_csv(self.out_dir / f"subclusters_epoch{ctx.epoch}.csv", index=False)
        return values

    def _subcluster_statistics(self, model: nn.Module, graph: spec.WeightGraph, partition: str,
                               labels: np.ndarray, act, ctx: AnalysisContext,
                               ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Importance and coherence of one partition's sub-clusters (the parts that ``parts`` lists)."""
        rows: list[dict[str, Any]] = []
        summary: dict[str, Any] = {}
        if "importance" in self.parts:
            imp_rows, imp_summary = imp.importance(
                model, graph, labels, ctx.datamodule.loader(ctx.datamodule.test_set), ctx.datamodule.num_classes,
                n_random=self.lesion["n_random"], min_size=self.lesion["min_size"],
                max_prop=self.lesion["max_prop"], seed=self.seed, device=ctx.device, target=self.lesion["target"])
            rows += [{"part": "importance", **r} for r in imp_rows]
            summary.update({f"importance/{k}": v for k, v in imp_summary.items()})
        if "coherence" in self.parts:
            coh_rows, coh_summary = self._dataset_coherence(graph, labels, act, ctx)
            rows += coh_rows
            summary.update({f"coherence/dataset/{k}": v for k, v in coh_summary.items()})
        if "visualisation" in self.parts:
            vis_rows, vis_summary = self._visualisation(model, graph, partition, labels, ctx)
            rows += vis_rows
            summary.update({f"coherence/{k}": v for k, v in vis_summary.items()})
        return rows, summary

    def _dataset_coherence(self, graph: spec.WeightGraph, labels: np.ndarray, act, ctx: AnalysisContext):
        """§2.7 dataset examples: entropy of the labels of each sub-cluster's top training images."""
        n = act.samples.shape[0]
        subset = self._act_subset(ctx)  # the same images, in the same order, as act.samples
        targets = torch.as_tensor(targets_of(subset)[:n])
        scores = torch.as_tensor(act.samples)
        rows, pvalues, effects = [], [], []
        offsets = np.concatenate([[0], np.cumsum(act.layer_sizes)])
        for i, layer in enumerate(act.weight_layers):
            clusters = imp.layer_clusters(graph, labels, layer)
            if not clusters:
                continue
            candidates = torch.as_tensor(np.flatnonzero(~graph.isolated[graph.layer_slice(layer)]))
            layer_rows, _ = imp.dataset_coherence(
                scores[:, offsets[i]:offsets[i + 1]], targets, list(clusters.values()),
                top_n=self.coherence["top_n"], skip_first=self.coherence["skip_first"],
                n_random=self.lesion["n_random"], min_size=self.coherence["min_size"],
                max_prop=self.coherence["max_prop"], seed=self.seed + layer, candidates=candidates)
            cluster_ids = list(clusters)
            for r in layer_rows:
                rows.append({"part": "coherence_dataset", "layer": graph.layer_names[layer],
                             "cluster": cluster_ids[r["set"]], **r})
                pvalues.append(r["p"])
                effects.append(r["effect"])
        return rows, self._combine(pvalues, effects, effect_scale=1)  # H_r / H_S: 1 = like random

    def _visualisation(self, model: nn.Module, graph: spec.WeightGraph, partition: str, labels: np.ndarray,
                       ctx: AnalysisContext):
        """§2.7 feature visualisation of up to ``vis.max_sets`` sub-clusters against random same-size sets."""
        dm = ctx.datamodule
        prep = model_preprocess(ctx)
        kwargs = {k: self.vis[k] for k in ("steps", "lr", "relu_redirect_steps")}
        rows, budget, grid = [], self.vis["max_sets"], []
        stats: dict[str, list[list[float]]] = {"vis_score": [[], []], "vis_entropy": [[], []]}
        for layer in imp.eligible_layers(graph):
            clusters = imp.layer_clusters(graph, labels, layer)
            sets = list(clusters.values())[:budget]
            if not sets or graph.z_modules[layer] is None:
                continue
            z_module = model.get_submodule(graph.z_modules[layer])
            candidates = torch.as_tensor(np.flatnonzero(~graph.isolated[graph.layer_slice(layer)]))
            layer_rows, _ = featvis.vis_coherence(
                model, z_module, sets, int(graph.layer_sizes[layer]), candidates, n_random=self.vis["n_random"],
                seed=self.seed + layer, min_size=self.vis["min_size"], max_frac=self.vis["max_prop"],
                size=dm.input_size, channels=dm.channels, preprocess=prep, **kwargs)
            budget -= len(layer_rows)
            cluster_ids = list(clusters)
            for r in layer_rows:
                rows.append({"part": "coherence_vis", "layer": graph.layer_names[layer],
                             "cluster": cluster_ids[r["set_index"]], **r})
                for stat in stats:
                    stats[stat][0].append(r[f"p_{stat}"])
                    stats[stat][1].append(r[f"effect_{stat}"])
            if layer_rows and len(grid) < 4:
                images, *_ = featvis.visualise(model, z_module, [sets[r["set_index"]] for r in layer_rows[:4]],
                                               size=dm.input_size, channels=dm.channels,
                                               preprocess=prep, seed=self.seed, **kwargs)
                grid += [(f"{graph.layer_names[layer]} #{r['set_index']}", img) for r, img in zip(
                    layer_rows[:4], images, strict=True)]
            if budget <= 0:
                break
        if grid:
            plots.image_grid([img.permute(1, 2, 0).numpy() for _, img in grid], [t for t, _ in grid],
                             self.out_dir / f"vis_grid_{partition}.png",
                             title=f"Feature visualisations of {partition}-partition sub-clusters")
        summary = {}
        for stat, (pvalues, effects) in stats.items():
            # effect factors t/(t + r_j): 2 x mean, 1 = like random (§2.6), as featvis.vis_coherence per layer
            summary.update({f"{stat}/{k}": v for k, v in self._combine(pvalues, effects, effect_scale=2).items()})
        return rows, summary

    def _combine(self, pvalues: list[float], effects: list[float], effect_scale: float) -> dict[str, float]:
        """Shifted Fisher combination of the sub-clusters' percentiles, and ``effect_scale`` x the mean effect
        ± SEM over the sub-clusters (spec §2.6)."""
        p = np.asarray([v for v in pvalues if v is not None and np.isfinite(v)], dtype=float)
        out: dict[str, float] = {"n_sets": int(p.size)}
        if p.size:
            fisher = spec.fisher_combine(p, n_random=self.lesion["n_random"])
            out.update(fisher_p=float(fisher.pvalue), fisher_stat=float(fisher.fisher_stat))
        effect, sem = spec.mean_sem(effects, scale=effect_scale)
        if np.isfinite(effect):
            out["effect"] = effect
            if np.isfinite(sem):
                out["effect_sem"] = sem
        return out

    def _act_subset(self, ctx: AnalysisContext):
        """The class-balanced training images behind the activation graph (and dataset coherence)."""
        return ctx.datamodule.class_subset(max(1, -(-self.act_samples // ctx.datamodule.num_classes)), self.seed)

    def _activation_graph(self, model: nn.Module, graph: spec.WeightGraph, ctx: AnalysisContext):
        loader = ctx.datamodule.loader(self._act_subset(ctx))
        return spec.activation_graph(model, loader, graph, max_samples=self.act_samples, corr=self.corr,
                                     act_reduction=self.act_reduction, device=ctx.device)

    @staticmethod
    def _cluster_sizes(labels: np.ndarray, node_layer: np.ndarray, n_layers: int) -> list[list[int]]:
        k = int(labels.max()) + 1 if (labels >= 0).any() else 0
        sizes = np.zeros((n_layers, k), dtype=int)
        kept = labels >= 0
        np.add.at(sizes, (node_layer[kept], labels[kept]), 1)
        return sizes.tolist()

    def _write_nodes(self, graph: spec.WeightGraph) -> None:
        path = self.out_dir / "nodes.csv"
        if not path.exists():
            self.out_dir.mkdir(parents=True, exist_ok=True)
            pd.DataFrame(graph.node_table()).to_csv(path, index=False)

    # ------------------------------------------------------------------ reporting
    def report(self, model: nn.Module, ctx: AnalysisContext, record: dict[str, Any]) -> None:
        p = "specialization/"
        shuffles = pd.concat([pd.DataFrame({"partition": name, "epoch": ctx.epoch, "shuffle_id": range(len(ncuts)),
                                            "ncut": ncuts})
                              for name in ("weights", "weights_unfolded", "activations")
                              if (ncuts := record.get(f"{p}{name}/shuffled_ncuts")) is not None])
        path = self.out_dir / "shuffles.csv"
        if path.exists():  # a resumed run re-analyses an epoch: its rows replace the earlier ones
            earlier = pd.read_csv(path)
            shuffles = pd.concat([earlier[earlier.epoch != ctx.epoch], shuffles])
        atomic_write(path, lambda fh: fh.write(shuffles.to_csv(index=False).encode()))
        bn = "BN folded" if self.graph_kwargs["fold_bn"] else "BN not folded"
        if not (ctx.epoch == 0 or ctx.epoch % self.figures_every == 0 or ctx.final):
            return
        sizes = np.asarray(record[p + "weights/cluster_sizes"])
        plots.heatmap(sizes, self.out_dir / "cluster_sizes.png", xlabel="cluster", ylabel="layer (forward order)",
                      title=f"Weight-graph clusters ({bn}): units per layer and cluster (k = {self.k})")
        if record[p + "weights/shuffled_ncuts"]:
            plots.histogram_with_marker(record[p + "weights/shuffled_ncuts"], record[p + "weights/ncut"],
                                        self.out_dir / "ncut_shuffles.png", xlabel="n-cut",
                                        title=f"n-cut vs {self.n_shuffles} shuffled networks ({bn}; line: trained)")
        for key in ("cluster_sizes", "ncut_shuffles"):
            for lg in wandb_loggers(ctx.loggers):
                if (self.out_dir / f"{key}.png").exists():
                    lg.log_image(key=f"specialization/{key}", images=[str(self.out_dir / f"{key}.png")],
                                 step=ctx.step)
