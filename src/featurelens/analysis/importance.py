"""Importance (lesion test) and dataset-example coherence of sub-clusters (spec §2.6, §2.7 first bullet).

Spec: ``shared/spec/specialization.md``.  Builds on :mod:`featurelens.analysis.specialization` (weight graph,
percentiles, shifted Fisher).  Plain torch / numpy; never imports Lightning.

* :func:`lesion_hook` -- context manager: a forward hook zeroing channels ``units`` (dim 1) of a module's
  output ``z`` (§2.6 project reading: zero the BN output / pre-activation; equals zeroing the incoming weights
  and bias on BN-free ReLU nets).
* :func:`lesion_test` -- per-class correct counts for the unlesioned net (row 0) and every lesion set, with
  **prefix sharing** (§8): per batch the net runs up to ``z_module`` once; a hook replaces that module's
  output by the ``n_sets * B`` stack of masked copies so that only the suffix runs on the big batch.  Sets are
  chunked (``max_images``) to bound memory O(chunk * B * |z|).  Models whose suffix re-uses tensors computed
  before ``z_module`` (a residual skip around it) cannot take a bigger batch there; for them the function
  falls back (automatically, ``mode="auto"``) to repeating the input batch, still one pass per chunk.
  :func:`lesion_test_naive` (one full pass per set with :func:`lesion_hook`) is the reference used in tests.
* :func:`random_sets`, :func:`eligible` -- the null (§2.6: same layer, same size, non-isolated units only,
  without replacement) and the eligibility rule ``min_size <= |S| <= max_prop * n'``.
* :func:`subcluster_importance` -- m, Δ, range, p_mean (left), p_range (right), e_mean, e_range (§2.6, §10).
* :func:`importance` -- all eligible (layer, cluster) sub-clusters of a partition plus the Fisher summary.
* :func:`dataset_coherence` -- §2.7 dataset examples: entropy of the top-n images' labels vs random sets.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from featurelens.analysis.hooks import eval_mode, forward_hooks
from featurelens.analysis.specialization.measure import (
    WeightGraph,
    fisher_combine,
    mean_sem,
    percentile_left,
    percentile_right,
    seed_sequence_ints,
)

__all__ = [
    "lesion_hook",
    "lesion_test",
    "lesion_test_naive",
    "random_sets",
    "eligible",
    "eligible_layers",
    "layer_clusters",
    "subcluster_importance",
    "importance",
    "summarize_importance",
    "label_entropy",
    "dataset_coherence",
]

#: |mean Δ| below this makes range undefined (NaN), spec §10 "Division in range".
RANGE_EPS = 1e-12


# ----------------------------------------------------------------------------------------------------------
# Lesions (§2.6, §8)
# ----------------------------------------------------------------------------------------------------------


def _as_index(units: Any) -> Tensor:
    return torch.as_tensor(units, dtype=torch.long).reshape(-1)


@contextlib.contextmanager
def lesion_hook(module: nn.Module, units: Any) -> Iterator[None]:
    """Zero the channels/units ``units`` (dim 1) of ``module``'s output while the context is open (§2.6).

    The hook returns a zeroed copy (the module's own output tensor is not modified in place); it is removed
    in ``finally``.
    """
    idx = _as_index(units)

    def hook(_m, _i, out):
        out = out.clone()
        out[:, idx.to(out.device)] = 0
        return out

    with forward_hooks([(module, hook)]):
        yield


def _split_batch(batch: Any) -> tuple[Tensor, Tensor]:
    if isinstance(batch, dict):
        return batch["x"] if "x" in batch else batch["image"], batch["y"] if "y" in batch else batch["label"]
    return batch[0], batch[1]


def _keep_masks(sets: Sequence[Any], n_units: int, device: Any) -> Tensor:
    """Boolean keep-masks ``(1 + n_sets, n_units)``; row 0 keeps everything (the unlesioned net)."""
    keep = torch.ones(len(sets) + 1, n_units, dtype=torch.bool, device=device)
    for i, s in enumerate(sets):
        keep[i + 1, _as_index(s).to(device)] = False
    return keep


def _apply_masks(z: Tensor, keep: Tensor) -> Tensor:
    """``(n, B, C, ...)`` masked copies of ``z (B, C, ...)``, flattened to ``(n*B, C, ...)``."""
    n = keep.shape[0]
    shape = (n, 1, keep.shape[1]) + (1,) * (z.dim() - 2)
    zz = torch.where(keep.view(shape), z.unsqueeze(0), torch.zeros((), dtype=z.dtype, device=z.device))
    return zz.reshape((n * z.shape[0],) + tuple(z.shape[1:]))


def _tally(counts: Tensor, out: Tensor, y: Tensor, n: int, num_classes: int) -> None:
    pred = out.argmax(dim=1).view(n, -1)
    correct = (pred == y.view(1, -1)).long()
    counts.scatter_add_(1, y.view(1, -1).expand(n, -1), correct)


def _lesion_counts(model: nn.Module, data: Iterable[Any], z_module: str | nn.Module, sets: Sequence[Any],
                   num_classes: int, device: Any = None, *, max_images: int = 8192,
                   mode: str = "auto") -> tuple[Tensor, Tensor]:
    """Counts ``(1 + n_sets, K)`` (int64) and class totals ``(K,)``; see :func:`lesion_test`."""
    if mode not in ("auto", "shared", "repeat"):
        raise ValueError(f"mode must be 'auto', 'shared' or 'repeat', got {mode!r}")
    module = model.get_submodule(z_module) if isinstance(z_module, str) else z_module
    if device is None:
        device = next(iter(model.parameters())).device
    device = torch.device(device)
    n_all = len(sets) + 1
    counts = torch.zeros(n_all, num_classes, dtype=torch.long, device=device)
    totals = torch.zeros(num_classes, dtype=torch.long, device=device)
    # keep: all (1 + n_sets) masks, built at the first hook call (channel count of z); rows: current chunk.
    state: dict[str, Any] = {"keep": None, "rows": None, "mode": "repeat" if mode == "repeat" else "shared"}

    def hook(_m, _i, out):
        if state["rows"] is None:
            return None
        if state["keep"] is None:
            state["keep"] = _keep_masks(sets, int(out.shape[1]), out.device)
        keep = state["keep"][state["rows"]]
        if state["mode"] == "shared":
            return _apply_masks(out, keep)
        n = keep.shape[0]  # repeat mode: out is already (n * B, ...), copy j of the batch gets mask j
        b = out.shape[0] // n
        shape = (n * b, keep.shape[1]) + (1,) * (out.dim() - 2)
        return torch.where(keep.repeat_interleave(b, 0).view(shape), out,
                           torch.zeros((), dtype=out.dtype, device=out.device))

    with forward_hooks([(module, hook)]), torch.no_grad(), eval_mode(model):
        for batch in data:
            x, y = _split_batch(batch)
            x, y = x.to(device), y.to(device).long()
            totals += torch.bincount(y, minlength=num_classes)[:num_classes]
            chunk = max(1, max_images // max(1, x.shape[0]))
            for start in range(0, n_all, chunk):
                stop = min(n_all, start + chunk)
                state["rows"] = slice(start, stop)
                out = _run(model, x, stop - start, state, mode)
                state["rows"] = None
                _tally(counts[start:stop], out, y, stop - start, num_classes)
    return counts, totals


def _run(model: nn.Module, x: Tensor, n: int, state: dict[str, Any], mode: str) -> Tensor:
    """One forward of ``n`` masked copies of the batch ``x``: prefix-shared, else (fallback) repeated input."""
    b = x.shape[0]
    if state["mode"] == "shared":
        err: Exception | None = None
        try:
            out = model(x)
            if out.shape[0] == n * b:
                return out
        except RuntimeError as exc:
            err = exc
        if mode == "shared":
            raise RuntimeError("prefix-shared lesions failed: the model re-uses tensors from before z_module "
                               "(use mode='repeat')") from err
        state["mode"] = "repeat"
    return model(x.repeat((n,) + (1,) * (x.dim() - 1)))


def lesion_test(model: nn.Module, loader_or_batches: Iterable[Any], z_module: str | nn.Module,
                sets: Sequence[Tensor], num_classes: int, device: Any = None, *, max_images: int = 8192,
                mode: str = "auto") -> Tensor:
    """Per-class correct counts ``(n_sets + 1, num_classes)`` (int64); row 0 is the unlesioned net (§2.6).

    Prefix sharing (§8): each batch runs through the model once per chunk of sets; a forward hook on
    ``z_module`` replaces its output ``z (B, C, ...)`` with the stack of masked copies ``(n * B, C, ...)``, so
    modules before ``z_module`` see ``B`` images and the suffix ``n * B``.  ``max_images`` bounds ``n * B`` (all
    ``1 + n_sets`` masks in one chunk when they fit).  ``mode="auto"`` falls back to repeating the input
    (``"repeat"``) when the suffix cannot take the larger batch (e.g. a residual skip around ``z_module``).
    Batches are ``(x, y, ...)`` tuples (or dicts with ``x``/``y``); the model runs in eval mode without
    gradients and its train mode is restored.
    """
    return _lesion_counts(model, loader_or_batches, z_module, sets, num_classes, device,
                          max_images=max_images, mode=mode)[0]


def lesion_test_naive(model: nn.Module, loader_or_batches: Iterable[Any], z_module: str | nn.Module,
                      sets: Sequence[Tensor], num_classes: int, device: Any = None) -> Tensor:
    """Reference for :func:`lesion_test`: one full pass per set with :func:`lesion_hook` (tests only)."""
    module = model.get_submodule(z_module) if isinstance(z_module, str) else z_module
    if device is None:
        device = next(iter(model.parameters())).device
    batches = list(loader_or_batches)
    counts = torch.zeros(len(sets) + 1, num_classes, dtype=torch.long)
    with torch.no_grad(), eval_mode(model):
        for i, s in enumerate([None, *sets]):
            ctx = contextlib.nullcontext() if s is None else lesion_hook(module, s)
            with ctx:
                for batch in batches:
                    x, y = _split_batch(batch)
                    pred = model(x.to(device)).argmax(1).cpu()
                    y = y.long().cpu()
                    counts[i] += torch.bincount(y[pred == y], minlength=num_classes)[:num_classes]
    return counts


# ----------------------------------------------------------------------------------------------------------
# Sets, eligibility, statistics (§2.6)
# ----------------------------------------------------------------------------------------------------------


def random_sets(candidates: Any, size: int, n_random: int, generator: torch.Generator) -> list[Tensor]:
    """``n_random`` sets of ``size`` units drawn without replacement from ``candidates`` (§2.6 null).

    ``candidates`` are the layer's non-isolated unit indices; each set is returned sorted (int64).
    """
    cand = _as_index(candidates)
    if size > cand.numel():
        raise ValueError(f"set size {size} exceeds the {cand.numel()} candidate units")
    return [cand[torch.randperm(cand.numel(), generator=generator)[:size]].sort().values for _ in range(n_random)]


def eligible(size: int, n_nonisolated: int, min_size: int = 2, max_prop: float = 0.99) -> bool:
    """Eligibility of a set: ``min_size <= size <= max_prop * n_nonisolated`` (§2.6; §2.7 uses 5 / 0.75)."""
    return min_size <= size <= max_prop * n_nonisolated


def eligible_layers(graph: WeightGraph, skip_first_last: bool = False) -> list[int]:
    """Lesion layers (§2.6): an MLP's hidden groups (no input, no logits); a CNN's conv groups, all of them
    unless ``skip_first_last`` (the reference's ImageNet path)."""
    layers = list(range(len(graph.layer_sizes)))
    if graph.kind == "mlp":
        layers = layers[1:-1]
    elif skip_first_last:
        layers = layers[1:-1]
    return layers


def layer_clusters(graph: WeightGraph, labels: Any, layer: int) -> dict[int, Tensor]:
    """``{cluster: local unit indices}`` of one layer from the global node labels (``-1`` and isolated nodes
    are left out)."""
    labels = np.asarray(labels)
    sl = graph.layer_slice(layer)
    lab = labels[sl]
    iso = graph.isolated[sl]
    out = {}
    for c in np.unique(lab[(lab >= 0) & ~iso]):
        out[int(c)] = torch.as_tensor(np.flatnonzero((lab == c) & ~iso), dtype=torch.long)
    return out


def _range(delta: np.ndarray) -> float:
    md = float(np.mean(delta))
    if abs(md) < RANGE_EPS:
        return math.nan
    return float((np.max(delta) - np.min(delta)) / abs(md))


def _effect(t: float, rbar: float) -> float:
    d = t + rbar
    if not (math.isfinite(t) and math.isfinite(rbar)) or d == 0:
        return math.nan
    return t / d


def subcluster_importance(acc0: Any, acc_true: Any, acc_random: Any) -> dict[str, float]:
    """Statistics of one sub-cluster (§2.6) from per-class accuracies.

    Args:
        acc0: ``(K,)`` unlesioned accuracies; acc_true: ``(K,)`` after lesioning ``S``; acc_random:
            ``(n_r, K)`` after each random set.

    Returns ``m`` (mean accuracy after the lesion), ``mean_delta``, ``range`` (ptp(Δ)/|mean Δ|, NaN when
    ``|mean Δ| < 1e-12``), ``p_mean`` (left-sided, strict), ``p_range`` (right-sided, strict; NaN random
    ranges are dropped from the null, NaN when ``range`` is NaN), ``e_mean`` (``t/(t + r̄)`` on mean Δ, 0
    unless both negative), ``e_range`` (on ranges, NaN if undefined), ``n_random``.
    """
    a0 = np.asarray(acc0, dtype=np.float64)
    at = np.asarray(acc_true, dtype=np.float64)
    ar = np.asarray(acc_random, dtype=np.float64).reshape(-1, a0.size)
    m_true, m_rand = float(at.mean()), ar.mean(axis=1)
    d_true, d_rand = at - a0, ar - a0[None]
    t_mean, r_mean = float(d_true.mean()), d_rand.mean(axis=1)
    rng_true = _range(d_true)
    rng_rand = np.array([_range(d) for d in d_rand])
    valid = rng_rand[np.isfinite(rng_rand)]
    p_range = math.nan if not math.isfinite(rng_true) else percentile_right(rng_true, valid)
    rbar = float(r_mean.mean()) if r_mean.size else math.nan
    e_mean = _effect(t_mean, rbar) if (t_mean < 0 and rbar < 0) else 0.0
    e_range = _effect(rng_true, float(valid.mean()) if valid.size else math.nan)
    return {"m": m_true, "mean_delta": t_mean, "range": rng_true, "p_mean": percentile_left(m_true, m_rand),
            "p_range": p_range, "e_mean": e_mean, "e_range": e_range, "n_random": int(ar.shape[0])}


def _fisher(p: Sequence[float], n_random: int) -> tuple[float, float]:
    v = np.asarray([q for q in p if np.isfinite(q)], dtype=np.float64)
    if v.size == 0:
        return math.nan, math.nan
    res = fisher_combine(v, n_random=n_random)
    return float(res.pvalue), float(res.fisher_stat)


def summarize_importance(rows: Sequence[dict[str, Any]], n_random: int = 19) -> dict[str, float]:
    """Per-network summary (§2.6, §5): shifted Fisher p of ``p_mean`` and ``p_range`` (NaN dropped),
    ``fisher_stat`` = mean(-ln p') of ``p_mean``, effects reported as 2 x mean ± 2 x SEM over sub-clusters,
    ``frac_min_p_mean`` = share of sub-clusters at the minimum ``1/(n_r+1)``, ``n_eligible``."""
    pm = [r["p_mean"] for r in rows]
    pr = [r["p_range"] for r in rows]
    fp_mean, fstat = _fisher(pm, n_random)
    fp_range, fstat_range = _fisher(pr, n_random)
    em, em_sem = mean_sem([r["e_mean"] for r in rows], scale=2)
    er, er_sem = mean_sem([r["e_range"] for r in rows], scale=2)
    pmin = 1.0 / (n_random + 1)
    return {"fisher_p_mean": fp_mean, "fisher_p_range": fp_range, "fisher_stat": fstat,
            "fisher_stat_range": fstat_range, "effect_mean": em, "effect_mean_sem": em_sem,
            "effect_range": er, "effect_range_sem": er_sem,
            "frac_min_p_mean": float(np.mean([abs(p - pmin) < 1e-12 for p in pm])) if pm else math.nan,
            "n_eligible": len(rows)}


def _per_class_acc(counts: Tensor, totals: Tensor) -> np.ndarray:
    present = totals > 0
    return (counts[:, present].double() / totals[present].double()).cpu().numpy()


def importance(model: nn.Module, graph: WeightGraph, labels: Any, loader: Iterable[Any], num_classes: int, *,
               n_random: int = 19, min_size: int = 2, max_prop: float = 0.99, seed: int = 0,
               device: Any = None, skip_first_last: bool = False, max_images: int = 8192,
               target: str = "output") -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Lesion importance of every eligible sub-cluster of a partition (§2.6).

    ``target``: ``"output"`` (project default) zeroes the units' ``z`` (the BN output where BN follows the
    layer; with ReLU the unit then outputs 0); ``"weights"`` zeroes the layer's own output, which equals the
    reference's zeroing of the incoming weights and bias: a BN after it then outputs the constant
    ``beta - gamma mu / sigma`` instead of 0. On layers without BN the two are the same.

    ``labels`` are the global node labels of ``graph`` (``-1`` = removed).  For each eligible layer
    (:func:`eligible_layers`) and cluster ``S`` (isolated units excluded) with ``eligible(|S|, n', min_size,
    max_prop)``, ``n_random`` random same-size sets are drawn from the layer's non-isolated units; all sets of a
    layer are evaluated in one prefix-shared :func:`lesion_test` over ``loader`` (iterated once per layer, so
    it must be re-iterable).  Per-class accuracies use the classes present in the data.  Randomness: one
    ``SeedSequence(seed)`` child per layer, one child of that per cluster label -> ``torch.Generator``.

    Returns ``(rows, summary)``; rows hold layer, layer_index, cluster, size, layer_size, n_nonisolated,
    acc_before, acc_after, mean_delta, p_mean, range, p_range, e_mean, e_range; summary is
    :func:`summarize_importance`.
    """
    if target not in ("output", "weights"):
        raise ValueError(f"lesion target must be 'output' or 'weights', got {target!r}")
    labels = np.asarray(labels)
    layers = eligible_layers(graph, skip_first_last)
    layer_seeds = np.random.SeedSequence(seed).spawn(len(graph.layer_sizes))
    iso = graph.isolated
    rows: list[dict[str, Any]] = []
    for layer in layers:
        sl = graph.layer_slice(layer)
        cand = torch.as_tensor(np.flatnonzero(~iso[sl]), dtype=torch.long)
        clusters = layer_clusters(graph, labels, layer)
        todo = [(c, s) for c, s in clusters.items() if eligible(len(s), len(cand), min_size, max_prop)]
        if not todo:
            continue
        n_seeds = max(c for c, _ in todo) + 1
        seeds = seed_sequence_ints(layer_seeds[layer], n_seeds)
        sets: list[Tensor] = []
        for c, s in todo:
            gen = torch.Generator().manual_seed(seeds[c])
            sets.append(s)
            sets.extend(random_sets(cand, len(s), n_random, gen))
        module = graph.z_modules[layer] if target == "output" else graph.layer_names[layer]
        counts, totals = _lesion_counts(model, loader, module, sets, num_classes, device, max_images=max_images)
        acc = _per_class_acc(counts, totals)
        acc0 = acc[0]
        for i, (c, s) in enumerate(todo):
            base = 1 + i * (n_random + 1)
            st = subcluster_importance(acc0, acc[base], acc[base + 1:base + 1 + n_random])
            rows.append({"layer": graph.layer_names[layer], "layer_index": int(layer), "cluster": int(c),
                         "size": int(len(s)), "layer_size": int(graph.layer_sizes[layer]),
                         "n_nonisolated": int(len(cand)), "acc_before": float(acc0.mean()),
                         "acc_after": st["m"], "mean_delta": st["mean_delta"], "p_mean": st["p_mean"],
                         "range": st["range"], "p_range": st["p_range"], "e_mean": st["e_mean"],
                         "e_range": st["e_range"]})
    return rows, summarize_importance(rows, n_random)


# ----------------------------------------------------------------------------------------------------------
# Dataset-example coherence (§2.7, first bullet)
# ----------------------------------------------------------------------------------------------------------


def label_entropy(targets: Tensor) -> float:
    """Entropy (natural log) of the label histogram of ``targets``."""
    _, cnt = torch.unique(targets.reshape(-1), return_counts=True)
    q = cnt.double() / cnt.sum()
    return float(-(q * q.log()).sum())


def _top_entropy(scores: Tensor, targets: Tensor, units: Tensor, top_n: int, skip_first: bool) -> float:
    s = scores[:, units].abs().sum(dim=1)
    order = torch.argsort(s, descending=True, stable=True)
    top = order[1:top_n + 1] if skip_first else order[:top_n]
    return label_entropy(targets[top])


def dataset_coherence(unit_scores: Tensor, targets: Tensor, sets: Sequence[Any], *, top_n: int = 10,
                      skip_first: bool = False, n_random: int = 19, min_size: int = 5, max_prop: float = 0.75,
                      seed: int = 0, candidates: Any = None) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Dataset-example coherence of sub-clusters of one layer (§2.7 first bullet).

    ``unit_scores (N, n_units)`` are the layer's unit values on the probe images (``X`` of §2.3); the score of
    image ``x`` for set ``S`` is ``sum_{u in S} |h_u(x)|``.  ``H_S`` is the entropy of the true labels of the
    ``top_n`` best-scoring images (ranks 1..n; ``skip_first`` uses ranks 2..n+1 as the reference).  Each
    eligible set (``min_size <= |S| <= max_prop * n_units``) is compared with ``n_random`` random same-size
    sets from ``candidates`` (default all units; pass the non-isolated ones): ``p = (1 + #{H_r < H_S})/(n_r+1)``
    (left-sided), ``effect = mean_r H_r / H_S`` (``inf`` when ``H_S = 0``).  Set ``i`` is seeded by child ``i``
    of ``SeedSequence(seed)``.

    Returns ``(rows, summary)``: rows hold set, size, entropy, random_entropy_mean, p, effect; summary holds
    ``fisher_p`` (shifted Fisher), ``fisher_stat``, ``effect`` / ``effect_sem`` (mean ± SEM of the finite
    effects; 1 = like random, larger = more coherent; not doubled), ``n_eligible``.
    """
    scores = torch.as_tensor(unit_scores).float()
    targets = torch.as_tensor(targets).long().reshape(-1).to(scores.device)
    n_units = scores.shape[1]
    cand = torch.arange(n_units) if candidates is None else _as_index(candidates)
    seeds = seed_sequence_ints(seed, len(sets)) if len(sets) else []
    rows: list[dict[str, Any]] = []
    for i, s in enumerate(sets):
        s = _as_index(s)
        if not eligible(len(s), n_units, min_size, max_prop):
            continue
        gen = torch.Generator().manual_seed(seeds[i])
        h_s = _top_entropy(scores, targets, s, top_n, skip_first)
        h_r = np.array([_top_entropy(scores, targets, r, top_n, skip_first)
                        for r in random_sets(cand, len(s), n_random, gen)])
        effect = math.inf if h_s == 0 else float(h_r.mean() / h_s)
        rows.append({"set": i, "size": int(len(s)), "entropy": h_s, "random_entropy_mean": float(h_r.mean()),
                     "p": percentile_left(h_s, h_r), "effect": effect})
    fp, fstat = _fisher([r["p"] for r in rows], n_random)
    eff, eff_sem = mean_sem([r["effect"] for r in rows])
    return rows, {"fisher_p": fp, "fisher_stat": fstat, "effect": eff, "effect_sem": eff_sem,
                  "n_eligible": len(rows)}
