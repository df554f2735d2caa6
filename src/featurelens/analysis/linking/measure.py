"""Linking in Style: a linear map from classifier features to generator latents (spec ``shared/spec/linking.md``).

Background: Wehrheim, Osuna-Vargas and Kaschube, "Linking in Style" (arXiv 2409.16865). Re-implemented from the
spec; nothing is copied from the authors' code.

Pieces (spec section in brackets):

* **Fit** (§3): :class:`LinkingStats` streams float64 sums ``n, sum r, sum w, sum w^2, R^T R, R^T W`` as a
  sum-reduced ``torchmetrics.Metric`` (DDP-exact); :meth:`LinkingStats.solve` gives a :class:`LinkingMap`
  ``w_hat = A r + b`` (OLS rank-revealing minimum norm for ``alpha = 0``, ridge otherwise, intercept never
  penalised). :func:`fit_linking_map` is the one-shot form; :func:`r2_scores`, :func:`mse` score it;
  :func:`fit_mlp_baseline` is the optional non-linear baseline.
* **Pairs** (§3): :func:`build_pairs` draws one unique seed per latent (``seed_base + c * seed_stride + k``),
  keeps a pair iff the classifier predicts its class and stops at ``n_per_class`` kept or ``max_draws`` draws.
  :class:`FeatureExtractor` returns ``(r, logits)`` in one forward by hooking the input of the final Linear.
* **Units** (§4): :func:`activation_ranges`, :func:`unit_sweep`, :func:`sweep_units` (per (unit, sample)
  change vectors: classifier side, whole image, per part), :func:`summarise_units`, :func:`selectivity`,
  :func:`fidelity_rate`; image measures :func:`luminance_map`, :func:`local_entropy`, :func:`part_measures`.
* **Counterfactuals** (§5): :func:`counterfactual`.

Plain torch / numpy / pandas; this module does not import Lightning.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import Metric

from featurelens.analysis.hooks import capture_head_input, eval_mode, find_head, record_outputs
from featurelens.models.generators.base import PART_NAMES

__all__ = [
    "LinkingStats",
    "LinkingMap",
    "fit_linking_map",
    "r2_scores",
    "mse",
    "evaluate_map",
    "fit_mlp_baseline",
    "PairSet",
    "pair_seeds",
    "build_pairs",
    "FeatureExtractor",
    "activation_ranges",
    "unit_sweep",
    "luminance_map",
    "centre_crop",
    "grey_levels",
    "local_entropy",
    "disk_offsets",
    "ellipse_stats",
    "part_measures",
    "sweep_units",
    "summarise_units",
    "selectivity",
    "fidelity_rate",
    "CounterfactualResult",
    "counterfactual",
    "PART_MEASURES",
    "IMAGE_MEASURES",
    "CLASSIFIER_MEASURES",
    "part_column",
]

Encode = Callable[[Tensor], "Tensor | tuple[Tensor, Tensor]"]


# --------------------------------------------------------------------------------------------------------------
# Fit (§3)
# --------------------------------------------------------------------------------------------------------------
class LinkingMap(nn.Module):
    """``w_hat = r @ coef.T + intercept``: the linking map L (spec §3). Differentiable in ``r``.

    Args:
        coef: ``(m, d)`` matrix A. intercept: ``(m,)`` vector b.
        alpha: ridge strength used for the fit (0 = OLS). rank: numerical rank of the centred Gram (OLS).
        meta: free-form metadata (saved by :meth:`save`).

    ``coef``/``intercept`` are buffers (no gradients); ``forward`` computes in the input's dtype.
    """

    def __init__(
        self, coef: Tensor, intercept: Tensor, alpha: float = 0.0, rank: int | None = None, meta: dict | None = None
    ) -> None:
        super().__init__()
        coef, intercept = torch.as_tensor(coef), torch.as_tensor(intercept)
        if coef.dim() != 2 or intercept.shape != (coef.shape[0],):
            raise ValueError(
                f"LinkingMap: need coef (m, d) and intercept (m,), got {tuple(coef.shape)} and {tuple(intercept.shape)}"
            )
        self.register_buffer("coef", coef.detach().clone())
        self.register_buffer("intercept", intercept.detach().clone())
        self.alpha = float(alpha)
        self.rank = None if rank is None else int(rank)
        self.meta: dict[str, Any] = dict(meta or {})

    @property
    def in_dim(self) -> int:
        return int(self.coef.shape[1])

    @property
    def out_dim(self) -> int:
        return int(self.coef.shape[0])

    def forward(self, r: Tensor) -> Tensor:
        """``(n, d)`` (or ``(d,)``) features -> ``(n, m)`` (or ``(m,)``) latents."""
        return F.linear(r, self.coef.to(device=r.device, dtype=r.dtype), self.intercept.to(r.device, r.dtype))

    def save(self, path: str | Path, **meta: Any) -> Path:
        """Write an ``.npz`` (no pickle): ``coef``, ``intercept``, ``alpha``, ``rank`` and ``self.meta | meta``.

        Metadata values must be scalars, strings, or lists/arrays of numbers or strings (e.g. ``layer``,
        ``classes``, ``psi``, ``seeds``, ``n_pairs``, ``keep_rates``, ``generator_hash``); ``None`` is skipped.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays: dict[str, np.ndarray] = {
            "coef": self.coef.detach().cpu().numpy(),
            "intercept": self.intercept.detach().cpu().numpy(),
            "alpha": np.asarray(self.alpha),
            "rank": np.asarray(-1 if self.rank is None else self.rank),
        }
        for key, value in {**self.meta, **meta}.items():
            if value is None:
                continue
            if key in arrays:
                raise ValueError(f"LinkingMap.save: metadata key {key!r} is reserved ({sorted(arrays)})")
            arr = value.detach().cpu().numpy() if isinstance(value, Tensor) else np.asarray(value)
            if arr.dtype == object:
                raise ValueError(
                    f"LinkingMap.save: metadata {key!r} has type {type(value).__name__}; use numbers, strings or "
                    "lists/arrays of them (npz without pickle)"
                )
            arrays[key] = arr
        with open(path, "wb") as fh:
            np.savez(fh, **arrays)
        return path

    @classmethod
    def load(cls, path: str | Path) -> LinkingMap:
        """Read a map written by :meth:`save` (``allow_pickle=False``); extra keys land in ``meta``."""
        with np.load(Path(path), allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
        rank = int(data.pop("rank"))
        coef, intercept, alpha = data.pop("coef"), data.pop("intercept"), float(data.pop("alpha"))
        meta = {k: (v.item() if v.ndim == 0 else v) for k, v in data.items()}
        return cls(torch.from_numpy(coef), torch.from_numpy(intercept), alpha, None if rank < 0 else rank, meta)


class LinkingStats(Metric):
    """Streaming float64 sufficient statistics of the linking fit (spec §3), sum-reduced across processes.

    States: ``n`` (scalar), ``sum_r`` ``(d,)``, ``sum_w`` ``(m,)``, ``sum_ww`` ``(m,)`` (per-dimension sum of
    squares, for the training MSE/R²), ``rtr`` ``(d, d)`` = RᵀR, ``rtw`` ``(d, m)`` = RᵀW.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = None

    def __init__(self, r_dim: int, w_dim: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if r_dim < 1 or w_dim < 1:
            raise ValueError(f"LinkingStats: need r_dim >= 1 and w_dim >= 1, got {r_dim}, {w_dim}")
        self.r_dim, self.w_dim = int(r_dim), int(w_dim)
        f64 = torch.float64
        self.add_state("n", torch.zeros((), dtype=f64), dist_reduce_fx="sum")
        self.add_state("sum_r", torch.zeros(r_dim, dtype=f64), dist_reduce_fx="sum")
        self.add_state("sum_w", torch.zeros(w_dim, dtype=f64), dist_reduce_fx="sum")
        self.add_state("sum_ww", torch.zeros(w_dim, dtype=f64), dist_reduce_fx="sum")
        self.add_state("rtr", torch.zeros(r_dim, r_dim, dtype=f64), dist_reduce_fx="sum")
        self.add_state("rtw", torch.zeros(r_dim, w_dim, dtype=f64), dist_reduce_fx="sum")

    def update(self, r: Tensor, w: Tensor) -> None:
        """Add ``(B, d)`` features and their ``(B, m)`` latents (any float dtype)."""
        r = r.detach().reshape(r.shape[0], -1).to(device=self.rtr.device, dtype=torch.float64)
        w = w.detach().reshape(w.shape[0], -1).to(device=self.rtr.device, dtype=torch.float64)
        if r.shape[1] != self.r_dim or w.shape[1] != self.w_dim or r.shape[0] != w.shape[0]:
            raise ValueError(
                f"LinkingStats: expected r (B, {self.r_dim}) and w (B, {self.w_dim}), "
                f"got {tuple(r.shape)} and {tuple(w.shape)}"
            )
        self.n += r.shape[0]
        self.sum_r += r.sum(0)
        self.sum_w += w.sum(0)
        self.sum_ww += (w * w).sum(0)
        self.rtr += r.T @ r
        self.rtw += r.T @ w

    def compute(self) -> dict[str, Tensor]:
        """The (synced) states as a dict."""
        return {k: getattr(self, k) for k in ("n", "sum_r", "sum_w", "sum_ww", "rtr", "rtw")}

    def centred(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(C_rr, C_rw, r_mean, w_mean)`` on CPU float64: centred Gram R̃ᵀR̃, cross term R̃ᵀW̃ and the means."""
        n = float(self.n)
        if n < 1:
            raise ValueError("LinkingStats: no pairs accumulated (n = 0); cannot fit the linking map")
        s = {k: v.detach().cpu().to(torch.float64) for k, v in self.compute().items()}
        r_mean, w_mean = s["sum_r"] / n, s["sum_w"] / n
        c_rr = s["rtr"] - n * torch.outer(r_mean, r_mean)
        c_rr = (c_rr + c_rr.T) / 2
        c_rw = s["rtw"] - n * torch.outer(r_mean, w_mean)
        return c_rr, c_rw, r_mean, w_mean

    def solve(self, alpha: float = 0.0, rcond: float | None = None) -> LinkingMap:
        """Fit ``w_hat = A r + b`` (spec §3) on CPU in float64.

        ``alpha = 0``: minimum-norm least squares through the eigendecomposition of the centred Gram, discarding
        eigenvalues below ``rcond * lambda_max`` (default ``rcond = 1000 * d * eps``); dead or collinear units
        get zero weight and ``map.rank`` reports the numerical rank. ``alpha > 0``: ridge
        ``(C_rr + alpha I) A^T = C_rw``. Always ``b = w_mean - A r_mean`` (unpenalised intercept).
        """
        alpha = float(alpha)
        if not alpha >= 0 or not math.isfinite(alpha):
            raise ValueError(f"LinkingStats.solve: alpha must be a finite number >= 0, got {alpha}")
        c_rr, c_rw, r_mean, w_mean = self.centred()
        d = c_rr.shape[0]
        if alpha == 0:
            evals, evecs = torch.linalg.eigh(c_rr)
            lam_max = float(evals.max()) if d else 0.0
            tol = lam_max * (rcond if rcond is not None else 1000.0 * d * torch.finfo(torch.float64).eps)
            keep = evals > max(tol, 0.0) if lam_max > 0 else torch.zeros_like(evals, dtype=torch.bool)
            v = evecs[:, keep]
            at = v @ ((v.T @ c_rw) / evals[keep][:, None])  # (d, m)
            rank = int(keep.sum())
        else:
            at = torch.linalg.solve(c_rr + alpha * torch.eye(d, dtype=c_rr.dtype), c_rw)
            rank = int(torch.linalg.matrix_rank(c_rr)) if d else 0
        coef = at.T.contiguous()
        intercept = w_mean - coef @ r_mean
        return LinkingMap(coef, intercept, alpha=alpha, rank=rank, meta={"n_pairs": int(float(self.n))})

    def train_scores(self, lmap: LinkingMap) -> dict[str, float]:
        """Training ``mse``, ``r2_mean`` and ``r2_pooled`` of ``lmap`` from the sums alone (no data pass)."""
        n = float(self.n)
        s = {k: v.detach().cpu().to(torch.float64) for k, v in self.compute().items()}
        A, b = lmap.coef.cpu().to(torch.float64), lmap.intercept.cpu().to(torch.float64)
        # per-dimension residual sum of squares: sum (w_j - a_j r - b_j)^2
        ss_res = (
            s["sum_ww"]
            - 2 * (A * s["rtw"].T).sum(1)
            - 2 * b * s["sum_w"]
            + ((A @ s["rtr"]) * A).sum(1)
            + 2 * b * (A @ s["sum_r"])
            + n * b * b
        ).clamp_min(0)
        ss_tot = (s["sum_ww"] - s["sum_w"] ** 2 / n).clamp_min(0)
        r2 = _r2_from_ss(ss_res, ss_tot)
        pooled = 1 - float(ss_res.sum() / ss_tot.sum()) if float(ss_tot.sum()) > 0 else float("nan")
        return {"mse": float(ss_res.sum() / (n * A.shape[0])), "r2_mean": float(r2.mean()), "r2_pooled": pooled}


def fit_linking_map(r: Tensor, w: Tensor, alpha: float = 0.0, rcond: float | None = None) -> LinkingMap:
    """One-shot fit on ``(n, d)`` features and ``(n, m)`` latents (see :meth:`LinkingStats.solve`)."""
    stats = LinkingStats(r.reshape(r.shape[0], -1).shape[1], w.reshape(w.shape[0], -1).shape[1],
                         sync_on_compute=False)  # one process's pairs: no other rank to wait for
    stats.update(r, w)
    return stats.solve(alpha, rcond)


def _r2_from_ss(ss_res: Tensor, ss_tot: Tensor) -> Tensor:
    """sklearn's per-output R² with ``force_finite``: constant targets score 1 if fitted exactly, else 0."""
    safe = torch.where(ss_tot > 0, ss_tot, torch.ones_like(ss_tot))
    r2 = 1 - ss_res / safe
    return torch.where(ss_tot > 0, r2, torch.where(ss_res == 0, torch.ones_like(r2), torch.zeros_like(r2)))


def r2_scores(w_true: Tensor, w_pred: Tensor) -> tuple[float, float]:
    """``(r2_mean, r2_pooled)``: sklearn's ``uniform_average`` per-dimension R² and the variance-weighted R²."""
    wt, wp = w_true.detach().to(torch.float64), w_pred.detach().to(torch.float64)
    if wt.shape != wp.shape or wt.dim() != 2:
        raise ValueError(f"r2_scores: need equal (n, m) shapes, got {tuple(wt.shape)} and {tuple(wp.shape)}")
    ss_res = ((wt - wp) ** 2).sum(0)
    ss_tot = ((wt - wt.mean(0)) ** 2).sum(0)
    pooled = 1 - float(ss_res.sum() / ss_tot.sum()) if float(ss_tot.sum()) > 0 else float("nan")
    return float(_r2_from_ss(ss_res, ss_tot).mean()), pooled


def mse(w_true: Tensor, w_pred: Tensor) -> float:
    """Mean squared error over all entries."""
    return float(((w_true.detach().to(torch.float64) - w_pred.detach().to(torch.float64)) ** 2).mean())


def evaluate_map(lmap: nn.Module, r: Tensor, w: Tensor) -> dict[str, float]:
    """``{"r2_mean", "r2_pooled", "mse"}`` of any map ``r -> w_hat`` on held-out pairs."""
    with torch.no_grad():
        pred = lmap(r.to(torch.float64) if isinstance(lmap, LinkingMap) else r)
    r2m, r2p = r2_scores(w, pred)
    return {"r2_mean": r2m, "r2_pooled": r2p, "mse": mse(w, pred)}


def fit_mlp_baseline(
    r: Tensor, w: Tensor, hidden: int = 256, lr: float = 1e-3, steps: int = 500, seed: int = 0
) -> nn.Module:
    """The spec's MLP baseline (§3): Linear(d, hidden) -> ReLU -> Linear(hidden, m), full-batch Adam, ``steps``.

    Inputs are standardised inside the returned module (train statistics), so it maps raw ``r`` to ``w``.
    Runs with gradients enabled even inside ``inference_mode``.
    """
    with torch.inference_mode(False), torch.enable_grad():
        r32, w32 = r.detach().clone().float(), w.detach().clone().float()
        g = torch.Generator().manual_seed(int(seed))
        mu, sd = r32.mean(0), r32.std(0, unbiased=False).clamp_min(1e-6)
        net = nn.Sequential(nn.Linear(r32.shape[1], hidden), nn.ReLU(), nn.Linear(hidden, w32.shape[1]))
        for p in net.parameters():
            with torch.no_grad():
                p.copy_((torch.rand(p.shape, generator=g) * 2 - 1) / math.sqrt(p.shape[-1]))
        opt = torch.optim.Adam(net.parameters(), lr=lr)
        x = (r32 - mu) / sd
        for _ in range(int(steps)):
            opt.zero_grad()
            loss = F.mse_loss(net(x), w32)
            loss.backward()
            opt.step()
    return _Standardised(net.requires_grad_(False).eval(), mu, sd)


class _Standardised(nn.Module):
    def __init__(self, net: nn.Module, mu: Tensor, sd: Tensor) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mu", mu)
        self.register_buffer("sd", sd)

    def forward(self, r: Tensor) -> Tensor:
        return self.net((r.float() - self.mu) / self.sd)


# --------------------------------------------------------------------------------------------------------------
# Pairs (§3)
# --------------------------------------------------------------------------------------------------------------
@dataclass
class PairSet:
    """Training pairs. ``w`` ``(N, m)``, ``r`` ``(N, d)``, ``labels``/``seeds`` ``(N,)`` int64, in class then seed
    order; per selected class (aligned with ``classes``): ``keep_rate`` (kept / draws spent) and ``n_draws``
    (draws spent, ``<= max_draws``)."""

    w: Tensor
    r: Tensor
    labels: Tensor
    seeds: Tensor
    classes: list[int]
    keep_rate: Tensor
    n_draws: Tensor
    n_kept: Tensor
    max_draws: int

    def __len__(self) -> int:
        return int(self.labels.numel())


def pair_seeds(class_idx: int, k: Tensor | int, seed_base: int, seed_stride: int) -> Tensor:
    """The seed of draw ``k`` of class ``class_idx``: ``seed_base + class_idx * seed_stride + k``."""
    return seed_base + int(class_idx) * int(seed_stride) + torch.as_tensor(k, dtype=torch.int64)


def _check_pair_args(classes: Sequence[int], n_per_class: int, draw_factor: float, seed_stride: int | None) -> int:
    if n_per_class < 1:
        raise ValueError(f"build_pairs: n_per_class must be >= 1, got {n_per_class}")
    if draw_factor < 1:
        raise ValueError(f"build_pairs: draw_factor must be >= 1, got {draw_factor}")
    if len(set(int(c) for c in classes)) != len(classes) or not len(classes):
        raise ValueError(f"build_pairs: classes must be a non-empty list of distinct class indices, got {classes}")
    max_draws = int(math.ceil(draw_factor * n_per_class))
    if seed_stride is not None and seed_stride < max_draws:
        raise ValueError(
            f"build_pairs: seed_stride={seed_stride} < max_draws={max_draws} would reuse seeds across classes; "
            "use seed_stride >= draw_factor * n_per_class (or None for exactly that)"
        )
    return max_draws


def _encode(encode: Encode, classify: Callable[[Tensor], Tensor] | None, images: Tensor) -> tuple[Tensor, Tensor]:
    if classify is None:
        out = encode(images)
        if not isinstance(out, tuple) or len(out) != 2:
            raise ValueError("build_pairs: with classify=None, encode(images) must return (r, logits)")
        r, logits = out
    else:
        r, logits = encode(images), classify(images)
    return r.detach().reshape(images.shape[0], -1), logits.detach()


def _draw(generator: Any, c: int, seeds: Tensor, psi: float) -> Tensor:
    return torch.cat([generator.sample_w(1, int(c), psi, int(s)) for s in seeds.tolist()], dim=0)


def build_pairs(
    generator: Any,
    encode: Encode,
    classify: Callable[[Tensor], Tensor] | None,
    classes: Sequence[int],
    n_per_class: int,
    draw_factor: float = 20,
    seed_base: int = 0,
    psi: float = 0.7,
    seed_stride: int | None = None,
    batch_size: int = 64,
    keep_filter: bool = True,
) -> PairSet:
    """Draw, synthesise, classify and keep (spec §3, "Training pairs").

    For each class ``c`` draw ``k = 0, 1, ...`` uses its own seed ``seed_base + c * seed_stride + k`` (one
    ``generator.sample_w(1, c, psi, seed)`` per draw; ``seed_stride`` defaults to ``max_draws =
    ceil(draw_factor * n_per_class)``, so seeds never repeat within one call). A pair is kept iff
    ``argmax(logits) == c`` (always, with ``keep_filter=False``). Stops at ``n_per_class`` kept or
    ``max_draws`` draws spent. ``encode(images) -> r`` and ``classify(images) -> logits``; with
    ``classify=None`` ``encode`` returns ``(r, logits)`` (e.g. a :class:`FeatureExtractor`). The result does
    not depend on ``batch_size``.
    """
    max_draws = _check_pair_args(classes, n_per_class, draw_factor, seed_stride)
    stride = max_draws if seed_stride is None else int(seed_stride)
    out: dict[str, list[Tensor]] = {"w": [], "r": [], "labels": [], "seeds": []}
    keep_rates, draws, kept_counts = [], [], []
    for c in classes:
        kept, k = 0, 0
        while kept < n_per_class and k < max_draws:
            b = min(batch_size, max_draws - k)
            seeds = pair_seeds(c, torch.arange(k, k + b), seed_base, stride)
            w = _draw(generator, c, seeds, psi)
            with torch.no_grad():
                images = generator.synthesize(w)
            r, logits = _encode(encode, classify, images)
            keep = (logits.argmax(1).cpu() == c) if keep_filter else torch.ones(b, dtype=torch.bool)
            idx = torch.nonzero(keep).flatten()[: n_per_class - kept]
            if kept + idx.numel() >= n_per_class:
                k += int(idx[-1]) + 1  # draws spent up to the last one needed
            else:
                k += b
            kept += idx.numel()
            out["w"].append(w[idx].cpu())
            out["r"].append(r[idx].cpu())
            out["seeds"].append(seeds[idx])
            out["labels"].append(torch.full((idx.numel(),), int(c), dtype=torch.int64))
        keep_rates.append(kept / k if k else 0.0)
        draws.append(k)
        kept_counts.append(kept)
    return PairSet(
        w=torch.cat(out["w"]),
        r=torch.cat(out["r"]),
        labels=torch.cat(out["labels"]),
        seeds=torch.cat(out["seeds"]).to(torch.int64),
        classes=[int(c) for c in classes],
        keep_rate=torch.tensor(keep_rates, dtype=torch.float64),
        n_draws=torch.tensor(draws, dtype=torch.int64),
        n_kept=torch.tensor(kept_counts, dtype=torch.int64),
        max_draws=max_draws,
    )


class FeatureExtractor:
    """``images -> (r, logits)`` in one forward: ``r`` is the input of the head Linear (spec §2).

    Args:
        model: the classifier. head_module: dotted name of its final ``nn.Linear`` (``fc``, ``classifier.6``,
            ``head``; None: the model's last ``nn.Linear``). preprocess: optional callable applied to images first
            (eval preprocessing).

    Runs the model in eval mode under ``no_grad`` and restores every module's mode. ``weight``/``bias`` expose
    the head's parameters (detached); ``head_name`` is the head's module name.
    """

    def __init__(self, model: nn.Module, head_module: str | None = None,
                 preprocess: Callable[[Tensor], Tensor] | None = None):
        self.head_name, head = find_head(model, head_module=head_module)
        self.model, self.head, self.preprocess = model, head, preprocess

    @property
    def weight(self) -> Tensor:
        return self.head.weight.detach()

    @property
    def bias(self) -> Tensor:
        b = self.head.bias
        return torch.zeros(self.head.out_features, device=self.weight.device) if b is None else b.detach()

    def __call__(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """``(r, logits)`` of ``images``; raises ``ValueError`` when the head's output is not the model's output
        (a non-final layer: counterfactuals would read its units as class logits)."""
        with (torch.no_grad(), eval_mode(self.model), capture_head_input(self.head) as captured,
              record_outputs({"head": self.head}) as outputs):
            x = self.preprocess(images) if self.preprocess is not None else images
            logits = self.model(x)
        out = outputs["head"]  # a copy (record_outputs): compared by value
        if out.shape != logits.shape or not torch.equal(out, logits):
            raise ValueError(f"the {self.head.in_features} -> {self.head.out_features} nn.Linear is not the final "
                             f"layer: its output {tuple(out.shape)} is not the model's output {tuple(logits.shape)}; "
                             "name the layer that produces the class logits (null: the last nn.Linear)")
        return captured[-1], logits


def centre_crop(images: Tensor, fraction: float) -> Tensor:
    """The central ``round(fraction * side)`` pixels of ``(n, C, H, W)`` images (torchvision's centre crop;
    256 px at 224/256: the 224 px crop of the reference's Resize(256) + CenterCrop(224))."""
    from torchvision.transforms.v2 import functional as TF

    h, w = images.shape[-2:]
    return TF.center_crop(images, [max(1, round(h * fraction)), max(1, round(w * fraction))])


# --------------------------------------------------------------------------------------------------------------
# Unit quantification (§4)
# --------------------------------------------------------------------------------------------------------------
PART_MEASURES: tuple[str, ...] = (
    "area",
    "luminance",
    "entropy_mean",
    "entropy_std",
    "entropy_min",
    "entropy_max",
    "eccentricity",
    "orientation",
    "cx",
    "cy",
)
"""Per-part measures. ``cx``/``cy`` (centroid / width or height) extend the spec's list (positional concepts)."""
IMAGE_MEASURES: tuple[str, ...] = ("img_luminance", "img_entropy")
CLASSIFIER_MEASURES: tuple[str, ...] = ("d_logit", "d_softmax", "flip", "d_entropy", "fidelity", "leakage")


def part_column(part: str, measure: str) -> str:
    """Column name of a per-part measure in the change tables: ``f"{part}/{measure}"``."""
    return f"{part}/{measure}"


def activation_ranges(r_ref: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(mins, maxs, dead)`` over the reference set ``(n, d)``; ``dead = mins == maxs`` (spec §4.1)."""
    if r_ref.dim() != 2 or r_ref.shape[0] < 1:
        raise ValueError(f"activation_ranges: need (n >= 1, d) features, got {tuple(r_ref.shape)}")
    mins, maxs = r_ref.min(0).values, r_ref.max(0).values
    return mins, maxs, mins == maxs


def unit_sweep(r0: Tensor, unit: int, lo: float | Tensor, hi: float | Tensor, n_steps: int = 3) -> Tensor:
    """``(n_steps, d)``: ``r0`` repeated with unit ``unit`` replaced by ``linspace(lo, hi, n_steps)`` (§4.2)."""
    if n_steps < 2:
        raise ValueError(f"unit_sweep: n_steps must be >= 2, got {n_steps}")
    r0 = r0.reshape(-1)
    if not 0 <= unit < r0.numel():
        raise ValueError(f"unit_sweep: unit={unit} out of range 0..{r0.numel() - 1}")
    out = r0.detach().clone().repeat(n_steps, 1)
    out[:, unit] = torch.linspace(float(lo), float(hi), n_steps, dtype=r0.dtype, device=r0.device)
    return out


# The reference weighs RGB differently for its two measures (§4.3): luminance with ITU-R BT.601 weights, the
# grey image behind the local entropy with scikit-image's ``rgb2gray`` (BT.709) before ``img_as_ubyte``.
LUMINANCE_WEIGHTS = (0.299, 0.587, 0.114)
ENTROPY_GREY_WEIGHTS = (0.2125, 0.7154, 0.0721)


def _grey(x: Tensor, weights: tuple[float, float, float]) -> Tensor:
    """``(n, H, W)`` weighted sum of the RGB channels; a one-channel image is its own grey value."""
    return x[:, 0] if x.shape[1] == 1 else weights[0] * x[:, 0] + weights[1] * x[:, 1] + weights[2] * x[:, 2]


def luminance_map(images: Tensor) -> Tensor:
    """``(n, H, W)`` luminance ``(0.299 R + 0.587 G + 0.114 B) / 3`` on the 0-255 scale (range 0-85, §4.3)."""
    return _grey(images.to(torch.float64), LUMINANCE_WEIGHTS) * 255.0 / 3.0


def grey_levels(images: Tensor) -> Tensor:
    """``(n, H, W)`` int64 grey levels ``rint(255 * (0.2125 R + 0.7154 G + 0.0721 B))`` in 0..255: the
    reference's ``img_as_ubyte(rgb2gray(img))`` (round half to even, as ``numpy.rint``)."""
    grey = _grey(images.to(torch.float64).clamp(0, 1), ENTROPY_GREY_WEIGHTS)
    return torch.round(255.0 * grey).clamp(0, 255).to(torch.int64)


def disk_offsets(radius: int = 5) -> Tensor:
    """``(2r+1, 2r+1)`` float64 disk ``dx² + dy² <= r²`` (81 pixels for r = 5)."""
    ax = torch.arange(-radius, radius + 1)
    return ((ax[:, None] ** 2 + ax[None, :] ** 2) <= radius**2).to(torch.float64)


def local_entropy(grey: Tensor, radius: int = 5) -> Tensor:
    """``(n, H, W)`` float64 log2 Shannon entropy of the grey-level histogram in a disk around each pixel.

    ``grey``: ``(n, H, W)`` integer levels (e.g. :func:`grey_levels`). Windows at the border count only in-image
    pixels. Vectorised: one-hot over the levels present in each image, then one conv2d with the disk kernel.
    """
    if grey.dim() != 3:
        raise ValueError(f"local_entropy: grey must be (n, H, W), got {tuple(grey.shape)}")
    kernel = disk_offsets(radius).to(grey.device, torch.float32)[None, None]  # counts <= 81: exact in float32
    out = torch.empty(grey.shape, dtype=torch.float64, device=grey.device)
    for i in range(grey.shape[0]):
        levels, inv = torch.unique(grey[i], return_inverse=True)
        onehot = F.one_hot(inv, levels.numel()).permute(2, 0, 1).to(torch.float32)[:, None]  # (K, 1, H, W)
        counts = F.conv2d(onehot, kernel, padding=radius)[:, 0].to(torch.float64)  # (K, H, W)
        total = counts.sum(0, keepdim=True)
        p = counts / total
        out[i] = -(torch.where(p > 0, p * torch.log2(p.clamp_min(1e-300)), torch.zeros_like(p))).sum(0)
    return out


def ellipse_stats(mask: Tensor) -> tuple[float, float, float, float]:
    """``(eccentricity, orientation_deg, cx, cy)`` of a boolean ``(H, W)`` region from its image moments.

    Eccentricity ``sqrt(1 - lambda_min / lambda_max)`` of the second-order central moments; orientation in
    degrees in (-90, 90], angle of the major axis from the +x axis (x right, y down, so positive is clockwise
    on screen); centroid in pixel units (pixel centres at ``i + 0.5``). NaNs for an empty region.
    """
    ys, xs = torch.nonzero(mask, as_tuple=True)
    if ys.numel() == 0:
        return (math.nan,) * 4
    x, y = xs.to(torch.float64) + 0.5, ys.to(torch.float64) + 0.5
    cx, cy = float(x.mean()), float(y.mean())
    mu20, mu02, mu11 = float(((x - cx) ** 2).mean()), float(((y - cy) ** 2).mean()), float(((x - cx) * (y - cy)).mean())
    common = math.sqrt(((mu20 - mu02) / 2) ** 2 + mu11**2)
    lmax, lmin = (mu20 + mu02) / 2 + common, (mu20 + mu02) / 2 - common
    ecc = math.sqrt(max(0.0, 1 - lmin / lmax)) if lmax > 0 else 0.0
    theta = 0.5 * math.degrees(math.atan2(2 * mu11, mu20 - mu02))
    if theta <= -90:
        theta += 180
    return ecc, theta, cx, cy


def part_measures(images: Tensor, masks: Tensor | None, parts: Sequence[str] = PART_NAMES) -> dict[str, Tensor]:
    """Per image: whole-image luminance and mean local entropy, and with masks per part area, luminance,
    entropy mean/std/min/max, eccentricity, orientation, cx/cy (normalised by W/H). Dict of ``(n,)`` float64."""
    n, _, H, W = images.shape
    lum = luminance_map(images)
    ent = local_entropy(grey_levels(images))
    res = {"img_luminance": lum.mean((1, 2)), "img_entropy": ent.mean((1, 2))}
    if masks is None:
        return res
    for p_idx, part in enumerate(parts):
        cols = {m: torch.full((n,), math.nan, dtype=torch.float64) for m in PART_MEASURES}
        for i in range(n):
            m = masks[i] == p_idx
            a = int(m.sum())
            cols["area"][i] = a
            if a == 0:
                continue
            e = ent[i][m]
            cols["luminance"][i] = lum[i][m].mean()
            cols["entropy_mean"][i], cols["entropy_std"][i] = e.mean(), e.std(unbiased=False)
            cols["entropy_min"][i], cols["entropy_max"][i] = e.min(), e.max()
            ecc, ori, cx, cy = ellipse_stats(m)
            cols["eccentricity"][i], cols["orientation"][i] = ecc, ori
            cols["cx"][i], cols["cy"][i] = cx / W, cy / H
        for mname, v in cols.items():
            res[part_column(part, mname)] = v
    return res


def _wrap_angle(d: float) -> float:
    """Wrap a difference of orientations (degrees) to (-90, 90]."""
    return 90.0 - ((90.0 - d) % 180.0)


def _softmax_entropy(logits: Tensor) -> Tensor:
    logp = torch.log_softmax(logits.to(torch.float64), dim=1)
    return -(logp.exp() * logp).sum(1)


def sweep_units(
    generator: Any,
    linking_map: nn.Module,
    encode: Encode,
    classify: Callable[[Tensor], Tensor] | None,
    r_samples: Tensor,
    labels: Tensor,
    units: Sequence[int],
    mins: Tensor,
    maxs: Tensor,
    sigma: Tensor,
    n_steps: int = 3,
    num_ws: int | None = None,
    parts: Sequence[str] = PART_NAMES,
    min_part_area: float | None = None,
    keep_images: Sequence[int] = (),
) -> tuple[pd.DataFrame, dict[int, Tensor]]:
    """Sweep each live unit on each sample and measure the change from step 0 to the last step (spec §4.2-§4.4).

    Args:
        generator: frozen generator; ``synthesize_with_masks`` is used when present (per-part measures).
        linking_map: ``r -> w`` (e.g. :class:`LinkingMap`). encode/classify: as in :func:`build_pairs`.
        r_samples: ``(S, d)`` starting features; labels: ``(S,)`` their classes (the "sample's class").
        units: units to sweep; dead ones (``mins == maxs``) are skipped.
        mins, maxs: ``(d,)`` activation ranges; sigma: ``(d,)`` reference std (leakage; ``sigma = 0`` units are
            left out of leakage).
        num_ws: tile ``w`` to ``(n, num_ws, m)`` before synthesis when > 1 (StyleGAN-XL).
        min_part_area: drop a part when its mean area over the steps is below this (default
            ``max(1, 20 * H * W / 128**2)``).
        keep_images: units whose ``(S, n_steps, 3, H, W)`` sweep images are returned.

    Returns:
        A DataFrame, one row per (unit, sample): ``unit, sample, label``, classifier measures ``d_logit,
        d_softmax, flip, d_entropy, fidelity, leakage, top5`` (``;``-joined unit ids), whole-image ``img_luminance``
        (Δ/85) and ``img_entropy`` (raw Δ), and per part ``part/area`` (Δ/step-0 area), ``part/luminance`` (Δ/85),
        entropy Δs, ``part/eccentricity``, ``part/orientation`` (wrapped to (-90, 90]), ``part/cx``, ``part/cy``
        (NaN for dropped parts); with ``n_steps > 3`` also ``fidelity_rho`` (Spearman). And the kept images.
    """
    mins, maxs, sigma = mins.reshape(-1), maxs.reshape(-1), sigma.reshape(-1)
    dead = mins == maxs
    live_units = [int(u) for u in units if not bool(dead[int(u)])]
    has_masks = hasattr(generator, "synthesize_with_masks") and getattr(generator, "has_masks", True)
    rows: list[dict[str, Any]] = []
    images_out: dict[int, Tensor] = {}
    for u in live_units:
        kept: list[Tensor] = []
        for s in range(r_samples.shape[0]):
            rs = unit_sweep(r_samples[s], u, mins[u], maxs[u], n_steps)
            with torch.no_grad():
                w = linking_map(rs)
                wt = w[:, None].expand(-1, num_ws, -1) if num_ws and num_ws > 1 else w
                if has_masks:
                    images, masks = generator.synthesize_with_masks(wt)
                else:
                    images, masks = generator.synthesize(wt), None
                r_new, logits = _encode(encode, classify, images)
            if u in keep_images:
                kept.append(images.detach().cpu())
            rows.append(
                _change_row(u, s, int(labels[s]), r_new.cpu(), logits.cpu(), images.cpu(), masks, sigma, parts,
                            min_part_area, n_steps)
            )
        if kept:
            images_out[u] = torch.stack(kept)
    return pd.DataFrame(rows), images_out


def _change_row(u, s, label, r_new, logits, images, masks, sigma, parts, min_part_area, n_steps) -> dict[str, Any]:
    H, W = images.shape[-2:]
    row: dict[str, Any] = {"unit": u, "sample": s, "label": label}
    lg = logits.to(torch.float64)
    sm = torch.softmax(lg, 1)
    ent = _softmax_entropy(lg)
    row["d_logit"] = float(lg[-1, label] - lg[0, label])
    row["d_softmax"] = float(sm[-1, label] - sm[0, label])
    row["flip"] = float(lg[-1].argmax() != lg[0].argmax())
    row["d_entropy"] = float(ent[-1] - ent[0])
    dr = (r_new[-1] - r_new[0]).to(torch.float64)
    row["fidelity"] = float(dr[u])
    sig = sigma.to(torch.float64).cpu()
    others = torch.ones_like(dr, dtype=torch.bool)
    others[u] = False
    others &= sig > 0
    z = torch.where(others, dr.abs() / torch.where(sig > 0, sig, torch.ones_like(sig)), torch.zeros_like(dr))
    row["leakage"] = float(z[others].mean()) if bool(others.any()) else math.nan
    top = torch.argsort(z, descending=True, stable=True)[: min(5, int(others.sum()))]
    row["top5"] = ";".join(str(int(j)) for j in top)
    if n_steps > 3:
        from scipy.stats import spearmanr

        row["fidelity_rho"] = float(spearmanr(np.arange(n_steps), r_new[:, u].numpy()).statistic)
    meas = part_measures(images, None if masks is None else masks.cpu(), parts)
    row["img_luminance"] = float(meas["img_luminance"][-1] - meas["img_luminance"][0]) / 85.0
    row["img_entropy"] = float(meas["img_entropy"][-1] - meas["img_entropy"][0])
    if masks is None:
        return row
    thr = max(1.0, 20.0 * H * W / 128**2) if min_part_area is None else float(min_part_area)
    for part in parts:
        area = meas[part_column(part, "area")]
        drop = float(area.mean()) < thr
        for m in PART_MEASURES:
            v = meas[part_column(part, m)]
            d = float(v[-1] - v[0])
            if drop or math.isnan(d):
                d = math.nan
            elif m == "area":  # relative to the step-0 area; a part absent at step 0 keeps the raw change,
                d = d / float(area[0]) if float(area[0]) > 0 else d  # as the reference (divisor 0 -> 1)
            elif m == "luminance":
                d = d / 85.0
            elif m == "orientation":
                d = _wrap_angle(d)
            row[part_column(part, m)] = d
    return row


def summarise_units(changes: pd.DataFrame) -> pd.DataFrame:
    """Per unit: the mean over samples of every numeric change column, plus ``<col>:sign``, the fraction of
    samples whose sign agrees with the mean's sign (spec §4.4), and ``n_samples``."""
    if changes.empty:
        return pd.DataFrame(columns=["unit"])
    skip = {"unit", "sample", "label", "top5"}
    cols = [c for c in changes.columns if c not in skip and pd.api.types.is_numeric_dtype(changes[c])]
    g = changes.groupby("unit", sort=True)
    mean = g[cols].mean()
    sign = changes[cols].apply(np.sign).assign(unit=changes["unit"])
    agree = sign.groupby("unit").apply(lambda df: (df[cols] == np.sign(mean.loc[df.name, cols])).mean())
    agree.columns = [f"{c}:sign" for c in cols]
    out = pd.concat([mean, agree], axis=1)
    out["n_samples"] = g.size()
    return out.reset_index()


def _modified_z(x: np.ndarray) -> np.ndarray:
    """Iglewicz-Hoaglin modified z; with MAD = 0 falls back to ``(x - med) / (1.253314 * meanAD)``; NaN stays
    NaN; a column without spread gives 0."""
    out = np.full_like(x, np.nan, dtype=np.float64)
    ok = ~np.isnan(x)
    if not ok.any():
        return out
    v = x[ok]
    med = np.median(v)
    mad = np.median(np.abs(v - med))
    if mad > 0:
        out[ok] = 0.6745 * (v - med) / mad
    else:
        mean_ad = np.mean(np.abs(v - med))
        out[ok] = (v - med) / (1.253314 * mean_ad) if mean_ad > 0 else 0.0
    return out


def selectivity(
    summary: pd.DataFrame,
    parts: Sequence[str] = PART_NAMES,
    measures: Sequence[str] = PART_MEASURES,
    z_thresh: float = 3.5,
    ratio: float = 2.0,
) -> pd.DataFrame:
    """Selective (unit, part, measure) triples (spec §4.5) from :func:`summarise_units` output.

    Per (part, measure) column the modified z is computed across units; unit u is selective for (p, q) iff
    ``|z_pq| >= z_thresh`` and ``|z_pq| >= ratio * max_{p' != p} |z_p'q|`` (NaN z on other parts count as 0).
    Returns columns ``unit, part, measure, z, value`` sorted by ``-|z|``.
    """
    rows = []
    units = summary["unit"].to_numpy()
    for q in measures:
        cols = [part_column(p, q) for p in parts]
        present = [c for c in cols if c in summary.columns]
        if not present:
            continue
        zs = np.stack(
            [_modified_z(summary[c].to_numpy(dtype=np.float64)) if c in summary.columns else np.full(len(units), np.nan)
             for c in cols],
            axis=1,
        )  # (units, parts)
        az = np.nan_to_num(np.abs(zs), nan=0.0)
        for j, p in enumerate(parts):
            other = np.delete(az, j, axis=1).max(axis=1) if len(parts) > 1 else np.zeros(len(units))
            hit = (az[:, j] >= z_thresh) & (az[:, j] >= ratio * other)
            for i in np.nonzero(hit)[0]:
                rows.append({"unit": int(units[i]), "part": p, "measure": q, "z": float(zs[i, j]),
                             "value": float(summary[cols[j]].iloc[i])})
    out = pd.DataFrame(rows, columns=["unit", "part", "measure", "z", "value"])
    return out.sort_values("z", key=np.abs, ascending=False, kind="stable").reset_index(drop=True)


def fidelity_rate(summary: pd.DataFrame) -> float:
    """Fraction of swept units whose mean re-encoded own value rises from min to max (``fidelity > 0``)."""
    if summary.empty:
        return math.nan
    return float((summary["fidelity"] > 0).mean())


# --------------------------------------------------------------------------------------------------------------
# Counterfactuals (§5)
# --------------------------------------------------------------------------------------------------------------
@dataclass
class CounterfactualResult:
    """Outcome of :func:`counterfactual`. ``steps`` = gradient updates taken (``<= max_steps``); ``s`` the final
    shift ``(d,)``; ``r_prime = relu(r - s)``; ``w_prime = L(r_prime)``; ``p_t`` the target probability after
    each update (from ``check_fn``'s logits, else the linear head on ``r_prime``); ``frac_clipped`` the fraction
    of units where ``r - s < 0``; ``final_pred`` the last checked class."""

    success: bool
    steps: int
    s: Tensor
    shift_l1: float
    r_prime: Tensor
    w_prime: Tensor
    p_t: Tensor
    frac_clipped: float
    final_pred: int
    origin: int
    target: int
    extra: dict[str, Any] = field(default_factory=dict)


def counterfactual(
    r: Tensor,
    origin: int,
    target: int,
    head_weight: Tensor,
    head_bias: Tensor,
    linking_map: LinkingMap,
    check_fn: Callable[[Tensor], Tensor | int],
    lr: float = 0.5,
    w_origin: float = 0.6,
    w_identity: float = 10.0,
    max_steps: int = 2000,
    seed: int = 0,
) -> CounterfactualResult:
    """Shift ``r`` across the decision boundary from ``origin`` to ``target`` (spec §5, reference "v7").

    ``s ~ U[0, 1)^d`` from ``torch.Generator().manual_seed(seed)`` (the same numbers as ``torch.manual_seed(seed);
    torch.rand(d)`` on CPU, without touching the global RNG). Loss ``-logit_t(r - s) + w_origin * logit_o(r - s)
    - w_identity * cos(L(r), L(r - s))`` with the linear head on the *unclipped* ``r - s``; plain step
    ``s <- s - lr * grad``. After every update ``check_fn(relu(r - s))`` (shape ``(1, d)``; the caller's
    ``E(G(L(.)))``) returns logits ``(1, C)`` or a class index; stop at the first update whose prediction is
    ``target``, at most ``max_steps`` updates. Never raises on failure (``success=False``). Works inside
    ``inference_mode``/``no_grad``; only ``s`` receives gradients (via ``torch.autograd.grad``).
    """
    C = head_weight.shape[0]
    for name, v in (("origin", origin), ("target", target)):
        if not 0 <= int(v) < C:
            raise ValueError(f"counterfactual: {name}={v} out of range 0..{C - 1}")
    if max_steps < 0:
        raise ValueError(f"counterfactual: max_steps must be >= 0, got {max_steps}")
    with torch.inference_mode(False), torch.enable_grad():
        r0 = r.detach().clone().reshape(-1)
        dt, dev = r0.dtype, r0.device
        Wh, bh = head_weight.detach().clone().to(dev, dt), head_bias.detach().clone().to(dev, dt)
        A, b = linking_map.coef.detach().clone().to(dev, dt), linking_map.intercept.detach().clone().to(dev, dt)
        g = torch.Generator().manual_seed(int(seed))
        s = torch.rand(r0.numel(), generator=g, dtype=torch.float32).to(dev, dt)
        w_ref = F.linear(r0, A, b)
        p_trace: list[float] = []
        success, steps, pred = False, 0, -1
        for step in range(1, int(max_steps) + 1):
            s = s.detach().requires_grad_(True)
            x = r0 - s
            logits = F.linear(x, Wh, bh)
            loss = (
                -logits[target]
                + w_origin * logits[origin]
                - w_identity * F.cosine_similarity(w_ref, F.linear(x, A, b), dim=0)
            )
            (grad,) = torch.autograd.grad(loss, s)
            s = (s - lr * grad).detach()
            steps = step
            r_prime = torch.relu(r0 - s)
            with torch.no_grad():
                out = check_fn(r_prime[None])
            if isinstance(out, Tensor) and out.numel() > 1:
                lo = out.detach().reshape(-1).to(torch.float64)
                pred = int(lo.argmax())
                p_trace.append(float(torch.softmax(lo, 0)[target]))
            else:
                pred = int(out)
                p_trace.append(float(torch.softmax(F.linear(r_prime, Wh, bh).to(torch.float64), 0)[target]))
            if pred == target:
                success = True
                break
        r_prime = torch.relu(r0 - s)
        return CounterfactualResult(
            success=success,
            steps=steps,
            s=s.detach(),
            shift_l1=float(s.abs().sum()),
            r_prime=r_prime.detach(),
            w_prime=F.linear(r_prime, A, b).detach(),
            p_t=torch.tensor(p_trace, dtype=torch.float64),
            frac_clipped=float((r0 - s < 0).to(torch.float64).mean()),
            final_pred=pred,
            origin=int(origin),
            target=int(target),
        )
