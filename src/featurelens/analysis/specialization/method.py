"""Hod, Filan, Casper et al.'s local specialization of one model: spectral clusters of its units and how
specialised they are. The measures are in ``measure`` (graphs, partitions, n-cut, shuffles),
``featurelens.analysis.importance`` (lesions, dataset-example coherence) and ``featurelens.analysis.featvis``
(feature visualisation).

Each run builds the weight graph, partitions it and compares its n-cut with ``n_shuffles`` shuffled networks
(``weights``), and does the same without shuffles for the squared-Spearman activation graph of ``act_samples``
training images (``activations``). The costly parts, ``importance`` (lesion tests against random same-layer
sets), ``coherence`` (top dataset examples) and ``visualisation`` (optimised inputs), run where ``parts`` lists
them, by default only in ``analyze.py`` and at the last epoch of experiment runs. With ``activations`` in
``parts`` the importance and coherence statistics are computed for both partitions (``<partition>/…``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from sklearn.metrics import adjusted_rand_score
from torch import nn

from featurelens.analysis import featvis
from featurelens.analysis import importance as imp
from featurelens.analysis.base import Analysis, Data, Result, model_device, model_input, register, timed
from featurelens.analysis.specialization import measure as spec
from featurelens.data.datamodule import targets as targets_of
from featurelens.errors import ConfigError

PARTS = ("weights", "activations", "importance", "coherence", "visualisation")


@dataclass
class LesionConfig:
    """Lesions on the test split; target output: zero the unit's z (BN output); weights: zero the layer's own
    output = the reference's zeroed weights and bias (a BN after it then outputs beta - gamma mu / sigma)."""

    n_random: int = 19
    min_size: int = 2
    max_prop: float = 0.99
    target: str = "output"


@dataclass
class CoherenceConfig:
    top_n: int = 10
    skip_first: bool = False
    min_size: int = 5
    max_prop: float = 0.75


@dataclass
class VisConfig:
    steps: int = 64
    lr: float = 0.05
    relu_redirect_steps: int = 16
    n_random: int = 19
    min_size: int = 3
    max_prop: float = 0.99
    max_sets: int = 8


@dataclass
class SpecializationConfig:
    """The parameters of local specialization (``analysis.specialization.<key>``)."""

    parts: list[str] = field(default_factory=lambda: ["weights", "activations"])
    k: int = 12  # clusters ([CL] 12; [LS] 16 for small nets, 32 for ImageNet nets)
    n_shuffles: int = 10  # shuffled networks for the n-cut percentile (50 in the papers' analysis)
    shuffle_method: str = "layer"  # layer | layer_nonzero (keeps pruning masks)
    conv_norm: str = "l1"  # l1 | induced_l1 (reference) reduction of a kernel to an edge weight
    # true: BN scales folded into the edges (the effective linear map; the partition used); false: raw kernels, as
    # the CIFAR reference; both: the folded partition plus the unfolded graph's n-cut vs shuffles
    # (weights_unfolded/...). The z-score differs between the two (the issue saw opposite signs on a small CNN)
    fold_bn: Any = True
    n_cluster_seeds: int = 3  # clusterings of each true graph: the lowest n-cut is kept, the spread logged
    local: bool = False  # also the [LS] local (per-layer) partitions weights_local / activations_local
    act_samples: int = 1000  # training images for the activation graph (5000 in the papers)
    corr: str = "spearman"  # spearman (squared) | pearson | kendall
    act_reduction: str = "mean_abs"  # mean_abs | reference (max_w sum_h)
    seed: int = 0
    figures_every: int = 5
    lesion: LesionConfig = field(default_factory=LesionConfig)
    coherence: CoherenceConfig = field(default_factory=CoherenceConfig)
    vis: VisConfig = field(default_factory=VisConfig)

    def __post_init__(self):
        for name, cls in (("lesion", LesionConfig), ("coherence", CoherenceConfig), ("vis", VisConfig)):
            if isinstance(getattr(self, name), dict):
                setattr(self, name, cls(**getattr(self, name)))
        self.parts = list(self.parts)
        bad = [p for p in self.parts if p not in PARTS]
        if bad or not self.parts:
            raise ConfigError(f"analysis.specialization.parts={self.parts}: choose from {list(PARTS)}")
        if self.k < 2 or self.n_shuffles < 0 or self.act_samples < 2:
            raise ConfigError(f"analysis.specialization: need k >= 2, n_shuffles >= 0, act_samples >= 2 "
                              f"(got k={self.k}, n_shuffles={self.n_shuffles}, act_samples={self.act_samples})")
        if self.fold_bn not in (True, False, "both"):
            raise ConfigError(f"analysis.specialization.fold_bn={self.fold_bn!r}: valid: [true, false, 'both']")
        if self.n_cluster_seeds < 1:
            raise ConfigError(f"analysis.specialization.n_cluster_seeds={self.n_cluster_seeds}: must be >= 1")
        if self.lesion.target not in ("output", "weights"):
            raise ConfigError(f"analysis.specialization.lesion.target={self.lesion.target!r}: "
                              "valid: ['output', 'weights']")
        if self.shuffle_method not in ("layer", "layer_nonzero"):
            raise ConfigError(f"analysis.specialization.shuffle_method={self.shuffle_method!r}: "
                              "valid: ['layer', 'layer_nonzero']")


@dataclass
class SpecializationResult(Result):
    """One analysed epoch. ``details``: the graph's node table (``nodes``), each partition's labels
    (``labels``), the sub-cluster rows (``subclusters``) and the feature visualisations (``vis_grids``:
    partition -> [(title, image)])."""

    name: ClassVar[str] = "specialization"
    details: dict[str, Any] = field(default_factory=dict, repr=False)

    def to_frame(self):
        """The sub-clusters' importance and coherence statistics, one row per (partition, part, set)."""
        import pandas as pd

        return pd.DataFrame(self.details.get("subclusters", []))


@register
class Specialization(Analysis):
    """Spectral clusters of the weight and activation graphs and their n-cut against shuffles (+ optional
    importance and coherence of the sub-clusters). Scheduled at epoch 0 and the last epoch by default
    (``every_n_epochs: null``): it costs more than the other analyses."""

    name = "specialization"
    Config = SpecializationConfig
    headline = ("weights/ncut", "weights/ncut_z", "weights/ncut_percentile")
    constants = ("n_nodes", "n_layers", "fold_bn")
    every_n_epochs = None

    def __init__(self, config: SpecializationConfig | None = None, **params: Any):
        super().__init__(config, **params)
        self._prev_labels: dict[str, np.ndarray] = {}

    @property
    def _folded(self) -> bool:
        """Whether the partitioned weight graph folds BN scales into its edges (fold_bn true or "both": the
        unfolded graph then gets its own n-cut vs shuffles)."""
        return self.config.fold_bn is not False

    # ------------------------------------------------------------------ analysis
    def _partition_values(self, name: str, adjacency, labels: np.ndarray) -> dict[str, Any]:
        value = spec.ncut(adjacency, labels)
        kept = labels[labels >= 0]
        out = {f"{name}/ncut": value, f"{name}/ave_in_out": spec.ave_in_out(value, self.config.k),
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
        seeds = spec.seed_sequence_ints(self.config.seed, len(act.layer_sizes))
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
        return {"prev_labels": {k: v.tolist() for k, v in self._prev_labels.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._prev_labels = {k: np.asarray(v) for k, v in state.get("prev_labels", {}).items()}

    def run(self, model: nn.Module, data: Data, *, epoch: int = 0, shard: tuple[int, int] = (0, 1),
            final: bool = True) -> SpecializationResult:
        c = self.config
        device = model_device(model)
        try:
            graph = spec.weight_graph(model, conv_norm=c.conv_norm, fold_bn=self._folded)
        except (NotImplementedError, ValueError) as e:
            raise ConfigError(f"specialization: cannot build the weight graph of {type(model).__name__}: {e}") from None
        if graph.n <= c.k:
            raise ConfigError(f"analysis.specialization.k={c.k} must be below the {graph.n} graph nodes")
        values: dict[str, Any] = {"n_nodes": graph.n, "n_layers": len(graph.layer_sizes),
                                  "fold_bn": self._folded}
        details: dict[str, Any] = {"nodes": graph.node_table(), "labels": {}, "vis_grids": {}}
        with timed(f"specialization: weight graph of {graph.n} nodes, k={c.k}, against {c.n_shuffles} shuffles"):
            cl = spec.clusterability(graph, c.k, c.n_shuffles, c.seed, shuffle_method=c.shuffle_method,
                                     n_cluster_seeds=c.n_cluster_seeds)
        labels = cl["labels"]
        values.update(self._partition_values("weights", graph.adjacency, labels))
        values.update(self._shuffle_values("weights", cl))
        values["weights/cluster_sizes"] = self._cluster_sizes(labels, graph.node_layer, len(graph.layer_sizes))
        if c.fold_bn == "both" and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
            unfolded = spec.weight_graph(model, conv_norm=c.conv_norm, fold_bn=False)
            with timed(f"specialization: unfolded weight graph against {c.n_shuffles} shuffles"):
                cl_raw = spec.clusterability(unfolded, c.k, c.n_shuffles, c.seed,
                                             shuffle_method=c.shuffle_method, n_cluster_seeds=c.n_cluster_seeds)
            values["weights_unfolded/ncut"] = cl_raw["ncut"]
            values.update(self._shuffle_values("weights_unfolded", cl_raw))
        details["labels"]["weights"] = labels
        partitions = {"weights": labels}
        if c.local:
            partitions["weights_local"] = spec.local_partition(graph, labels, c.seed)
        needs_data = {"activations", "importance", "coherence", "visualisation"} & set(c.parts)
        missing = [k for k in ("loader", "class_subset", "test_set", "num_classes") if not hasattr(data, k)]
        if needs_data and missing:
            raise ConfigError(f"analysis.specialization.parts {sorted(needs_data)} read the classifier's training "
                              f"and test splits: give data= a featurelens ImageDataModule (this data has no {missing}),"
                              " or parts=['weights']")
        act = None
        if needs_data:
            data.setup("fit")
        if {"activations", "coherence"} & set(c.parts):
            with timed(f"specialization: activation graph on {c.act_samples} images against {c.n_shuffles} "
                       "shuffles"):
                act = self._activation_graph(model, graph, data, device)
                act_cl = spec.activation_clusterability(act.adjacency, act.samples, c.k, c.n_shuffles, c.seed,
                                                        corr=c.corr, n_cluster_seeds=c.n_cluster_seeds)
            act_labels = act_cl["labels"]
            values.update(self._partition_values("activations", act.adjacency, act_labels))
            values.update(self._shuffle_values("activations", act_cl))
            details["labels"]["activations"] = act_labels
            common = np.concatenate([labels[graph.layer_slice(i)] for i in act.weight_layers])
            keep = (common >= 0) & (act_labels >= 0)
            values["ari_weights_vs_activations"] = float(adjusted_rand_score(common[keep], act_labels[keep]))
            if "activations" in c.parts:  # the activation partition as labels of the weight graph's nodes
                partitions["activations"] = self._as_nodes(graph, act, act_labels)
                if c.local:
                    partitions["activations_local"] = self._as_nodes(graph, act, self._local_activations(act,
                                                                                                     act_labels))
        for name, part_labels in partitions.items():
            if name.endswith("_local"):
                details["labels"][name] = part_labels
                values[f"{name}/n_clusters"] = sum(len(set(part_labels[graph.layer_slice(i)].tolist()) - {-1})
                                                   for i in range(len(graph.layer_sizes)))
        subclusters: list[dict[str, Any]] = []
        for name, part_labels in partitions.items():
            rows, summary = self._subcluster_statistics(model, graph, name, part_labels, act, data, device, details)
            folded = self._folded if name.startswith("weights") else "n/a"  # activations: no graph
            subclusters += [{"partition": name, "bn_folded": folded, **r} for r in rows]
            values.update({f"{name}/{k}": v for k, v in summary.items()})
        details["subclusters"] = subclusters
        return SpecializationResult(epoch, values, details)

    def _subcluster_statistics(self, model: nn.Module, graph: spec.WeightGraph, partition: str,
                               labels: np.ndarray, act, data: Data, device: torch.device, details: dict[str, Any],
                               ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Importance and coherence of one partition's sub-clusters (the parts that ``parts`` lists)."""
        c = self.config
        rows: list[dict[str, Any]] = []
        summary: dict[str, Any] = {}
        if "importance" in c.parts:
            with timed(f"specialization: importance (lesions) of the {partition} sub-clusters"):
                imp_rows, imp_summary = imp.importance(
                    model, graph, labels, data.loader(data.test_set), data.num_classes,
                    n_random=c.lesion.n_random, min_size=c.lesion.min_size,
                    max_prop=c.lesion.max_prop, seed=c.seed, device=device, target=c.lesion.target)
            rows += [{"part": "importance", **r} for r in imp_rows]
            summary.update({f"importance/{k}": v for k, v in imp_summary.items()})
        if "coherence" in c.parts:
            with timed(f"specialization: dataset coherence of the {partition} sub-clusters"):
                coh_rows, coh_summary = self._dataset_coherence(graph, labels, act, data)
            rows += coh_rows
            summary.update({f"coherence/dataset/{k}": v for k, v in coh_summary.items()})
        if "visualisation" in c.parts:
            with timed(f"specialization: feature visualisation of the {partition} sub-clusters"):
                vis_rows, vis_summary = self._visualisation(model, graph, partition, labels, data, device, details)
            rows += vis_rows
            summary.update({f"coherence/{k}": v for k, v in vis_summary.items()})
        return rows, summary

    def _dataset_coherence(self, graph: spec.WeightGraph, labels: np.ndarray, act, data: Data):
        """§2.7 dataset examples: entropy of the labels of each sub-cluster's top training images."""
        n = act.samples.shape[0]
        subset = self._act_subset(data)  # the same images, in the same order, as act.samples
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
                top_n=self.config.coherence.top_n, skip_first=self.config.coherence.skip_first,
                n_random=self.config.lesion.n_random, min_size=self.config.coherence.min_size,
                max_prop=self.config.coherence.max_prop, seed=self.config.seed + layer, candidates=candidates)
            cluster_ids = list(clusters)
            for r in layer_rows:
                rows.append({"part": "coherence_dataset", "layer": graph.layer_names[layer],
                             "cluster": cluster_ids[r["set"]], **r})
                pvalues.append(r["p"])
                effects.append(r["effect"])
        return rows, self._combine(pvalues, effects, effect_scale=1)  # H_r / H_S: 1 = like random

    def _visualisation(self, model: nn.Module, graph: spec.WeightGraph, partition: str, labels: np.ndarray,
                       data: Data, device: torch.device, details: dict[str, Any]):
        """§2.7 feature visualisation of up to ``vis.max_sets`` sub-clusters against random same-size sets."""
        dm = data
        prep = model_input(data, device)
        kwargs = {k: getattr(self.config.vis, k) for k in ("steps", "lr", "relu_redirect_steps")}
        rows, budget, grid = [], self.config.vis.max_sets, []
        stats: dict[str, list[list[float]]] = {"vis_score": [[], []], "vis_entropy": [[], []]}
        for layer in imp.eligible_layers(graph):
            clusters = imp.layer_clusters(graph, labels, layer)
            sets = list(clusters.values())[:budget]
            if not sets or graph.z_modules[layer] is None:
                continue
            z_module = model.get_submodule(graph.z_modules[layer])
            candidates = torch.as_tensor(np.flatnonzero(~graph.isolated[graph.layer_slice(layer)]))
            layer_rows, _ = featvis.vis_coherence(
                model, z_module, sets, int(graph.layer_sizes[layer]), candidates, n_random=self.config.vis.n_random,
                seed=self.config.seed + layer, min_size=self.config.vis.min_size, max_frac=self.config.vis.max_prop,
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
                                               preprocess=prep, seed=self.config.seed, **kwargs)
                grid += [(f"{graph.layer_names[layer]} #{r['set_index']}", img) for r, img in zip(
                    layer_rows[:4], images, strict=True)]
            if budget <= 0:
                break
        if grid:
            details["vis_grids"][partition] = grid
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
            fisher = spec.fisher_combine(p, n_random=self.config.lesion.n_random)
            out.update(fisher_p=float(fisher.pvalue), fisher_stat=float(fisher.fisher_stat))
        effect, sem = spec.mean_sem(effects, scale=effect_scale)
        if np.isfinite(effect):
            out["effect"] = effect
            if np.isfinite(sem):
                out["effect_sem"] = sem
        return out

    def _act_subset(self, data: Data):
        """The class-balanced training images behind the activation graph (and dataset coherence)."""
        return data.class_subset(max(1, -(-self.config.act_samples // data.num_classes)), self.config.seed)

    def _activation_graph(self, model: nn.Module, graph: spec.WeightGraph, data: Data, device: torch.device):
        loader = data.loader(self._act_subset(data))
        return spec.activation_graph(model, loader, graph, max_samples=self.config.act_samples, corr=self.config.corr,
                                     act_reduction=self.config.act_reduction, device=device)

    @staticmethod
    def _cluster_sizes(labels: np.ndarray, node_layer: np.ndarray, n_layers: int) -> list[list[int]]:
        k = int(labels.max()) + 1 if (labels >= 0).any() else 0
        sizes = np.zeros((n_layers, k), dtype=int)
        kept = labels >= 0
        np.add.at(sizes, (node_layer[kept], labels[kept]), 1)
        return sizes.tolist()

    def report(self, result: Result, out_dir, *, final: bool = True, history: list[dict] | None = None):
        from featurelens.analysis.specialization.report import report

        return report(result, out_dir, self.config, final=final, history=history or [result.record()])

    @staticmethod
    def tables(jobs, grouped_by, out: Path) -> list[Path]:
        from featurelens.analysis.specialization.report import tables

        return tables(jobs, grouped_by, out)
