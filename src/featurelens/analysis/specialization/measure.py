"""Local specialization and clusterability: graphs, spectral partitions, n-cut and shuffles.

Spec: ``shared/spec/specialization.md`` ([CL] Filan et al. 2103.03386, [LS] Hod et al. 2110.08058).  This
module is the *foundation layer*: everything needed to partition a network's units and to measure its
clusterability.  Lesion tests, coherence and feature visualisation (spec §2.6 effects, §2.7) build on it
elsewhere.

Contents
--------
* **Weight graph** (§2.1, §2.2) -- :func:`weight_graph` traces the model with :mod:`torch.fx` and builds the
  block-upper matrix ``Y`` of reduced edge blocks ``B^{l->l'}``; ``A = Y + Y^T`` (scipy CSR, float64).

  - MLP (no conv module): nodes are the input features, every ``nn.Linear`` output unit (hidden and logits);
    ``B_ij = |W_ji|``.
  - CNN: nodes are the output channels of every conv module in forward order; the image input and the
    Linear layers are excluded.  Kernels reduce to channel-to-channel weights with ``conv_norm`` ``"l1"``
    (entrywise sum, default) or ``"induced_l1"`` (largest column abs-sum, the reference), see
    :func:`kernel_edge_weights`.  Grouped convs only connect channels of the same group.
  - BN folding (§2.2): a BN reached from a conv/linear through pass-through ops only (identity, dropout,
    flatten, view) is folded into the kernel (scales node ``j``'s *incoming* edges by ``|s_j|``); a BN after a
    nonlinearity or pooling scales node ``j``'s *outgoing* edges by ``|s_j|``.  ``fold_bn=False`` ignores BN.
  - Connectivity: a block ``a -> b`` exists iff a path from ``a`` to ``b`` crosses no other conv/linear.
    ReLU, BN, pooling, dropout, flatten and residual ``+`` are pass-through, so in a torchvision ResNet one
    channel feeds every conv reachable through identity paths, and 1x1 ``downsample`` convs are node groups
    of their own that cut those paths.  ``torch.cat`` along dim 1 offsets channel indices.
* **Spectral clustering** (§2.4) -- :func:`spectral_partition`: scikit-learn ``SpectralClustering`` with
  ``affinity="precomputed"``, ``eigen_solver="arpack"``, ``assign_labels="kmeans"``,
  ``n_init = 100 if n > 2000 else 25`` (:func:`default_n_init`); degree-0 nodes are removed first and get
  label ``-1``.  :func:`local_partition` gives the [LS] per-layer partition of a weight graph.
* **n-cut** (§2.5) -- :func:`ncut`: ``sum_c cut(C)/(vol(C) + 1e-8)``; :func:`ave_in_out`.
* **Shuffles** (§2.5) -- :func:`shuffle_blocks` / :func:`shuffle_graph` with ``"layer"`` (every reduced block
  permuted, zeros included) or ``"layer_nonzero"`` (nonzeros only, keeps pruning masks);
  :func:`clusterability` returns ncut, shuffled mean/std (ddof 0), z and the conservative percentile.
  All randomness comes from children of one :class:`numpy.random.SeedSequence` (§2.4, project reading):
  child 0 seeds the clustering of the true graph, child ``1 + s`` shuffle ``s`` (its permutation generator
  and, through ``generate_state``, the clustering's ``random_state``).
* **Activation graph** (§2.3) -- :class:`ActivationCorrelation` (a :class:`torchmetrics.Metric`) streams
  ``(B, U)`` unit values (or ``(B, U, H, W)`` maps, reduced on the fly with ``act_reduction``) into a
  buffer capped at ``max_samples`` rows (spec: N = 5,000 probe images, §8 memory note: ``N x U`` fp32, the
  feature maps are never stored) and computes the squared rank correlation ``r^2`` (Spearman: average ranks
  for ties, then Pearson of the ranks, via one ``U x U`` matmul).  :func:`activation_graph` hooks the ``z``
  module of every unit group (the BN folded into a conv, else the conv/linear itself) and runs the probe data.
* **Statistics helpers** (§2.5, §2.6) -- :func:`percentile_left` / :func:`percentile_right` (ties
  counted against significance), :func:`fisher_combine` (``scipy.stats.combine_pvalues``
  with the optional discrete centring shift), :func:`bates_cdf`, :func:`benjamini_hochberg`
  (``scipy.stats.false_discovery_control``; nothing significant -> ``p_crit = 0``).

This module is plain torch / numpy / scipy / scikit-learn and never imports Lightning.
"""

from __future__ import annotations

import math
import operator
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np
import scipy.sparse as sp
import scipy.stats
import torch
import torch.fx
from sklearn.cluster import SpectralClustering
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from featurelens.analysis.hooks import eval_mode, record_outputs

__all__ = [
    "ConvNorm",
    "ShuffleMethod",
    "WeightGraph",
    "kernel_edge_weights",
    "bn_scale",
    "fold_bn_into_conv",
    "weight_graph",
    "default_n_init",
    "seed_sequence_ints",
    "spectral_partition",
    "local_partition",
    "ncut",
    "ave_in_out",
    "shuffle_blocks",
    "shuffle_graph",
    "clusterability",
    "reduce_activations",
    "rank_correlation_squared",
    "ActivationCorrelation",
    "ActivationGraph",
    "activation_clusterability",
    "activation_graph",
    "mean_sem",
    "percentile_left",
    "percentile_right",
    "FisherResult",
    "fisher_combine",
    "bates_cdf",
    "benjamini_hochberg",
]

ConvNorm = Literal["l1", "induced_l1"]
ShuffleMethod = Literal["layer", "layer_nonzero"]
ActReduction = Literal["mean_abs", "reference"]
Corr = Literal["spearman", "pearson", "kendall"]

#: Added to every cluster volume in the n-cut (spec §2.5).
NCUT_EPS = 1e-8
#: Name of the input node group of MLP weight graphs.
INPUT_LAYER = "input"

# --------------------------------------------------------------------------------------------------------------
# Edge weights of one layer (§2.2)
# --------------------------------------------------------------------------------------------------------------


def kernel_edge_weights(weight: Tensor, groups: int = 1, conv_norm: ConvNorm = "l1") -> np.ndarray:
    """Reduce a Linear/conv weight to its edge block ``B`` of shape ``(C_in, C_out)`` (spec §2.2).

    ``weight`` is a PyTorch Linear weight ``(out, in)`` (``B_ij = |W_ji|``) or a conv weight
    ``(C_out, C_in/groups, *kernel)``.  For convs, ``conv_norm="l1"`` gives ``B_ij = sum_{a,b} |K_jiab|`` and
    ``"induced_l1"`` (2-D kernels only) gives ``B_ij = max_b sum_a |K_jiab|``; both agree on 1x1 kernels.
    Channels of different groups are not connected (``B_ij = 0``).  Returned as float64.
    """
    w = weight.detach().to("cpu", torch.float64).abs()
    if w.ndim == 2:
        return w.T.contiguous().numpy()
    if conv_norm == "l1":
        red = w.flatten(2).sum(-1)
    elif conv_norm == "induced_l1":
        if w.ndim != 4:
            raise ValueError(f"conv_norm='induced_l1' needs 2-D kernels, got weight of shape {tuple(w.shape)}")
        red = w.sum(-2).amax(-1)
    else:
        raise ValueError(f"unknown conv_norm {conv_norm!r} (expected 'l1' or 'induced_l1')")
    c_out, c_in_g = red.shape
    if groups == 1:
        return red.T.contiguous().numpy()
    out_g = c_out // groups
    block = np.zeros((c_in_g * groups, c_out))
    red_np = red.numpy()
    for g in range(groups):
        block[g * c_in_g:(g + 1) * c_in_g, g * out_g:(g + 1) * out_g] = red_np[g * out_g:(g + 1) * out_g].T
    return block


def bn_scale(bn: nn.modules.batchnorm._BatchNorm) -> Tensor:
    """The per-channel BN scale ``s_j = gamma_j / sqrt(running_var_j + eps)`` (module's own ``eps``, §2.2)."""
    if bn.running_var is None:
        raise ValueError("BN without running statistics cannot be folded")
    s = 1.0 / torch.sqrt(bn.running_var.detach().double() + bn.eps)
    return s * bn.weight.detach().double() if bn.weight is not None else s


def fold_bn_into_conv(conv: nn.Conv2d | nn.Linear, bn: nn.modules.batchnorm._BatchNorm) -> tuple[Tensor, Tensor]:
    """Return ``(K~, b~)`` such that ``conv(x; K~, b~) == bn(conv(x))`` in eval mode (§2.2, BN folding).

    ``K~_j = s_j K_j`` and ``b~_j = s_j (b_j - mu_j) + beta_j``; the graph only uses ``|K~|``.
    """
    s = bn_scale(bn).to(conv.weight.dtype)
    w = conv.weight.detach() * s.view(-1, *([1] * (conv.weight.ndim - 1)))
    b = conv.bias.detach() if conv.bias is not None else torch.zeros_like(s)
    beta = bn.bias.detach() if bn.bias is not None else torch.zeros_like(s)
    return w, s * (b - bn.running_mean.detach().to(s.dtype)) + beta


# --------------------------------------------------------------------------------------------------------------
# Weight graph (§2.1, §2.2)
# --------------------------------------------------------------------------------------------------------------


@dataclass
class WeightGraph:
    """A weight graph: node groups (layers) in forward order and the reduced edge blocks between them.

    Attributes:
        adjacency: ``A = Y + Y^T`` as a symmetric, non-negative ``scipy.sparse`` CSR float64 matrix, zero diagonal.
        layer_names: module name per node group (``"input"`` for the MLP input features).
        layer_sizes: number of nodes per group; node ids are consecutive within a group, groups in order.
        blocks: ``{(l, l'): B}`` with ``B`` of shape ``(n_l, n_l')`` (dense float64), one per connected pair.
        kind: ``"mlp"`` or ``"cnn"``.
        z_modules: per group, the module whose output is the unit value ``z`` of §2.3 (the BN folded into the
            conv/linear, else the layer itself; ``None`` for the input group).
    """

    adjacency: sp.csr_matrix
    layer_names: list[str]
    layer_sizes: np.ndarray
    blocks: dict[tuple[int, int], np.ndarray]
    kind: str = "cnn"
    z_modules: list[str | None] = field(default_factory=list)

    @classmethod
    def from_blocks(cls, blocks: Mapping[tuple[int, int], np.ndarray], layer_sizes: Sequence[int],
                    layer_names: Sequence[str] | None = None, **kw: Any) -> WeightGraph:
        """Assemble ``A = Y + Y^T`` from the upper blocks (spec §2.2)."""
        sizes = np.asarray(layer_sizes, dtype=np.int64)
        names = list(layer_names) if layer_names is not None else [f"layer{i}" for i in range(len(sizes))]
        return cls(_assemble(blocks, sizes), names, sizes, dict(blocks), **kw)

    def with_blocks(self, blocks: Mapping[tuple[int, int], np.ndarray]) -> WeightGraph:
        """The same node set with new edge blocks (used by the shuffles)."""
        return replace(self, adjacency=_assemble(blocks, self.layer_sizes), blocks=dict(blocks))

    @property
    def n(self) -> int:
        return int(self.layer_sizes.sum())

    @property
    def offsets(self) -> np.ndarray:
        """First node id of every group (length ``n_layers + 1``)."""
        return np.concatenate([[0], np.cumsum(self.layer_sizes)])

    @property
    def node_layer(self) -> np.ndarray:
        return np.repeat(np.arange(len(self.layer_sizes)), self.layer_sizes)

    @property
    def node_channel(self) -> np.ndarray:
        return np.concatenate([np.arange(s) for s in self.layer_sizes]) if len(self.layer_sizes) else np.zeros(0, int)

    @property
    def degree(self) -> np.ndarray:
        return np.asarray(self.adjacency.sum(axis=1)).ravel()

    @property
    def isolated(self) -> np.ndarray:
        return self.degree <= 0

    def node_table(self) -> dict[str, np.ndarray]:
        """Columns of ``nodes.parquet`` (§3): node_id, module, channel, layer, degree, isolated."""
        layer = self.node_layer
        return {"node_id": np.arange(self.n), "module": np.asarray(self.layer_names, dtype=object)[layer],
                "channel": self.node_channel, "layer": layer, "degree": self.degree, "isolated": self.isolated}

    def layer_slice(self, layer: int) -> slice:
        off = self.offsets
        return slice(int(off[layer]), int(off[layer + 1]))


def _assemble(blocks: Mapping[tuple[int, int], np.ndarray], sizes: np.ndarray) -> sp.csr_matrix:
    off = np.concatenate([[0], np.cumsum(sizes)])
    n = int(off[-1])
    rows, cols, vals = [], [], []
    for (a, b), blk in blocks.items():
        if a == b:
            raise ValueError(f"self-block ({a}, {a}) is not allowed: groups are distinct layers")
        blk = np.asarray(blk, dtype=np.float64)
        if blk.shape != (sizes[a], sizes[b]):
            raise ValueError(f"block {(a, b)} has shape {blk.shape}, expected {(int(sizes[a]), int(sizes[b]))}")
        if (blk < 0).any():
            raise ValueError(f"block {(a, b)} has negative weights")
        i, j = np.nonzero(blk)
        rows.append(i + off[a])
        cols.append(j + off[b])
        vals.append(blk[i, j])
    if rows:
        r, c, v = np.concatenate(rows), np.concatenate(cols), np.concatenate(vals)
    else:
        r = c = np.zeros(0, np.int64)
        v = np.zeros(0)
    y = sp.coo_matrix((v, (r, c)), shape=(n, n)).tocsr()
    a = (y + y.T).tocsr()
    a.eliminate_zeros()
    return a


@dataclass(frozen=True)
class _Seg:
    """Provenance of a run of channels of a traced tensor: ``length`` channels starting at tensor channel
    ``offset`` are channels ``lo..lo+length-1`` of node group ``group``; ``linear`` is true while only
    pass-through linear ops (identity, dropout, flatten, view) separate them from their producer; ``scale``
    multiplies their outgoing edges (BN after a nonlinearity)."""

    group: int
    offset: int
    lo: int
    length: int | None
    linear: bool = True
    scale: np.ndarray | None = None


_KEEP_LINEAR_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
                        nn.Flatten)
_KEEP_LINEAR_FUNCS = {torch.flatten, torch.reshape, nn.functional.dropout, nn.functional.dropout2d}
_KEEP_LINEAR_METHODS = {"view", "reshape", "flatten", "contiguous", "clone", "to", "float"}
_ADD_FUNCS = {operator.add, operator.iadd, torch.add}
_NO_PROVENANCE_METHODS = {"size", "dim", "numel"}
_FORBIDDEN_FUNCS = {nn.functional.linear, nn.functional.conv1d, nn.functional.conv2d, nn.functional.conv3d}


class _GraphBuilder:
    def __init__(self, model: nn.Module, kind: str, conv_norm: ConvNorm, fold_bn: bool):
        self.model, self.kind, self.conv_norm, self.fold_bn = model, kind, conv_norm, fold_bn
        self.names: list[str] = []
        self.sizes: list[int] = []
        self.z_modules: list[str | None] = []
        self.group_of: dict[str, int] = {}
        self.blocks: dict[tuple[int, int], np.ndarray] = {}
        self.fold: dict[int, np.ndarray] = {}
        self.input_group: int | None = None

    def _new_group(self, name: str, size: int, z_module: str | None) -> int:
        self.names.append(name)
        self.sizes.append(size)
        self.z_modules.append(z_module)
        return len(self.names) - 1

    def run(self) -> WeightGraph:
        try:
            gm = torch.fx.symbolic_trace(self.model)
        except Exception as exc:  # noqa: BLE001 - re-raised with context
            raise ValueError(f"weight_graph needs a torch.fx-traceable model: {exc}") from exc
        env: dict[torch.fx.Node, list[_Seg] | None] = {}
        if self.kind == "mlp":
            self.input_group = self._new_group(INPUT_LAYER, 0, None)
        for node in gm.graph.nodes:
            env[node] = self._visit(gm, node, env)
        sizes = np.asarray(self.sizes, dtype=np.int64)
        blocks = {}
        for (a, b), blk in self.blocks.items():
            if blk.shape[0] < sizes[a]:
                blk = np.vstack([blk, np.zeros((sizes[a] - blk.shape[0], blk.shape[1]))])
            if b in self.fold:
                blk = blk * np.abs(self.fold[b])[None, :]
            blocks[(a, b)] = blk
        return WeightGraph.from_blocks(blocks, sizes, self.names, kind=self.kind, z_modules=self.z_modules)

    # -- node visitors -----------------------------------------------------------------------------------------
    def _visit(self, gm: torch.fx.GraphModule, node: torch.fx.Node, env) -> list[_Seg] | None:
        if node.op == "placeholder":
            if self.input_group is None or node.name != next(iter(gm.graph.nodes)).name:
                return []
            return [_Seg(self.input_group, 0, 0, None)]
        if node.op in ("get_attr", "output"):
            return None
        ins = [env.get(a) for a in node.all_input_nodes]
        first = next((p for p in (env.get(a) for a in _flat_args(node.args)) if p is not None), None)
        if node.op == "call_module":
            mod = gm.get_submodule(node.target)
            if isinstance(mod, nn.modules.conv._ConvNd) or isinstance(mod, nn.Linear):
                return self._weighted(node.target, mod, first or [])
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                return self._batchnorm(node.target, mod, first or []) if self.fold_bn else first
            keep = isinstance(mod, _KEEP_LINEAR_MODULES)
            return _mark(first, keep)
        if node.op == "call_function":
            if node.target in _FORBIDDEN_FUNCS:
                raise NotImplementedError(f"functional {node.target.__name__} is not supported; use modules")
            if node.target in _ADD_FUNCS:
                return _mark([s for p in ins if p for s in p], False)
            if node.target in (torch.cat, torch.concat):
                return self._cat(node, env)
            if node.target is getattr:
                return None
            return _mark(first, node.target in _KEEP_LINEAR_FUNCS)
        if node.op == "call_method":
            if node.target in _NO_PROVENANCE_METHODS:
                return None
            if node.target in ("add", "add_"):
                return _mark([s for p in ins if p for s in p], False)
            return _mark(first, node.target in _KEEP_LINEAR_METHODS)
        return first

    def _weighted(self, name: str, mod: nn.Module, segs: list[_Seg]) -> list[_Seg]:
        is_conv = isinstance(mod, nn.modules.conv._ConvNd)
        if is_conv and mod.transposed:
            raise NotImplementedError(f"transposed conv {name} is not supported")
        if self.kind == "cnn" and not is_conv:
            return []  # Linear layers are not nodes of a CNN graph and cut every path (§2.1)
        if self.kind == "mlp" and is_conv:
            raise ValueError("an MLP weight graph cannot contain conv layers")
        if name in self.group_of:
            g = self.group_of[name]
        else:
            g = self._new_group(name, mod.weight.shape[0], name)
            self.group_of[name] = g
        full = kernel_edge_weights(mod.weight, getattr(mod, "groups", 1), self.conv_norm)
        for s in segs:
            length = s.length if s.length is not None else full.shape[0] - s.offset
            rows = full[s.offset:s.offset + length]
            if s.scale is not None:
                rows = rows * np.abs(s.scale)[:, None]
            need = s.lo + length
            if s.group == self.input_group:
                self.sizes[s.group] = max(self.sizes[s.group], need)
            blk = self.blocks.get((s.group, g))
            if blk is None or blk.shape[0] < need:
                grown = np.zeros((max(need, self.sizes[s.group]), full.shape[1]))
                if blk is not None:
                    grown[: blk.shape[0]] = blk
                blk = self.blocks[(s.group, g)] = grown
            blk[s.lo:need] += rows
        return [_Seg(g, 0, 0, mod.weight.shape[0])]

    def _batchnorm(self, name: str, bn: nn.modules.batchnorm._BatchNorm, segs: list[_Seg]) -> list[_Seg]:
        if bn.running_var is None:
            return _mark(segs, False)
        s_all = bn_scale(bn).numpy()
        out = []
        for s in segs:
            length = s.length if s.length is not None else len(s_all) - s.offset
            sc = s_all[s.offset:s.offset + length]
            if s.linear and s.group != self.input_group:
                f = self.fold.setdefault(s.group, np.ones(self.sizes[s.group]))
                f[s.lo:s.lo + length] *= sc
                self.z_modules[s.group] = name
                out.append(s)
            else:
                scale = sc if s.scale is None else s.scale * sc
                out.append(replace(s, length=length, scale=scale))
        return out

    def _cat(self, node: torch.fx.Node, env) -> list[_Seg] | None:
        tensors = node.args[0]
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        provs = [env.get(t) for t in tensors]
        if dim != 1:
            return _mark([s for p in provs if p for s in p], False)
        out, offset = [], 0
        for p in provs:
            if not p:
                raise NotImplementedError("torch.cat of a tensor with unknown channel count (e.g. the image input)")
            for s in p:
                if s.length is None:
                    raise NotImplementedError("torch.cat of a tensor with unknown channel count")
                out.append(replace(s, offset=s.offset + offset, linear=False))
            offset += max(s.offset + s.length for s in p)
        return out


def _flat_args(args: Any) -> list[torch.fx.Node]:
    out: list[torch.fx.Node] = []
    for a in args:
        if isinstance(a, torch.fx.Node):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            out.extend(_flat_args(a))
    return out


def _mark(segs: list[_Seg] | None, keep_linear: bool) -> list[_Seg] | None:
    if segs is None or keep_linear:
        return segs
    return [replace(s, linear=False) if s.linear else s for s in segs]


def weight_graph(model: nn.Module, *, conv_norm: ConvNorm = "l1", fold_bn: bool = True,
                 kind: Literal["auto", "mlp", "cnn"] = "auto") -> WeightGraph:
    """Build the weight graph of ``model`` (spec §2.1, §2.2).

    Args:
        model: any :mod:`torch.fx`-traceable module built from ``nn.Linear`` / ``nn.Conv*d`` / BN modules
            (functional ``F.linear``/``F.conv*`` are rejected).  Its weights are read, never modified.
        conv_norm: kernel reduction, ``"l1"`` (default) or ``"induced_l1"`` (the reference's).
        fold_bn: fold BN scales into the edges (project default); ``False`` reproduces the CIFAR reference.
        kind: ``"mlp"`` (input features + every Linear unit) or ``"cnn"`` (conv output channels only);
            ``"auto"`` picks ``"cnn"`` iff the model has a conv module.

    Returns:
        A :class:`WeightGraph` with groups in forward (trace) order.
    """
    if kind == "auto":
        kind = "cnn" if any(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules()) else "mlp"
    if kind not in ("mlp", "cnn"):
        raise ValueError(f"kind must be 'auto', 'mlp' or 'cnn', got {kind!r}")
    return _GraphBuilder(model, kind, conv_norm, fold_bn).run()


# --------------------------------------------------------------------------------------------------------------
# Spectral clustering (§2.4) and n-cut (§2.5)
# --------------------------------------------------------------------------------------------------------------


def default_n_init(n: int) -> int:
    """k-means restarts of spec §2.4: 100 if ``n > 2000`` else 25."""
    return 100 if n > 2000 else 25


def seed_sequence_ints(seed: int | np.random.SeedSequence, n: int) -> list[int]:
    """``n`` independent 31-bit integer seeds from children of one ``SeedSequence`` (§2.4, project reading)."""
    ss = seed if isinstance(seed, np.random.SeedSequence) else np.random.SeedSequence(seed)
    return [_child_int(c) for c in ss.spawn(n)]


def _child_int(ss: np.random.SeedSequence) -> int:
    return int(ss.generate_state(1, dtype=np.uint32)[0] >> 1)


def _as_csr(adjacency: Any) -> sp.csr_matrix:
    if isinstance(adjacency, WeightGraph):
        adjacency = adjacency.adjacency
    if isinstance(adjacency, Tensor):
        adjacency = adjacency.detach().cpu().double().numpy()
    a = sp.csr_matrix(adjacency, dtype=np.float64)
    if a.shape[0] != a.shape[1]:
        raise ValueError(f"adjacency must be square, got {a.shape}")
    return a


_DENSE_FRACTION = 0.05  # graphs denser than this are clustered as dense arrays
_LOBPCG_NODES = 20_000  # larger graphs use the lobpcg eigensolver (spec §4)


def spectral_partition(adjacency: Any, k: int, seed: int = 0, n_init: int | None = None) -> np.ndarray:
    """Spectral clustering of a symmetric non-negative affinity matrix (spec §2.4).

    Degree-0 nodes are removed first and get label ``-1``; the remaining graph is clustered by
    ``SpectralClustering(n_clusters=k, affinity="precomputed", eigen_solver="arpack", assign_labels="kmeans",
    n_init=n_init, random_state=seed)``, all else default; graphs above 20,000 nodes use ``eigen_solver="lobpcg"``
    (spec §4), and graphs with more than 5% of all pairs as edges are passed as dense arrays.  ``n_init``
    defaults to :func:`default_n_init` of the full node count.  sklearn's "graph is not fully connected" warning
    is silenced (disconnected graphs are expected, e.g. planted modules); callers log ``n_isolated`` /
    ``largest_cluster_frac`` instead.

    Returns:
        int64 labels of length ``n`` in ``{-1, 0..k-1}``.
    """
    a = _as_csr(adjacency)
    n = a.shape[0]
    if a.nnz:
        if abs(a - a.T).max() > 1e-10 * max(1.0, abs(a).max()):
            raise ValueError("adjacency must be symmetric")
        if a.data.min() < 0:
            raise ValueError("adjacency must be non-negative")
    keep = np.asarray(a.sum(axis=1)).ravel() > 0
    n_keep = int(keep.sum())
    if not 1 <= k < n_keep:
        raise ValueError(f"need 1 <= k < number of non-isolated nodes, got k={k} with {n_keep} nodes")
    sub = a[keep][:, keep]
    solver = "arpack"
    if n_keep > _LOBPCG_NODES:
        # spec §4: lobpcg for n > 20k (ResNet-50: 26,560 channels, 79 M edges): no factorisation at all
        solver = "lobpcg"
    elif sub.nnz > _DENSE_FRACTION * n_keep**2:
        # ARPACK's shift-invert factorises the Laplacian: a sparse LU of a dense-ish graph (a ResNet's
        # 4,800 channels hold ~21% of all pairs) fills in and runs out of memory, a dense LU does not.
        sub = sub.toarray()
    sc = SpectralClustering(n_clusters=k, affinity="precomputed", eigen_solver=solver, assign_labels="kmeans",
                            n_init=default_n_init(n) if n_init is None else n_init, random_state=int(seed))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Graph is not fully connected")
        sub_labels = sc.fit_predict(sub)
    labels = np.full(n, -1, dtype=np.int64)
    labels[keep] = sub_labels
    return labels


def ncut(adjacency: Any, labels: Sequence[int] | np.ndarray) -> float:
    """Normalized cut ``sum_c cut(C_c) / (vol(C_c) + 1e-8)`` (spec §2.5); nodes labelled ``-1`` are dropped.

    ``cut(C) = sum_{i in C, j not in C} A_ij`` and ``vol(C) = sum_{i in C} d_i`` on the graph restricted to
    labelled nodes.  Lies in ``[0, k]``; lower is more clusterable.
    """
    a = _as_csr(adjacency)
    labels = np.asarray(labels)
    if labels.shape != (a.shape[0],):
        raise ValueError(f"labels must have shape ({a.shape[0]},), got {labels.shape}")
    keep = labels >= 0
    a = a[keep][:, keep]
    _, lab = np.unique(labels[keep], return_inverse=True)
    k = int(lab.max()) + 1 if lab.size else 0
    m = sp.csr_matrix((np.ones(lab.size), (np.arange(lab.size), lab)), shape=(lab.size, k))
    within = np.asarray((m.T @ a @ m).diagonal()).ravel()
    vol = np.asarray(m.T @ np.asarray(a.sum(axis=1)).ravel()).ravel()
    return float(np.sum((vol - within) / (vol + NCUT_EPS)))


def ave_in_out(ncut_value: float, k: int) -> float:
    """``(1 - ncut/k) / (2 ncut/k)`` (spec §2.5): mean within- over between-cluster weight; ``inf`` at ncut 0."""
    x = ncut_value / k
    return math.inf if x == 0 else (1.0 - x) / (2.0 * x)


def local_partition(graph: WeightGraph, labels: np.ndarray, seed: int | np.random.SeedSequence = 0,
                    n_init: int | None = None) -> np.ndarray:
    """The [LS] local partition of a weight graph from its global ``labels`` (spec §2.4, "Local partitions").

    For each layer ``l`` the subgraph induced by layers ``l-1, l, l+1`` is clustered into ``k_l`` clusters,
    ``k_l`` = number of distinct global labels in ``l`` (its own labels, project reading), and ``l``'s labels are
    kept; the first and last layers take theirs from the first and last subgraph.  ``k_l = 1`` leaves the layer
    one cluster.  Isolated nodes (of the whole graph or of the subgraph) keep label ``-1``.
    """
    labels = np.asarray(labels)
    n_layers = len(graph.layer_sizes)
    seeds = seed_sequence_ints(seed, n_layers)
    off = graph.offsets
    out = np.full(graph.n, -1, dtype=np.int64)
    for layer in range(n_layers):
        centre = min(max(layer, 1), n_layers - 2) if n_layers >= 3 else 0
        lo_l, hi_l = max(centre - 1, 0), min(centre + 1, n_layers - 1)
        idx = np.arange(off[lo_l], off[hi_l + 1])
        own = graph.layer_slice(layer)
        own_labels = labels[own]
        k_l = len(np.unique(own_labels[own_labels >= 0]))
        if k_l <= 1:
            out[own] = np.where(own_labels >= 0, 0, -1)
            continue
        sub = graph.adjacency[idx][:, idx]
        sub_labels = spectral_partition(sub, k_l, seeds[layer], n_init=n_init)
        out[own] = sub_labels[own.start - idx[0]:own.stop - idx[0]]
    return out


# --------------------------------------------------------------------------------------------------------------
# Shuffles and clusterability (§2.5)
# --------------------------------------------------------------------------------------------------------------


def shuffle_blocks(blocks: Mapping[tuple[int, int], np.ndarray], method: ShuffleMethod = "layer",
                   rng: np.random.Generator | int | None = None) -> dict[tuple[int, int], np.ndarray]:
    """Permute the entries of every reduced edge block independently (spec §2.5).

    ``"layer"`` permutes all entries, zeros included; ``"layer_nonzero"`` permutes only the nonzeros among
    themselves, so the zero pattern (e.g. a pruning mask or the grouped-conv structure) is kept.  Each block
    keeps its multiset of values.
    """
    rng = np.random.default_rng(rng)
    out = {}
    for key, blk in blocks.items():
        flat = np.array(blk, dtype=np.float64).ravel()
        if method == "layer":
            flat = rng.permutation(flat)
        elif method == "layer_nonzero":
            nz = np.flatnonzero(flat)
            flat[nz] = rng.permutation(flat[nz])
        else:
            raise ValueError(f"unknown shuffle method {method!r} (expected 'layer' or 'layer_nonzero')")
        out[key] = flat.reshape(np.shape(blk))
    return out


def shuffle_graph(graph: WeightGraph, method: ShuffleMethod = "layer",
                  rng: np.random.Generator | int | None = None) -> WeightGraph:
    """A shuffled copy of ``graph``: :func:`shuffle_blocks` then ``A`` rebuilt (isolated nodes are removed
    later, by :func:`spectral_partition`)."""
    return graph.with_blocks(shuffle_blocks(graph.blocks, method, rng))


def _shuffle_ncut(child: np.random.SeedSequence, graph: WeightGraph, k: int, method: str,
                  n_init: int | None) -> float:
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        g = shuffle_graph(graph, method, np.random.default_rng(child))
        return ncut(g.adjacency, spectral_partition(g.adjacency, k, _child_int(child), n_init))


def clusterability(model_or_graph: nn.Module | WeightGraph, k: int = 12, n_shuffles: int = 50, seed: int = 0,
                   *, shuffle_method: ShuffleMethod = "layer", n_init: int | None = None, n_jobs: int = 1,
                   n_cluster_seeds: int = 1, **graph_kwargs: Any) -> dict[str, Any]:
    """n-cut of the spectral partition against shuffled networks (spec §2.5, [CL]).

    Args:
        model_or_graph: a model (its :func:`weight_graph` is built with ``graph_kwargs``) or a built graph.
        k: clusters (12 in [CL]).
        n_shuffles: shuffled networks (50; 10 in the callback; 100 for ImageNet).
        seed: run seed; ``SeedSequence(seed).spawn(1 + n_shuffles)`` gives the true clustering (child 0) and
            each shuffle ``s`` (child ``1 + s``: permutation generator and clustering ``random_state``).
        shuffle_method: ``"layer"`` or ``"layer_nonzero"``.
        n_init: k-means restarts (default :func:`default_n_init`).
        n_jobs: joblib processes for the shuffles (BLAS threads limited to 1 in each).
        n_cluster_seeds: clusterings of the true graph (child 0, then children ``1 + n_shuffles + i``); the one
            with the lowest n-cut is kept (``labels``, ``ncut``, ``ncut_z``, ``seed``), and the spread over seeds
            is reported (``ncut_seeds``, ``ncut_seed_mean``/``_std``, ``ncut_z_seed_mean``/``_std``; ddof 0).
            One clustering seed can move z by about one shuffle std (issue 11); the shuffles are not repeated.

    Returns:
        dict with ``ncut``, ``ncut_shuffled_mean``, ``ncut_shuffled_std`` (ddof 0), ``ncut_z`` (NaN if the
        std is 0), ``ncut_percentile`` = ``(1 + #{s: ncut_s < ncut}) / (n_shuffles + 1)``, ``ave_in_out``,
        ``n_isolated``, ``largest_cluster_frac`` (among labelled nodes), ``labels``, ``shuffled_ncuts``,
        ``seed`` (the true clustering's random_state) and ``shuffle_seeds``.
    """
    graph = model_or_graph if isinstance(model_or_graph, WeightGraph) else weight_graph(model_or_graph, **graph_kwargs)
    return _against_shuffles(graph.adjacency, k, n_shuffles, seed, n_init, n_jobs, n_cluster_seeds,
                             _shuffle_ncut, graph, k, shuffle_method, n_init)


def _permuted_columns_ncut(child: np.random.SeedSequence, samples: np.ndarray, k: int, corr: Corr,
                           n_init: int | None) -> float:
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(child)
    shuffled = np.stack([rng.permutation(col) for col in samples.T], axis=1)
    with threadpool_limits(1):
        a = rank_correlation_squared(shuffled, corr).numpy()
        return ncut(a, spectral_partition(a, k, _child_int(child), n_init))


def activation_clusterability(adjacency: np.ndarray, samples: np.ndarray, k: int = 12, n_shuffles: int = 10,
                              seed: int = 0, *, corr: Corr = "spearman", n_init: int | None = None,
                              n_jobs: int = 1, n_cluster_seeds: int = 1) -> dict[str, Any]:
    """n-cut of the activation graph's spectral partition against shuffled activations (project reading).

    The shuffle baseline permutes each unit's column of the ``(N, U)`` ``samples`` independently over the
    images: every unit keeps its distribution of values, co-activation is destroyed, and the r² graph of the
    shuffled samples (same ``corr``) is clustered with the same ``k``. Seeds, best-of-``n_cluster_seeds`` and
    the returned dict as in :func:`clusterability`.
    """
    samples = np.asarray(samples, dtype=np.float64)
    return _against_shuffles(np.asarray(adjacency), k, n_shuffles, seed, n_init, n_jobs, n_cluster_seeds,
                             _permuted_columns_ncut, samples, k, corr, n_init)


def _against_shuffles(adjacency: Any, k: int, n_shuffles: int, seed: int, n_init: int | None, n_jobs: int,
                      n_cluster_seeds: int, shuffled_ncut: Any, *args: Any) -> dict[str, Any]:
    """The true partition(s) of ``adjacency`` against ``shuffled_ncut(child, *args)``, one per shuffle child."""
    if n_cluster_seeds < 1:
        raise ValueError(f"n_cluster_seeds must be >= 1, got {n_cluster_seeds}")
    children = np.random.SeedSequence(seed).spawn(n_shuffles + n_cluster_seeds)
    true_seeds = [_child_int(c) for c in (children[0], *children[1 + n_shuffles:])]
    partitions = [spectral_partition(adjacency, k, s, n_init) for s in true_seeds]
    values = np.asarray([ncut(adjacency, lab) for lab in partitions])
    best = int(np.argmin(values))
    labels, value, true_seed = partitions[best], float(values[best]), true_seeds[best]
    children = children[:1 + n_shuffles]
    if n_jobs == 1 or n_shuffles <= 1:
        shuffled = [shuffled_ncut(c, *args) for c in children[1:]]
    else:
        from joblib import Parallel, delayed

        shuffled = Parallel(n_jobs=n_jobs)(delayed(shuffled_ncut)(c, *args) for c in children[1:])
    shuffled = np.asarray(shuffled, dtype=np.float64)
    mean = float(shuffled.mean()) if n_shuffles else math.nan
    std = float(shuffled.std(ddof=0)) if n_shuffles else math.nan
    kept = labels[labels >= 0]
    z = (values - mean) / std if std > 0 else np.full(values.shape, math.nan)
    return {
        "ncut": value,
        "ncut_shuffled_mean": mean,
        "ncut_shuffled_std": std,
        "ncut_z": float(z[best]),
        "ncut_seeds": values,
        "ncut_seed_mean": float(values.mean()),
        "ncut_seed_std": float(values.std()),
        "ncut_z_seed_mean": float(z.mean()),
        "ncut_z_seed_std": float(z.std()),
        "ncut_percentile": percentile_left(value, shuffled),
        "ave_in_out": ave_in_out(value, k),
        "n_isolated": int((labels < 0).sum()),
        "largest_cluster_frac": float(np.bincount(kept).max() / kept.size) if kept.size else math.nan,
        "labels": labels,
        "shuffled_ncuts": shuffled,
        "seed": true_seed,
        "shuffle_seeds": [_child_int(c) for c in children[1:]],
    }


# --------------------------------------------------------------------------------------------------------------
# Activation graph (§2.3)
# --------------------------------------------------------------------------------------------------------------


def reduce_activations(z: Tensor, act_reduction: ActReduction = "mean_abs") -> Tensor:
    """Per-image scalar of each unit (spec §2.3): ``(B, U)`` passes through; ``(B, U, *spatial)`` becomes
    ``mean |z|`` over the spatial axes (``"mean_abs"``) or, for ``(B, U, H, W)``, the reference's matrix
    1-norm ``max_w sum_h |z|`` (``"reference"``)."""
    if z.ndim == 2:
        return z
    if act_reduction == "mean_abs":
        return z.abs().flatten(2).mean(-1)
    if act_reduction == "reference":
        if z.ndim != 4:
            raise ValueError("act_reduction='reference' needs (B, U, H, W) maps")
        return z.abs().sum(-2).amax(-1)
    raise ValueError(f"unknown act_reduction {act_reduction!r}")


def _average_ranks(x: Tensor) -> Tensor:
    """Column-wise 1-based ranks with average ranks for ties (as ``scipy.stats.rankdata``), any device."""
    xt = x.T.contiguous()
    srt = xt.sort(dim=1).values
    left = torch.searchsorted(srt, xt, right=False)
    right = torch.searchsorted(srt, xt, right=True)
    return ((left + right + 1).to(x.dtype) / 2).T


def rank_correlation_squared(x: Tensor | np.ndarray, corr: Corr = "spearman") -> Tensor:
    """The activation-graph affinity ``A_uv = rho_uv^2`` of an ``(N, U)`` sample matrix (spec §2.3).

    Spearman = Pearson correlation of average ranks (one ``U x U`` matmul, on ``x``'s device, float64);
    ``"pearson"`` skips the ranks; ``"kendall"`` calls ``scipy.stats.kendalltau`` per pair (slow, O(U^2)).
    Zero-variance units get all-zero rows/columns (so they become isolated, label -1); the diagonal is 0,
    NaN -> 0, entries clipped to ``[0, 1]``.
    """
    x = torch.as_tensor(x).to(torch.float64)
    n, u = x.shape
    if corr == "kendall":
        xn = x.cpu().numpy()
        rho = np.zeros((u, u))
        for i in range(u):
            for j in range(i + 1, u):
                rho[i, j] = rho[j, i] = scipy.stats.kendalltau(xn[:, i], xn[:, j]).statistic
        r = torch.as_tensor(rho, device=x.device)
    else:
        if corr == "spearman":
            x = _average_ranks(x)
        elif corr != "pearson":
            raise ValueError(f"unknown corr {corr!r} (expected 'spearman', 'pearson' or 'kendall')")
        xc = x - x.mean(0, keepdim=True)
        norm = xc.norm(dim=0)
        live = norm > 0
        xc = xc / torch.where(live, norm, torch.ones_like(norm))
        r = xc.T @ xc
    const = x.max(0).values == x.min(0).values
    a = torch.nan_to_num(r * r, nan=0.0).clamp_(0.0, 1.0)
    a[const] = 0.0
    a[:, const] = 0.0
    a.fill_diagonal_(0.0)
    return a


class ActivationCorrelation(Metric):
    """Streams per-unit activations and yields the squared rank-correlation graph ``A^A`` (spec §2.3).

    ``update(z)`` takes ``(B, U)`` unit values or ``(B, U, *spatial)`` maps (reduced at once with
    ``act_reduction``, so feature maps are never kept).  Ranks need whole columns, so the reduced rows are
    kept, but only the first ``max_samples`` of them (spec: the N = 5,000 fixed probe images): memory is
    bounded by ``max_samples x U`` float32 (84 MB for VGG-16, §8), later rows are ignored.  The buffer is a
    list state with ``dist_reduce_fx="cat"`` (under DDP the ranks' rows are concatenated and the first
    ``max_samples`` used).  ``compute()`` returns the ``(U, U)`` float64 matrix of
    :func:`rank_correlation_squared`.
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    def __init__(self, num_units: int, max_samples: int = 5000, corr: Corr = "spearman",
                 act_reduction: ActReduction = "mean_abs", **kwargs: Any):
        super().__init__(**kwargs)
        if max_samples < 2:
            raise ValueError("max_samples must be at least 2")
        self.num_units, self.max_samples, self.corr, self.act_reduction = num_units, max_samples, corr, act_reduction
        self.add_state("values", default=[], dist_reduce_fx="cat")
        self.add_state("n_stored", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, z: Tensor) -> None:
        x = reduce_activations(z.detach(), self.act_reduction)
        if x.ndim != 2 or x.shape[1] != self.num_units:
            raise ValueError(f"expected activations of shape (B, {self.num_units}, ...), got {tuple(z.shape)}")
        room = self.max_samples - int(self.n_stored)
        if room <= 0:
            return
        x = x[:room].to(torch.float32)
        self.values.append(x)
        self.n_stored += x.shape[0]

    def compute(self) -> Tensor:
        x = dim_zero_cat(self.values)[: self.max_samples]
        if x.shape[0] < 2:
            raise ValueError("need at least 2 samples to correlate")
        return rank_correlation_squared(x, self.corr)

    def samples(self) -> Tensor:
        """The stored ``(N, U)`` reduced activations (reused, e.g., by dataset coherence)."""
        return dim_zero_cat(self.values)[: self.max_samples]


@dataclass
class ActivationGraph:
    """A dense activation graph: ``adjacency`` ``(U, U)`` float64, the unit groups' module names and sizes (in
    the weight graph's forward order), the stored ``(N, U)`` samples, and ``weight_layers``: for each group its
    layer index in the weight graph it was derived from."""

    adjacency: np.ndarray
    layer_names: list[str]
    layer_sizes: np.ndarray
    samples: np.ndarray
    weight_layers: list[int]

    @property
    def node_layer(self) -> np.ndarray:
        return np.repeat(np.arange(len(self.layer_sizes)), self.layer_sizes)


def activation_graph(model: nn.Module, data: Iterable[Any], graph: WeightGraph | None = None, *,
                     max_samples: int = 5000, corr: Corr = "spearman", act_reduction: ActReduction = "mean_abs",
                     device: torch.device | str | None = None, **graph_kwargs: Any) -> ActivationGraph:
    """Build the activation graph of ``model`` on probe ``data`` (spec §2.3).

    Units: an MLP's hidden layers (the weight graph's groups without input and logits), a CNN's conv channels.
    ``z`` is read with forward hooks on each group's ``z_module`` (the BN folded into the layer, else the layer
    itself: the input of the nonlinearity; in a ResNet the BN output before the residual add), reduced
    inside the hooks and never aliased (an in-place ReLU after the layer cannot rewrite them, :mod:`.hooks`).
    ``data`` yields input tensors or ``(x, ...)`` tuples; the model runs in eval mode without gradients (train
    mode is restored) until ``max_samples`` rows are seen.
    """
    graph = graph if graph is not None else weight_graph(model, **graph_kwargs)
    layers = list(range(len(graph.layer_sizes)))
    if graph.kind == "mlp":
        layers = layers[1:-1]
    names = [graph.z_modules[i] for i in layers]
    sizes = np.asarray([graph.layer_sizes[i] for i in layers], dtype=np.int64)
    # one process reads the probe data (specialization runs on rank 0 alone): no other rank to sync with
    metric = ActivationCorrelation(int(sizes.sum()), max_samples, corr, act_reduction, sync_on_compute=False)
    with torch.no_grad(), eval_mode(model), record_outputs({n: model.get_submodule(n) for n in names},
                                                           lambda z: reduce_activations(z, act_reduction).float()
                                                           ) as current:
        for batch in data:
            x = batch[0] if isinstance(batch, (list, tuple)) else batch
            if device is not None:
                x = x.to(device)
            current.clear()
            model(x)
            metric.update(torch.cat([current[n].cpu() for n in names], dim=1))
            if int(metric.n_stored) >= max_samples:
                break
    adj = metric.compute().cpu().numpy()
    return ActivationGraph(adj, [graph.layer_names[i] for i in layers], sizes, metric.samples().numpy(), layers)


# --------------------------------------------------------------------------------------------------------------
# Statistics helpers (§2.5, §2.6)
# --------------------------------------------------------------------------------------------------------------


def mean_sem(values: Sequence[float], scale: float = 1.0) -> tuple[float, float]:
    """``scale`` x (mean, SEM with ddof 1) of the finite ``values`` (NaN/inf excluded; SEM NaN for one value).
    Effect factors ``t/(t + r)`` are aggregated with ``scale=2``, so that 1 means "like random" (§2.6)."""
    v = np.asarray([e for e in values if e is not None and np.isfinite(e)], dtype=np.float64)
    if v.size == 0:
        return math.nan, math.nan
    sem = float(v.std(ddof=1) / math.sqrt(v.size)) if v.size > 1 else math.nan
    return scale * float(v.mean()), scale * sem


def percentile_left(value: float, null: Sequence[float] | np.ndarray) -> float:
    """Left-sided percentile ``(1 + #{r : null_r <= value}) / (n + 1)``; the minimum ``1/(n+1)`` needs ``value``
    strictly below every null value.

    The spec writes the count with ``<`` and says ties must count *against* significance (§2.6, §10 "Ties":
    "conservative"). With ``<`` a value tied with its whole null gets the minimum, the most significant
    percentile: on discrete statistics (top-10 label entropies, accuracies on small test sets) a random
    partition then came out "significant" for 92% of its sub-clusters. Counting ties keeps the stated
    intent: a tie never makes a set look special, and the null stays calibrated (project reading).
    """
    null = np.asarray(null, dtype=np.float64)
    return float((1 + np.sum(null <= value)) / (null.size + 1))


def percentile_right(value: float, null: Sequence[float] | np.ndarray) -> float:
    """Right-sided percentile ``(1 + #{r : null_r >= value}) / (n + 1)`` (``p_range``, the visualisation score);
    ties count against significance as in :func:`percentile_left`."""
    null = np.asarray(null, dtype=np.float64)
    return float((1 + np.sum(null >= value)) / (null.size + 1))


@dataclass(frozen=True)
class FisherResult:
    """Fisher's combination: ``statistic`` = ``-2 sum ln p'`` (chi^2 with 2m dof), ``pvalue``, and
    ``fisher_stat`` = ``mean(-ln p')``, the logged per-network summary (spec §2.6)."""

    statistic: Any
    pvalue: Any
    fisher_stat: Any


def fisher_combine(pvalues: Sequence[float] | np.ndarray, n_random: int | None = None, axis: int = -1) -> FisherResult:
    """Fisher-combine p-values with ``scipy.stats.combine_pvalues(method="fisher")`` (spec §2.6).

    With ``n_random`` the discrete percentiles are first centred, ``p' = p - 1/(2 (n_random + 1))``;
    without it the p-values are combined as given (then equal to scipy's result).  ``axis`` combines along one
    axis of an array of p-value vectors.
    """
    p = np.asarray(pvalues, dtype=np.float64)
    if n_random is not None:
        p = p - 1.0 / (2.0 * (n_random + 1))
    if np.any((p <= 0) | (p > 1)):
        raise ValueError("p-values must lie in (0, 1] (after the shift)")
    res = scipy.stats.combine_pvalues(p, method="fisher", axis=axis)
    return FisherResult(res.statistic, res.pvalue, np.mean(-np.log(p), axis=axis))


def bates_cdf(x: float, n: int) -> float:
    """CDF of the mean of ``n`` iid U(0, 1) (spec §2.6): ``(1/n!) sum_{j<=nx} (-1)^j C(n, j) (nx - j)^n``;
    the normal ``N(0.5, 1/(12 n))`` for ``n > 30`` as in the reference."""
    if n < 1:
        raise ValueError("n must be >= 1")
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    if n > 30:
        return float(scipy.stats.norm.cdf(x, loc=0.5, scale=math.sqrt(1.0 / (12 * n))))
    nx = n * x
    total = sum((-1) ** j * math.comb(n, j) * (nx - j) ** n for j in range(int(math.floor(nx)) + 1))
    return float(min(max(total / math.factorial(n), 0.0), 1.0))


def benjamini_hochberg(pvalues: Sequence[float] | np.ndarray, q: float = 0.05) -> tuple[float, np.ndarray]:
    """Benjamini-Hochberg at level ``q`` (spec §2.6).

    Returns ``(p_crit, significant)``: ``p_crit = max{p_(i) : p_(i) <= i q / M}`` and the boolean mask
    ``p <= p_crit``, computed through ``scipy.stats.false_discovery_control`` (a cell is significant iff its
    adjusted p is ``<= q``).  If nothing passes, ``p_crit = 0.0`` and nothing is significant (project reading;
    the reference returned 1.0).
    """
    p = np.asarray(pvalues, dtype=np.float64)
    if p.size == 0:
        return 0.0, np.zeros(0, dtype=bool)
    significant = scipy.stats.false_discovery_control(p, method="bh") <= q
    p_crit = float(p[significant].max()) if significant.any() else 0.0
    return p_crit, significant
