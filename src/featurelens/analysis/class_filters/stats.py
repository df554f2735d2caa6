"""Class-specific filters: the statistics and selections of the method (spec: ``shared/spec/class_filters.md``).

Background: Badola et al., "Decomposing the Deep: Finding Class Specific Filters in Deep CNNs"
(arXiv 2112.07719).  The formulas follow the spec; nothing here is copied from the authors' code.

Method
------
A classifier is split into a backbone producing non-negative penultimate features ``a in R^D`` (GAP of the
last conv stage) and a linear head ``z = W a + b`` (§2.1).  For every class ``c`` we pick a small set ``S_c``
of features from activations alone (§2.2):

* **Per-image importance** (§2.2): ``p_i = a_i / sum_j a_ij`` (L1 normalisation, float64); images with
  ``sum_j a_ij <= 1e-12`` are skipped and counted.  ``pi_i`` orders the features by ``p_i`` descending with
  ties to the lower index; ``T_i(m)`` is the first ``m`` entries of ``pi_i`` with ``p_ij > 0``
  (:func:`topk_membership`).
* **Integer k** (§2.3): ``h_c[j] = #{i in c : j in T_i(k1)}``; ``S_c`` = the ``k2`` features with the largest
  ``h_c``, ties by the larger class mass ``sum_{i in c} p_ij`` then the lower index (:func:`select_topk`).
* **Fractional k = f** (§2.4): ``n_i(f) = #{m >= 1 : sum_{t<=m} p_{i,pi_i(t)} < f}`` (:func:`n_below`);
  ``k1 = max(1, floor(mean_{i in c} n_i(f)))`` (:func:`fractional_k1`); a second pass builds ``h_c`` at that
  depth (:class:`FractionalHistogram`); ``q_c = h_c / sum h_c`` sorted ascending, the longest prefix with
  cumulative sum ``<= f_hist`` is dropped and the rest kept (:func:`select_fraction`).
* **Decomposed head** (§2.5): ``z~ = (M . W) a + b`` with ``M_cj = 1[j in S_c]`` (:func:`decomposed_logits`,
  or the equivalent gather form :func:`gathered_logits`); head MACs fall from ``C*D`` to ``sum_c |S_c|``
  (:func:`head_macs`).
* **Diagnostics** (§2.6): captured mass, features per class ``K_c(f)`` and selectivity ``Psi``
  (:func:`features_per_class`, :func:`psi`), set overlap (:func:`overlap_stats`), pairwise mutual
  information of the set indicators (:func:`mutual_info`), the noise/essentiality test
  (:func:`noise_corrupt`), weight alignment (:func:`weight_alignment`) and epoch-to-epoch stability
  (:func:`jaccard_per_class`).

Streaming and DDP
-----------------
The data-dependent parts are :mod:`torchmetrics` metrics whose states are fixed-size tensors reduced with
``"sum"``, so they stream over batches and sync across processes exactly:

* :class:`ClassFeatureStats` (first pass): integer-k histograms, class mass, captured top-k mass, image
  counts and histograms of ``n_i(f)`` (from which medians/means of ``n_i`` and ``K_i`` are exact).
* :class:`FractionalHistogram` (second pass, fractional k only): ``h_c`` at the per-class depth ``k1``.
* :class:`EvalCounts`: per-head, per-class correct counts of any number of heads on labelled features.

Everything else is a pure function of those states (and of ``W``, ``b``), valid on CPU or GPU tensors.
:func:`featurelens.analysis.hooks.find_head` and ``capture_head_input`` locate the head and record its input.

This module is plain torch + torchmetrics; it does not import Lightning.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torchmetrics import Metric

__all__ = [
    "l1_normalise",
    "topk_membership",
    "n_below",
    "ClassFeatureStats",
    "FractionalHistogram",
    "fractional_k1",
    "select_topk",
    "select_fraction",
    "indices_to_mask",
    "decomposed_logits",
    "gathered_logits",
    "head_macs",
    "overlap_stats",
    "mutual_info",
    "noise_corrupt",
    "weight_alignment",
    "jaccard_per_class",
    "features_per_class",
    "psi",
    "EvalCounts",
]

#: Images whose total activation mass is at or below this are skipped (spec §2.2).
EPS = 1e-12


# --------------------------------------------------------------------------------------------------------------
# Per-image importance (§2.2)
# --------------------------------------------------------------------------------------------------------------
def l1_normalise(a: Tensor, eps: float = EPS) -> tuple[Tensor, Tensor]:
    """L1-normalise each row of ``a`` (spec §2.2).

    Args:
        a: ``(B, D)`` non-negative features (any float dtype).  Negative inputs are the caller's business:
            pass ``a.abs()`` (the metrics below do that, with a warning).
        eps: rows with ``sum_j a_ij <= eps`` are not kept.

    Returns:
        ``p`` of shape ``(B, D)`` in float64 (rows not kept are all zero) and the ``(B,)`` bool ``keep`` mask.
    """
    a64 = a.to(torch.float64)
    s = a64.sum(dim=1)
    keep = s > eps
    p = torch.where(keep[:, None], a64 / torch.where(keep, s, torch.ones_like(s))[:, None], torch.zeros_like(a64))
    return p, keep


def _descending_ranks(p: Tensor) -> tuple[Tensor, Tensor]:
    """Stable descending order of each row (ties to the lower index) and each entry's rank in it.

    Returns ``(order, rank)``, both ``(B, D)`` int64, with ``p[i, order[i, t]]`` non-increasing in ``t`` and
    ``rank[i, order[i, t]] = t``.
    """
    order = torch.sort(-p, dim=1, stable=True).indices
    positions = torch.arange(p.shape[1], device=p.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(1, order, positions)
    return order, rank


def topk_membership(p: Tensor, k: int) -> Tensor:
    """``(B, D)`` bool: ``j in T_i(k)``, the first ``k`` entries of ``pi_i`` with ``p_ij > 0`` (spec §2.2).

    ``pi_i`` is the descending order of ``p_i`` with ties to the lower index (a stable sort on ``-p``).  All
    positive entries precede the zeros in ``pi_i``, so ``T_i(k)`` is the first ``k`` of ``pi_i`` minus its
    zero entries and may hold fewer than ``k`` features.  ``k`` larger than ``D`` is clipped.
    """
    if k < 0:
        raise ValueError(f"class_filters: k must be >= 0, got {k}")
    _, rank = _descending_ranks(p)
    return (rank < k) & (p > 0)


def n_below(p: Tensor, f: float) -> Tensor:
    """``(B,)`` int64 ``n_i(f) = #{m >= 1 : sum_{t<=m} p_{i,pi_i(t)} < f}`` (spec §2.4 step 1).

    The number of top features whose cumulative mass is still strictly below ``f``; ``n_i(f) + 1`` features
    reach ``f``.  Values lie in ``0..D``.
    """
    cs = torch.sort(p, dim=1, descending=True).values.cumsum(dim=1)
    return (cs < f).sum(dim=1)


def _as_features(a: Tensor, dim: int) -> Tensor:
    a = a.detach()
    if a.dim() != 2:
        a = a.flatten(1)
    if a.shape[1] != dim:
        raise ValueError(f"class_filters: expected features of shape (B, {dim}), got {tuple(a.shape)}")
    return a


def _as_labels(y: Tensor, batch: int, num_classes: int, device: torch.device) -> Tensor:
    y = y.detach().to(device=device, dtype=torch.int64).reshape(-1)
    if y.numel() != batch:
        raise ValueError(f"class_filters: {batch} feature rows but {y.numel()} labels")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"class_filters: labels must lie in [0, {num_classes}), got [{int(y.min())}, {int(y.max())}]")
    return y


class _NonNegative:
    """Mixin: take ``|a|`` for negative features and warn once per metric instance (spec §2.1)."""

    _warned_negative: bool = False

    def _abs_if_negative(self, a: Tensor) -> Tensor:
        if a.numel() and bool((a < 0).any()):
            if not self._warned_negative:
                warnings.warn(
                    f"class_filters: {type(self).__name__} got negative features; using |a| (the method assumes "
                    "non-negative post-ReLU features, spec §2.1)",
                    stacklevel=3,
                )
                self._warned_negative = True
            return a.abs()
        return a


# --------------------------------------------------------------------------------------------------------------
# Streaming statistics (§2.3, §2.4, §2.6)
# --------------------------------------------------------------------------------------------------------------
class ClassFeatureStats(_NonNegative, Metric):
    """Streaming per-class sufficient statistics over batches of penultimate features (spec §2.3-§2.6).

    Every state is a fixed-size tensor with ``dist_reduce_fx="sum"``, so the metric is DDP-safe and the
    synced result equals a single-process pass over the union of the data (floats up to summation order).

    States (``K = len(ks)``, ``F = len(fractions)``, ``C = num_classes``, ``D = dim``):

    * ``hist`` ``(K, C, D)`` int64: ``h_c[j]`` at integer depth ``ks[r]`` (clipped to ``D``), §2.3.
    * ``mass`` ``(C, D)`` float64: ``sum_{i in c} p_ij`` (tie-break of :func:`select_topk`; set mass
      ``sigma_c = (mass[c] * M[c]).sum() / count[c]``).
    * ``captured`` ``(K, C)`` float64: ``sum_{i in c}`` of the top-``k`` captured mass, so
      ``mu_c(k) = captured / count`` (§2.6).
    * ``count`` ``(C,)`` int64: kept images per class.  ``skipped``: scalar int64, images with zero mass.
    * ``nhist`` ``(F, C, D+1)`` int64: ``nhist[r, c, n] = #{i in c : n_i(fractions[r]) = n}`` (§2.4, §2.6).

    Negative features are replaced by ``|a|`` with a warning (once per instance).
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = None

    def __init__(
        self,
        num_classes: int,
        dim: int,
        ks: Sequence[int] = (5,),
        fractions: Sequence[float] = (0.5,),
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if num_classes < 1 or dim < 1:
            raise ValueError(f"class_filters: need num_classes >= 1 and dim >= 1, got {num_classes}, {dim}")
        ks = tuple(int(k) for k in ks)
        fractions = tuple(float(f) for f in fractions)
        if any(k < 1 for k in ks):
            raise ValueError(f"class_filters: every k must be >= 1, got {ks}")
        if any(not 0.0 < f < 1.0 for f in fractions):
            raise ValueError(f"class_filters: every fraction must lie in (0, 1), got {fractions}")
        self.num_classes, self.dim = int(num_classes), int(dim)
        self.ks, self.fractions = ks, fractions
        #: ``ks`` clipped to ``D`` (the depth actually used for ``hist`` / ``captured``).
        self.ks_eff = tuple(min(k, self.dim) for k in ks)
        C, D = self.num_classes, self.dim
        self.add_state("hist", torch.zeros(len(ks), C, D, dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("mass", torch.zeros(C, D, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("captured", torch.zeros(len(ks), C, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros(C, dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("skipped", torch.zeros((), dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("nhist", torch.zeros(len(fractions), C, D + 1, dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, a: Tensor, y: Tensor) -> None:
        """Add a batch: ``a`` ``(B, D)`` features (any float dtype), ``y`` ``(B,)`` integer labels."""
        a = self._abs_if_negative(_as_features(a, self.dim).to(self.mass.device))
        y = _as_labels(y, a.shape[0], self.num_classes, self.mass.device)
        p, keep = l1_normalise(a)
        self.skipped += (~keep).sum()
        p, y = p[keep], y[keep]
        if y.numel() == 0:
            return
        C, D = self.num_classes, self.dim
        self.count += torch.bincount(y, minlength=C)
        self.mass.index_add_(0, y, p)
        order, rank = _descending_ranks(p)
        positive = p > 0
        cs = p.gather(1, order).cumsum(dim=1)  # captured mass of the top-m features, m = 1..D
        for r, k in enumerate(self.ks_eff):
            self.hist[r].index_add_(0, y, ((rank < k) & positive).to(torch.int64))
            self.captured[r].index_add_(0, y, cs[:, k - 1])
        for r, f in enumerate(self.fractions):
            n = (cs < f).sum(dim=1)
            self.nhist[r] += torch.bincount(y * (D + 1) + n, minlength=C * (D + 1)).view(C, D + 1)

    def compute(self) -> dict[str, Tensor]:
        """The (synced) states: ``hist``, ``mass``, ``captured``, ``count``, ``skipped``, ``nhist``."""
        return {
            "hist": self.hist,
            "mass": self.mass,
            "captured": self.captured,
            "count": self.count,
            "skipped": self.skipped,
            "nhist": self.nhist,
        }


class FractionalHistogram(_NonNegative, Metric):
    """Second pass for fractional k (spec §2.4 steps 2-3): ``h_c`` at the per-class depth ``k1[r, c]``.

    Args:
        k1: ``(F, C)`` int64 histogram depth per fraction and class (from :func:`fractional_k1`).
        dim: feature dimension ``D``.  Pass it whenever the metric may be synced across processes: without it
            the state is allocated lazily at the first update, and a process that never updates would hold a
            state of another shape.

    State ``hist`` ``(F, C, D)`` int64, ``dist_reduce_fx="sum"``; :meth:`compute` returns it.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = None

    def __init__(self, k1: Tensor, dim: int | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        k1 = torch.as_tensor(k1, dtype=torch.int64)
        if k1.dim() != 2:
            raise ValueError(f"class_filters: k1 must have shape (F, C), got {tuple(k1.shape)}")
        if k1.numel() and int(k1.min()) < 1:
            raise ValueError("class_filters: every k1 must be >= 1")
        self.register_buffer("k1", k1.clone(), persistent=False)
        self.dim = None if dim is None else int(dim)
        F, C = k1.shape
        self.num_classes = int(C)
        self.add_state("hist", torch.zeros(F, C, 0 if dim is None else dim, dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, a: Tensor, y: Tensor) -> None:
        """Add a batch: ``a`` ``(B, D)`` features, ``y`` ``(B,)`` integer labels."""
        a = a.detach()
        if a.dim() != 2:
            a = a.flatten(1)
        if self.dim is None:
            self.dim = int(a.shape[1])
        if self.hist.shape[-1] != self.dim:  # lazy allocation (no dim given) or after reset()
            self.hist = torch.zeros(*self.hist.shape[:2], self.dim, dtype=torch.int64, device=self.hist.device)
        a = self._abs_if_negative(_as_features(a, self.dim).to(self.hist.device))
        y = _as_labels(y, a.shape[0], self.num_classes, self.hist.device)
        p, keep = l1_normalise(a)
        p, y = p[keep], y[keep]
        if y.numel() == 0:
            return
        _, rank = _descending_ranks(p)
        positive = p > 0
        k1 = self.k1.to(p.device)
        for r in range(k1.shape[0]):
            member = (rank < k1[r, y][:, None]) & positive
            self.hist[r].index_add_(0, y, member.to(torch.int64))

    def compute(self) -> Tensor:
        """The (synced) ``(F, C, D)`` histogram."""
        return self.hist


def fractional_k1(nhist: Tensor) -> Tensor:
    """``(F, C, D+1)`` histograms of ``n_i(f)`` -> ``(F, C)`` int64 ``k1 = max(1, floor(mean_i n_i(f)))``.

    Spec §2.4 step 2, with the project's ``max(1, .)`` guard.  Computed in exact integer arithmetic; classes
    without images get ``k1 = 1``.
    """
    nhist = nhist.to(torch.int64)
    n_values = torch.arange(nhist.shape[-1], device=nhist.device, dtype=torch.int64)
    total = (nhist * n_values).sum(-1)
    count = nhist.sum(-1)
    k1 = torch.div(total, count.clamp_min(1), rounding_mode="floor")
    return torch.where(count > 0, k1.clamp_min(1), torch.ones_like(k1))


# --------------------------------------------------------------------------------------------------------------
# Selection (§2.3, §2.4)
# --------------------------------------------------------------------------------------------------------------
def select_topk(hist: Tensor, mass: Tensor, k2: int) -> Tensor:
    """``(C, k2)`` int64 indices of ``S_c`` ordered by ``(hist desc, mass desc, index asc)`` (spec §2.3).

    Always returns exactly ``min(k2, D)`` features per class, so a class with fewer than ``k2`` features of
    non-zero count (e.g. one with no images) is completed by mass, then by index.
    """
    if k2 < 1:
        raise ValueError(f"class_filters: k2 must be >= 1, got {k2}")
    if hist.shape != mass.shape:
        raise ValueError(f"class_filters: hist {tuple(hist.shape)} and mass {tuple(mass.shape)} differ in shape")
    k2 = min(int(k2), hist.shape[-1])
    # Lexicographic sort by successive stable sorts, least significant key first (index asc is implicit).
    by_mass = torch.sort(-mass.to(torch.float64), dim=-1, stable=True).indices
    h = hist.gather(-1, by_mass)
    by_hist = torch.sort(-h, dim=-1, stable=True).indices
    return by_mass.gather(-1, by_hist)[..., :k2]


def select_fraction(hist: Tensor, f_hist: float) -> Tensor:
    """``(C, D)`` bool mask of ``S_c`` from the fractional-pass histogram (spec §2.4 step 4).

    With ``q_c = h_c / sum_j h_c[j]`` sorted ascending, the longest prefix whose cumulative sum is
    ``<= f_hist`` is dropped and the remaining features are kept, so ``S_c`` carries at least
    ``1 - f_hist`` of the histogram mass; features with ``h_c[j] = 0`` are always dropped.

    Tie rule: the ascending order is the exact reverse of the stable descending order, so among equal ``q``
    the *higher* index is dropped first (the lower index is kept), consistent with §2.2's tie rule.
    The comparison is done on integer counts, ``cumsum(h) <= f_hist * sum(h)``, avoiding rounding in ``q``.
    Classes with an empty histogram get an empty set.
    """
    if not 0.0 <= f_hist < 1.0:
        raise ValueError(f"class_filters: f_hist must lie in [0, 1), got {f_hist}")
    hist = hist.to(torch.int64)
    ascending = torch.sort(-hist, dim=-1, stable=True).indices.flip(-1)
    cum = hist.gather(-1, ascending).cumsum(-1)
    total = hist.sum(-1, keepdim=True)
    n_drop = (cum.to(torch.float64) <= f_hist * total.to(torch.float64)).sum(-1, keepdim=True)
    keep_sorted = torch.arange(hist.shape[-1], device=hist.device).expand_as(ascending) >= n_drop
    mask = torch.zeros_like(hist, dtype=torch.bool).scatter_(-1, ascending, keep_sorted)
    return mask & (total > 0)


def indices_to_mask(idx: Tensor, dim: int) -> Tensor:
    """``(C, k)`` feature indices -> ``(C, D)`` bool selection mask ``M_cj = 1[j in S_c]``."""
    idx = idx.to(torch.int64)
    return torch.zeros(idx.shape[0], dim, dtype=torch.bool, device=idx.device).scatter_(1, idx, True)


# --------------------------------------------------------------------------------------------------------------
# Decomposed head and its cost (§2.5)
# --------------------------------------------------------------------------------------------------------------
def decomposed_logits(a: Tensor, weight: Tensor, bias: Tensor | None, mask: Tensor) -> Tensor:
    """Mask form of the decomposed head, ``z~ = (M . W) a + b`` (spec §2.5).  ``a`` is cast to ``W``'s dtype."""
    w = weight * mask.to(device=weight.device, dtype=weight.dtype)
    return nn.functional.linear(a.to(weight.dtype), w, bias)


def gathered_logits(a: Tensor, weight: Tensor, bias: Tensor | None, idx: Tensor) -> Tensor:
    """Gather form, ``z~_c = sum_{j in S_c} W_cj a_j + b_c`` over ``idx`` ``(C, k)`` (spec §2.5).

    Costs ``B * C * k`` MACs (the decomposed head's saving) and equals :func:`decomposed_logits` with
    ``indices_to_mask(idx, D)`` to float error, provided ``idx`` has no repeated index within a row.
    """
    idx = idx.to(device=weight.device, dtype=torch.int64)
    w_sel = weight.gather(1, idx)  # (C, k)
    a_sel = a.to(weight.dtype)[:, idx]  # (B, C, k)
    z = torch.einsum("bck,ck->bc", a_sel, w_sel)
    return z if bias is None else z + bias


def head_macs(mask_or_sizes, num_classes: int, dim: int) -> tuple[int, int, float]:
    """Head multiply-accumulates ``(full C*D, decomposed sum_c |S_c|, reduction C*D / sum_c |S_c|)`` (§2.5).

    ``mask_or_sizes`` may be a ``(C, D)`` bool mask, a ``(C, k)`` integer index tensor, a per-class sequence or
    1-D tensor of set sizes, or a single int ``k`` (``|S_c| = k`` for all classes).  An empty decomposed
    head gives a reduction of ``inf``.
    """
    full = int(num_classes) * int(dim)
    if isinstance(mask_or_sizes, Tensor):
        t = mask_or_sizes
        if t.dtype == torch.bool:
            dec = int(t.sum())
        elif t.dim() == 2:
            dec = int(t.shape[0] * t.shape[1])
        elif t.dim() == 0:
            dec = int(num_classes) * int(t)
        else:
            dec = int(t.sum())
    elif isinstance(mask_or_sizes, int):
        dec = int(num_classes) * mask_or_sizes
    else:
        dec = int(sum(int(s) for s in mask_or_sizes))
    return full, dec, (full / dec if dec else math.inf)


# --------------------------------------------------------------------------------------------------------------
# Diagnostics (§2.6)
# --------------------------------------------------------------------------------------------------------------
def _pairwise_jaccard(inter: Tensor, size_a: Tensor, size_b: Tensor) -> Tensor:
    union = size_a + size_b - inter
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(inter))


def overlap_stats(mask: Tensor) -> dict[str, float]:
    """Overlap of the class sets (spec §2.6) from a ``(C, D)`` bool mask.

    Returns ``union`` (``|U_c S_c|``), ``overlap_mean`` (mean ``|S_c n S_c'|`` over ``c < c'``),
    ``jaccard_mean`` (mean Jaccard over ``c < c'``; two empty sets count as identical, Jaccard 1) and
    ``set_size_mean`` (mean ``|S_c|``).  Pair means are NaN for a single class.
    """
    m = mask.to(torch.float64)
    C = m.shape[0]
    inter = m @ m.T
    sizes = m.sum(1)
    jac = _pairwise_jaccard(inter, sizes[:, None], sizes[None, :])
    iu = torch.triu_indices(C, C, offset=1, device=m.device)
    pairs = iu.shape[1]
    return {
        "union": float(mask.any(0).sum()),
        "overlap_mean": float(inter[iu[0], iu[1]].mean()) if pairs else math.nan,
        "jaccard_mean": float(jac[iu[0], iu[1]].mean()) if pairs else math.nan,
        "set_size_mean": float(sizes.mean()),
    }


def _xlogx_term(n_ab: Tensor, n_a: Tensor, n_b: Tensor, total: float) -> Tensor:
    """``(n_ab/N) ln(N n_ab / (n_a n_b))`` with ``0 ln 0 = 0``."""
    pos = n_ab > 0
    safe = torch.where(pos, n_ab, torch.ones_like(n_ab))
    denom = torch.where(pos, n_a * n_b, torch.ones_like(n_ab))
    return torch.where(pos, safe / total * torch.log(total * safe / denom), torch.zeros_like(n_ab))


def mutual_info(mask: Tensor) -> dict[str, float]:
    """Pairwise mutual information of the set indicators ``u_c in {0,1}^D`` in nats (spec §2.6).

    For sizes ``k1, k2`` and overlap ``o`` the 2x2 table over the ``D`` positions is ``n11 = o``,
    ``n10 = k1 - o``, ``n01 = k2 - o``, ``n00 = D - k1 - k2 + o`` and
    ``MI = sum_ab (n_ab/D) ln(D n_ab / (n_a. n_.b))`` (equal to ``sklearn.metrics.mutual_info_score``).
    ``mi_incl_self`` is the mean over all ``C^2`` ordered pairs (the authors' number, self-pairs give the
    binary entropy ``H_b(|S_c|/D)``); ``mi_excl_self`` the mean over ``c != c'`` (NaN for one class).
    """
    m = mask.to(torch.float64)
    C, D = m.shape
    o = m @ m.T
    k_a = m.sum(1)[:, None].expand(C, C)
    k_b = m.sum(1)[None, :].expand(C, C)
    n11, n10, n01 = o, k_a - o, k_b - o
    n00 = D - k_a - k_b + o
    na1, na0 = k_a, D - k_a
    nb1, nb0 = k_b, D - k_b
    mi = (
        _xlogx_term(n11, na1, nb1, D)
        + _xlogx_term(n10, na1, nb0, D)
        + _xlogx_term(n01, na0, nb1, D)
        + _xlogx_term(n00, na0, nb0, D)
    )
    off = ~torch.eye(C, dtype=torch.bool, device=m.device)
    return {
        "mi_incl_self": float(mi.mean()),
        "mi_excl_self": float(mi[off].mean()) if C > 1 else math.nan,
    }


def noise_corrupt(a: Tensor, y: Tensor, mask: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Essentiality test inputs (spec §2.6): ``(a', a'')`` for images ``a`` ``(B, D)`` of labels ``y``.

    ``a'`` replaces the features in ``S_{y_i}`` with i.i.d. ``N(0, 1)`` draws, ``a''`` replaces the other
    features (replacement, not addition).  One ``(B, D)`` draw from ``generator`` (on the generator's
    device, then moved to ``a``'s) serves both: they corrupt disjoint positions and are separate experiments.
    """
    dtype = a.dtype if a.is_floating_point() else torch.float32
    noise = torch.randn(a.shape, generator=generator, device=generator.device, dtype=dtype).to(a.device)
    m = mask.to(a.device)[y.to(device=a.device, dtype=torch.int64)]
    a = a.to(dtype)
    return torch.where(m, noise, a), torch.where(m, a, noise)


def weight_alignment(weight: Tensor, mask: Tensor) -> float:
    """Share of ``S_c`` among the ``|S_c|`` largest entries of ``W[c, :]``, pooled over classes (spec §2.6).

    ``sum_c |S_c n top_{|S_c|}(W[c])| / sum_c |S_c|``; ties among weights go to the lower index.  NaN when
    every set is empty.
    """
    mask = mask.to(device=weight.device, dtype=torch.bool)
    _, rank = _descending_ranks(weight.detach().to(torch.float64))
    sizes = mask.sum(1, keepdim=True)
    total = int(sizes.sum())
    if total == 0:
        return math.nan
    return float((mask & (rank < sizes)).sum()) / total


def jaccard_per_class(mask_a: Tensor, mask_b: Tensor) -> Tensor:
    """``(C,)`` float64 Jaccard index between ``S_c`` in two masks (two empty sets: 1).  Stability = mean."""
    a = mask_a.to(torch.bool)
    b = mask_b.to(device=a.device, dtype=torch.bool)
    inter = (a & b).sum(1).to(torch.float64)
    union = (a | b).sum(1).to(torch.float64)
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(inter))


def _lower_median(nhist_f: Tensor) -> Tensor:
    """Lower median of the values ``0..D`` histogrammed in ``(C, D+1)``; NaN for empty rows."""
    nhist_f = nhist_f.to(torch.int64)
    count = nhist_f.sum(-1, keepdim=True)
    need = torch.div(count + 1, 2, rounding_mode="floor")  # the ceil(N/2)-th smallest value
    med = (nhist_f.cumsum(-1) < need).sum(-1).to(torch.float64)
    return torch.where(count[..., 0] > 0, med, torch.full_like(med, math.nan))


def features_per_class(nhist_f: Tensor) -> Tensor:
    """``(C, D+1)`` histogram of ``n_i(f)`` -> ``(C,)`` ``K_c(f) = median_{i in c} (n_i(f) + 1)`` (spec §2.6).

    Uses the lower median (the ``ceil(N/2)``-th smallest value) so that ``K_c`` is always an attained integer;
    classes without images give NaN.  Report the mean over classes (``nanmean``).
    """
    return _lower_median(nhist_f) + 1


def psi(nhist_f: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """Selectivity ``Psi_f^c = (D - stat_{i in c} n_i(f)) / D`` with the (lower) median and the mean (§2.6).

    Median convention (project reading; the spec writes "median"): the *lower* median, the ``ceil(N/2)``-th
    smallest ``n_i(f)`` of the class's ``N`` images, as in :func:`features_per_class`. It is always an attained
    value; ``numpy.median`` instead averages the two middle values when ``N`` is even (``n = 1, 1, 2, 2``:
    1 here, 1.5 with numpy), so on even class sizes Ψ here is higher by half the gap between the two middle
    values, over D. Ties in the feature
    ranking of §2.2 go to the lower index, the set selection of §2.3 breaks ties by mass then index
    (:func:`select_topk`).

    Returns two ``(C,)`` float64 tensors; classes without images give NaN.  The layer value is the mean over
    classes.
    """
    nhist_f = nhist_f.to(torch.int64)
    n_values = torch.arange(nhist_f.shape[-1], device=nhist_f.device, dtype=torch.float64)
    count = nhist_f.sum(-1).to(torch.float64)
    mean = (nhist_f.to(torch.float64) * n_values).sum(-1) / count  # NaN for empty classes
    med = _lower_median(nhist_f)
    return (dim - med) / dim, (dim - mean) / dim


# --------------------------------------------------------------------------------------------------------------
# Streaming evaluation of heads
# --------------------------------------------------------------------------------------------------------------
class EvalCounts(Metric):
    """Top-1 correct counts of several heads on labelled features, per class (DDP-safe sums).

    States ``correct`` ``(n_heads, C)`` int64 and ``total`` ``(C,)`` int64.  :meth:`compute` returns them
    together with ``acc`` ``(n_heads,)`` (overall top-1) and ``acc_per_class`` ``(n_heads, C)`` (NaN for a
    class without images), both float64.  Predictions are ``argmax`` (first maximum on ties).  Note that
    torchmetrics squeezes one-element outputs, so with ``n_heads=1`` ``acc`` comes back 0-d.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = True

    def __init__(self, num_classes: int, n_heads: int, **kwargs) -> None:
        super().__init__(**kwargs)
        if num_classes < 1 or n_heads < 1:
            raise ValueError(f"class_filters: need num_classes >= 1 and n_heads >= 1, got {num_classes}, {n_heads}")
        self.num_classes, self.n_heads = int(num_classes), int(n_heads)
        self.add_state("correct", torch.zeros(n_heads, num_classes, dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros(num_classes, dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, logits_per_head: Sequence[Tensor], y: Tensor) -> None:
        """Add a batch: one ``(B, C)`` logit tensor per head, ``y`` ``(B,)`` labels."""
        if len(logits_per_head) != self.n_heads:
            raise ValueError(f"class_filters: expected {self.n_heads} heads, got {len(logits_per_head)}")
        y = _as_labels(y, logits_per_head[0].shape[0], self.num_classes, self.total.device)
        C = self.num_classes
        self.total += torch.bincount(y, minlength=C)
        for h, logits in enumerate(logits_per_head):
            pred = logits.detach().argmax(dim=1).to(y.device)
            self.correct[h] += torch.bincount(y[pred == y], minlength=C)

    def compute(self) -> dict[str, Tensor]:
        """``correct``, ``total``, ``acc`` and ``acc_per_class`` (see the class docstring)."""
        correct = self.correct.to(torch.float64)
        total = self.total.to(torch.float64)
        return {
            "correct": self.correct,
            "total": self.total,
            "acc": correct.sum(1) / total.sum(),
            "acc_per_class": correct / total,
        }
