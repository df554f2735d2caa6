"""Network Dissection: streaming per-unit thresholds, IoU tallies, unit labels and detector counts.

Implements /work/shared/spec/dissection.md §2 with plain torch (+ torchmetrics states for DDP reduction):

- :class:`UnitQuantiles` — pass 1, exact per-unit (1 - q) quantile T_k of the raw low-resolution activations
  (§2.2, ``quantile.method: exact_topk``).
  :func:`make_quantiles` picks it, or the documented ``subsample`` estimate when the exact buffer is too big.
- :class:`IoUTally` — pass 2, integer tallies I (U, C+1), G (C+1), A^paper and A^lite (U, n_cat) (§2.3-§2.5),
  over labels parsed once per decoded image (:func:`parse_labels` -> :class:`ImageLabels`).
- :class:`TopImages` — the top-activating images per unit (for the strips, §5).
- :func:`iou`, :func:`unit_labels`, :func:`unique_detectors` (methods A and B), :func:`tally_table`,
  :func:`counts_from_tally` (the counts from a tally CSV alone) (§2.5-§2.6).
- :func:`dissect_layers` / :func:`dissect` — both passes with forward hooks on the layers, all layers in the same
  passes (eval, no_grad, sharded across ranks; one forward pass while the activations fit a budget; on the CPU
  several batches at once, one per thread, and oneDNN's layout where it is exact);
  :func:`unit_masks` — one unit's M_k on a few images; :func:`default_layer`, :func:`resolve_layer`.
- :func:`random_rotation` — Q^alpha for the random-rotation baseline; :func:`random_init_copy` — the
  random-init baseline (§2.7).

Label batches are a list (one entry per image) of ``{category: tensor}`` dicts as returned by
:class:`featurelens.data.broden.BrodenDataset`: pixel categories ``(n_layers, sh, sw)`` int64 global label maps,
image-level categories (scene, texture) 1-D tensors of global label numbers. Label 0 (unlabeled) never counts.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torchmetrics import Metric

from featurelens.analysis.hooks import eval_mode, onednn_forward, outputs_of, record_outputs, run_forward

__all__ = [
    "EPS", "QUANTILE_METHODS", "ImageLabels", "IoUTally", "TopImages", "UnitQuantiles", "counts_from_tally",
    "default_layer", "dissect", "dissect_layers", "iou", "make_quantiles", "parse_labels", "random_init_copy",
    "random_rotation", "resolve_layer", "tally_table", "unique_detectors", "unit_labels", "unit_masks",
]

EPS = 1e-10  # §2.5 epsilon in the IoU denominator
IMAGE_LEVEL = frozenset({"scene", "texture"})


# ---------------------------------------------------------------------------------------------------------------
# Pass 1: thresholds (§2.2)
# ---------------------------------------------------------------------------------------------------------------
class UnitQuantiles(Metric):
    """Exact streaming per-unit (1 - q) quantile (numpy ``quantile`` method 'linear') of raw activations (§2.2).

    Args:
        num_units: U.
        num_values: n = N·H·W, the number of values per unit the pass will see (known before the pass).
        q: top fraction, a float or a length-U sequence/tensor (per-unit q, e.g. for planted-unit oracles §6).

    Per unit, the m = ⌈max(q)·(n−1)⌉ + 2 largest values seen so far are kept in ``buffer`` (shape (m, U),
    float32, the activations' own precision, so nothing is rounded). Memory: 4·m·U bytes (e.g. q=0.005,
    N=63,305, 7×7, U=2048: m=15,512 -> 127 MB). Each update merges buffer ∪ batch and keeps the top m.

    ``keep_all`` keeps every value (``quantile.method: sort``; tests and tiny data only).
    ``subsample`` = p < 1 is the documented streaming *estimate* for layers whose exact buffer would not fit
    (``quantile.method: subsample``): each spatial position is kept with probability p (the same positions for
    all units, seeded), and T_k is the exact quantile of the kept values. Its rank error has standard deviation
    sqrt(q(1−q)/(p·n)), e.g. 3e-4 for q = 0.005 and p·n = 5·10^4 values per unit; the buffer shrinks by p.
    DDP: ``buffer`` is reduced by "cat" (→ (world·m, U)) and re-top-m'd in :meth:`compute`; ``count`` is summed.
    ``compute`` uses the number of values actually seen; it raises if the buffer cannot hold the needed order
    statistic (n − ⌊r⌋ > m, i.e. more values were seen than ``num_values`` allowed for).
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = None

    def __init__(self, num_units: int, num_values: int, q: float | Sequence[float] | torch.Tensor = 0.005,
                 subsample: float = 1.0, seed: int = 0, keep_all: bool = False, **kwargs):
        super().__init__(**kwargs)
        qt = torch.as_tensor(q, dtype=torch.float64)
        if qt.ndim == 0:
            qt = qt.expand(num_units).clone()
        if qt.shape != (num_units,) or (qt < 0).any() or (qt >= 1).any():
            raise ValueError(f"q must be a float in [0, 1) or a length-{num_units} vector of them")
        if num_values < 1:
            raise ValueError("num_values must be >= 1")
        if not 0 < subsample <= 1:
            raise ValueError(f"subsample must be in (0, 1], got {subsample}")
        self.num_units = int(num_units)
        self.num_values = int(num_values)
        self.q = qt
        self.subsample = float(subsample)
        # values kept per unit: all of them, or (subsample) a Bernoulli(p) draw, bounded at +8 sd
        kept = num_values if subsample == 1 else min(
            num_values, int(subsample * num_values + 8 * math.sqrt(subsample * num_values) + 16))
        self.m = kept if keep_all else min(int(math.ceil(float(qt.max()) * (kept - 1))) + 2, kept)
        self._gen = torch.Generator().manual_seed(int(seed))
        self.add_state("buffer", default=torch.full((self.m, num_units), -math.inf, dtype=torch.float32),
                       dist_reduce_fx="cat")
        self.add_state("count", default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")

    @staticmethod
    def buffer_bytes(num_units: int, num_values: int, q: float) -> int:
        """Memory of the exact top-m buffer (float32)."""
        return 4 * num_units * (min(int(math.ceil(q * (num_values - 1))) + 2, num_values))

    def update(self, acts: torch.Tensor) -> None:
        """acts: (B, U, H, W) (or (B, U)) raw activations."""
        if acts.shape[1] != self.num_units:
            raise ValueError(f"expected {self.num_units} units, got shape {tuple(acts.shape)}")
        vals = acts.detach().to(torch.float32).transpose(0, 1).reshape(self.num_units, -1).T  # (n_b, U)
        if self.subsample < 1:  # the same positions for every unit
            keep = torch.rand(vals.shape[0], generator=self._gen) < self.subsample
            vals = vals[keep.to(vals.device)]
        merged = torch.cat([self.buffer, vals], dim=0)
        self.buffer = merged.topk(min(self.m, merged.shape[0]), dim=0).values
        self.count += vals.shape[0]

    def compute(self) -> torch.Tensor:
        """T (U,) float64."""
        buf = self.buffer
        if buf.ndim == 3:  # some torchmetrics versions stack instead of cat
            buf = buf.reshape(-1, buf.shape[-1])
        n = int(self.count)
        if n == 0:
            raise RuntimeError("UnitQuantiles.compute() before any update")
        top = buf.topk(min(self.m, buf.shape[0]), dim=0).values.to(torch.float64)  # descending
        q = self.q.to(top.device)
        r = (1 - q) * (n - 1)
        fl = torch.floor(r)
        frac = r - fl
        k_lo = n - fl.long()  # v_(⌊r⌋) is the k_lo-th largest (1-based)
        if int(k_lo.max()) > top.shape[0]:
            raise RuntimeError(f"top-k buffer too small: need {int(k_lo.max())} values, have {top.shape[0]} "
                               f"(saw {n} values per unit, num_values was {self.num_values})")
        idx_lo = (k_lo - 1).unsqueeze(0)
        idx_hi = (k_lo - 2).clamp(min=0).unsqueeze(0)
        v_lo = top.gather(0, idx_lo).squeeze(0)
        v_hi = top.gather(0, idx_hi).squeeze(0)
        return v_lo + frac * (v_hi - v_lo)


# ---------------------------------------------------------------------------------------------------------------
# Pass 2: tallies (§2.3-§2.5)
# ---------------------------------------------------------------------------------------------------------------
class ImageLabels(NamedTuple):
    """One image's labels in the form the tally joins on (:func:`parse_labels`).

    ``pixel_labels``: the ``pixel * LABEL_BASE + label`` codes of its pixel labels, sorted by pixel, each
    (pixel, label) once (label > 0, mask layers OR-ed per label, labels also present image-level dropped: those
    cover the whole grid anyway, §2.4); ``image_labels``: its sorted unique image-level labels (> 0); ``size``:
    the mask grid (sh, sw), or None for an image without pixel categories."""

    pixel_labels: torch.Tensor
    image_labels: torch.Tensor
    size: tuple[int, int] | None

    @property
    def nbytes(self) -> int:
        """Memory held by the two tensors."""
        return sum(t.numel() * t.element_size() for t in (self.pixel_labels, self.image_labels))


LABEL_BASE = 65536  # Broden label numbers are R + 256·G < 2^16


def parse_labels(labels: Mapping[str, torch.Tensor] | ImageLabels,
                 image_level: frozenset[str] = IMAGE_LEVEL) -> ImageLabels:
    """An image's ``{category: tensor}`` labels as :class:`ImageLabels`, built once when the image is decoded
    (e.g. in a DataLoader worker), so no tally rebuilds it per layer or per pass; parsed labels pass through."""
    if isinstance(labels, ImageLabels):
        return labels
    size = None
    layers, img = [], []  # pixel label layers (P,) each; image-level label arrays
    for cat, t in labels.items():
        a = np.asarray(t)
        if cat in image_level or a.ndim <= 1:
            img.append(a.reshape(-1))
            continue
        if a.ndim == 2:
            a = a[None]
        if size is None:
            size = (int(a.shape[-2]), int(a.shape[-1]))
        elif size != (int(a.shape[-2]), int(a.shape[-1])):
            raise ValueError(f"category {cat!r}: mask size {tuple(a.shape[-2:])} != {size}")
        layers.extend(a.reshape(a.shape[0], -1))
    img_set = np.unique(np.concatenate(img)).astype(np.int64) if img else np.zeros(0, dtype=np.int64)
    img_set = img_set[img_set > 0]
    if layers:
        keep = []
        for j, layer in enumerate(layers):  # a label already in an earlier layer or image-level: counted there
            k = layer > 0
            for other in [*layers[:j], *img_set]:
                k &= layer != other
            keep.append(k)
        lab = np.stack(layers, axis=1)  # (P, layers)
        if int(lab.max(initial=0)) >= LABEL_BASE:
            raise ValueError(f"label numbers must be < {LABEL_BASE}, got {int(lab.max())}")
        p, j = np.nonzero(np.stack(keep, axis=1))  # by pixel
        codes = p.astype(np.int64) * LABEL_BASE + lab[p, j].astype(np.int64)
    else:
        codes = np.zeros(0, dtype=np.int64)
    return ImageLabels(torch.from_numpy(codes), torch.from_numpy(img_set), size)


class IoUTally(Metric):
    """Integer IoU tallies (§2.5), all sum-reduced and fixed-size.

    States: ``intersection`` I (U, C+1), ``label_count`` G (C+1), ``act_paper`` A^paper (U, n_cat) (images
    having ≥1 label of primary category κ), ``act_lite`` A^lite (U, n_cat) ([LITE]: image adds |M_k| only if
    M_k overlaps a pixel label of category κ or the image has an image-level label of κ), ``act_total``
    (U,) Σ_x |M_k(x)|, ``pixels`` Σ_x sh·sw, ``images``, ``raw_active`` (U,) raw values above T_k and
    ``raw_values`` (values per unit).

    Args:
        num_units: U.
        num_labels: C + 1 (label 0 = unlabeled, never counted).
        primary_category: (C+1,) int, label -> category index (−1: none; such labels add to I and G only).
        num_categories: n_cat (default max(primary) + 1).
        image_level: category names treated as whole-image labels (default scene, texture); any 1-D label
            tensor is treated as image-level as well.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = None

    def __init__(self, num_units: int, num_labels: int, primary_category, num_categories: int | None = None,
                 image_level: Sequence[str] = tuple(IMAGE_LEVEL), **kwargs):
        super().__init__(**kwargs)
        prim = torch.as_tensor(np.asarray(primary_category), dtype=torch.int64)
        if prim.shape != (num_labels,):
            raise ValueError(f"primary_category must have {num_labels} entries, got {tuple(prim.shape)}")
        prim = prim.clone()
        prim[0] = -1
        self.num_units, self.num_labels = int(num_units), int(num_labels)
        self.num_categories = int(num_categories if num_categories is not None else int(prim.max()) + 1)
        self.primary = prim
        self.image_level = frozenset(image_level)
        valid = prim >= 0
        onehot = torch.zeros(num_labels, self.num_categories)
        onehot[valid.nonzero().squeeze(1), prim[valid]] = 1.0
        self._cat_onehot = onehot  # (C+1, n_cat) float
        U, L, K = self.num_units, self.num_labels, self.num_categories
        z = torch.int64
        self.add_state("intersection", default=torch.zeros(U, L, dtype=z), dist_reduce_fx="sum")
        self.add_state("label_count", default=torch.zeros(L, dtype=z), dist_reduce_fx="sum")
        self.add_state("act_paper", default=torch.zeros(U, K, dtype=z), dist_reduce_fx="sum")
        self.add_state("act_lite", default=torch.zeros(U, K, dtype=z), dist_reduce_fx="sum")
        self.add_state("act_total", default=torch.zeros(U, dtype=z), dist_reduce_fx="sum")
        self.add_state("pixels", default=torch.tensor(0, dtype=z), dist_reduce_fx="sum")
        self.add_state("raw_active", default=torch.zeros(U, dtype=z), dist_reduce_fx="sum")
        self.add_state("raw_values", default=torch.tensor(0, dtype=z), dist_reduce_fx="sum")
        self.add_state("images", default=torch.tensor(0, dtype=z), dist_reduce_fx="sum")

    def update(self, acts: torch.Tensor, labels: Sequence[Mapping[str, torch.Tensor] | ImageLabels],
               thresholds: torch.Tensor, mask_size: tuple[int, int] | None = None) -> None:
        """acts (B, U, h, w) raw activations; labels: B dicts {category: tensor} or their :func:`parse_labels`;
        thresholds (U,); ``mask_size``: the grid of images without pixel categories.

        Sparse and vectorised over the batch: only (image, unit) pairs whose max exceeds T_k (the skip rule) are
        upsampled; each active pixel of M is joined with the labels of its pixel (the batch's pixel-sorted label
        codes, a CSR index) and counted with ``bincount``. Work and memory scale with the number of active pixels
        (≈ q of all), not with U·B·sh·sw.
        """
        B = acts.shape[0]
        if len(labels) != B:
            raise ValueError(f"{B} activation maps but {len(labels)} label dicts")
        parsed = [lab if isinstance(lab, ImageLabels) else parse_labels(lab, self.image_level) for lab in labels]
        sizes = {p.size or (None if mask_size is None else tuple(mask_size)) for p in parsed}
        if None in sizes:
            raise ValueError("image without pixel categories: pass mask_size")
        if len(sizes) > 1:  # mixed mask sizes: one image at a time
            for b in range(B):
                self.update(acts[b:b + 1], parsed[b:b + 1], thresholds, mask_size)
            return
        (sh, sw), = sizes
        device = acts.device
        P = sh * sw
        U, L, K = self.num_units, self.num_labels, self.num_categories
        T = thresholds.to(device=device, dtype=torch.float64)
        # S > T (float64) <=> S > T32 for float32 S, with T32 = T rounded down to float32
        T32 = T.float()
        T32 = torch.where(T32.double() > T, torch.nextafter(T32, torch.full_like(T32, -math.inf)), T32)
        a = acts.detach().float()

        # active pixels of M: (image, unit) pairs passing the skip rule (§2.3), upsampled in chunks
        pairs = (a.flatten(2).amax(dim=2) > T32).nonzero()  # (n_live, 2): image, unit
        act_b, act_u, act_p = [], [], []
        chunk = max(1, 2**24 // P)
        for part in pairs.split(chunk):
            b, u = part[:, 0], part[:, 1]
            S = F.interpolate(a[b, u][:, None], size=(sh, sw), mode="bilinear", align_corners=False)
            i, p = (S.reshape(len(part), P) > T32[u, None]).nonzero(as_tuple=True)
            act_b.append(b[i])
            act_u.append(u[i])
            act_p.append(p)
        empty = torch.zeros(0, dtype=torch.int64, device=device)
        act_b, act_u, act_p = (torch.cat(v) if v else empty for v in (act_b, act_u, act_p))
        nM = torch.bincount(act_u * B + act_b, minlength=U * B).reshape(U, B)  # |M_k(x)|

        # the batch's pixel labels as (image·P + pixel, label), sorted by image pixel; image-level (image, label)
        codes = [p.pixel_labels.to(device) for p in parsed]
        pix_b = torch.repeat_interleave(torch.arange(B, device=device),
                                        torch.tensor([len(c) for c in codes], device=device))
        codes = torch.cat(codes)
        lab, flat = codes % LABEL_BASE, pix_b * P + codes // LABEL_BASE
        img_b = torch.repeat_interleave(torch.arange(B, device=device),
                                        torch.tensor([len(p.image_labels) for p in parsed], device=device))
        img_c = torch.cat([p.image_labels.to(device) for p in parsed])
        self.label_count += torch.bincount(lab, minlength=L) + P * torch.bincount(img_c, minlength=L)

        # join: every active pixel with every pixel label at that pixel
        per_pixel = torch.bincount(flat, minlength=B * P)
        start = torch.cumsum(per_pixel, 0) - per_pixel
        act_f = act_b * P + act_p
        reps = per_pixel[act_f]
        hit_u = torch.repeat_interleave(act_u, reps)
        hit_b = torch.repeat_interleave(act_b, reps)
        offset = torch.arange(int(reps.sum()), device=device) - torch.repeat_interleave(torch.cumsum(reps, 0) - reps,
                                                                                          reps)
        hit_lab = lab[torch.repeat_interleave(start[act_f], reps) + offset]
        self.intersection += torch.bincount(hit_u * L + hit_lab, minlength=U * L).reshape(U, L)
        if img_c.numel():
            self.intersection.index_add_(1, img_c, nM[:, img_b])

        prim = self.primary.to(device)
        pix_k, img_k = prim[lab], prim[img_c]
        pix_ok, img_ok = pix_k >= 0, img_k >= 0
        img_present = torch.zeros(B, K, dtype=torch.bool, device=device)
        img_present[img_b[img_ok], img_k[img_ok]] = True
        present = img_present.clone()  # paper: the image has a label of category k
        present[pix_b[pix_ok], pix_k[pix_ok]] = True
        hit_k = prim[hit_lab]
        ok = hit_k >= 0  # lite: M_k(x) overlaps a pixel labelled with category k
        overlap = torch.bincount((hit_u[ok] * B + hit_b[ok]) * K + hit_k[ok], minlength=U * B * K).reshape(U, B, K)
        lite = (overlap > 0) | img_present[None]
        self.act_paper += torch.einsum("ub,bk->uk", nM.double(), present.double()).round().long()
        self.act_lite += torch.einsum("ub,ubk->uk", nM.double(), lite.double()).round().long()
        self.act_total += nM.sum(dim=1)
        self.pixels += B * P
        self.raw_active += (a.flatten(2) > T32[None, :, None]).sum(dim=(0, 2))
        self.raw_values += a[:, 0].numel()
        self.images += B

    def compute(self) -> dict[str, torch.Tensor]:
        return {"intersection": self.intersection, "label_count": self.label_count,
                "act_paper": self.act_paper, "act_lite": self.act_lite, "act_total": self.act_total,
                "pixels": self.pixels, "images": self.images, "raw_active": self.raw_active,
                "raw_values": self.raw_values}


# ---------------------------------------------------------------------------------------------------------------
# IoU, labels, counts, table (§2.5-§2.6)
# ---------------------------------------------------------------------------------------------------------------
def _tally_dict(tally) -> dict[str, torch.Tensor]:
    return tally.compute() if isinstance(tally, IoUTally) else tally


def iou(tally, primary_category, denominator: str = "paper") -> torch.Tensor:
    """IoU_{k,c} = I / (A_{k,cat(c)} + G_c − I + ε) (§2.5) -> (U, C+1) float64; 0 for label 0 / no category."""
    if denominator not in ("paper", "lite"):
        raise ValueError(f"denominator must be 'paper' or 'lite', got {denominator!r}")
    t = _tally_dict(tally)
    I = t["intersection"].to(torch.float64)
    G = t["label_count"].to(torch.float64)
    A = t["act_paper" if denominator == "paper" else "act_lite"].to(torch.float64)
    prim = torch.as_tensor(np.asarray(primary_category), dtype=torch.int64, device=I.device).clone()
    prim[0] = -1
    valid = prim >= 0
    Ac = torch.zeros_like(I)
    Ac[:, valid] = A[:, prim[valid]]
    out = I / (Ac + G[None, :] - I + EPS)
    out[:, ~valid] = 0.0
    return out


def _num_categories(primary_category, num_categories):
    return int(num_categories if num_categories is not None else int(np.max(np.asarray(primary_category))) + 1)


def unit_labels(iou_: torch.Tensor, primary_category, tau: float = 0.04, num_categories: int | None = None) -> dict:
    """Per unit best label over all categories and per category (§2.6).

    Returns dict: ``label`` (U,) int64, ``category`` (U,) int64, ``score`` (U,) float64, ``detector`` (U,) bool
    (score > tau), ``label_percat`` (U, n_cat) int64 (0 if the category has no labels), ``score_percat``
    (U, n_cat) float64.
    """
    K = _num_categories(primary_category, num_categories)
    prim = torch.as_tensor(np.asarray(primary_category), dtype=torch.int64, device=iou_.device).clone()
    prim[0] = -1
    U = iou_.shape[0]
    lab_k = torch.zeros(U, K, dtype=torch.int64, device=iou_.device)
    sc_k = torch.zeros(U, K, dtype=torch.float64, device=iou_.device)
    for k in range(K):
        cols = (prim == k).nonzero().squeeze(1)
        if cols.numel():
            v, i = iou_[:, cols].to(torch.float64).max(dim=1)
            lab_k[:, k], sc_k[:, k] = cols[i], v
    score, cat = sc_k.max(dim=1)  # ties -> first category
    label = lab_k.gather(1, cat[:, None]).squeeze(1)
    return {"label": label, "category": cat, "score": score, "detector": score > tau,
            "label_percat": lab_k, "score_percat": sc_k}


def unique_detectors(iou_: torch.Tensor, primary_category, tau: float = 0.04,
                     num_categories: int | None = None) -> dict:
    """Detector counts (§2.6). Method A: distinct top labels of units with score > tau (split by the top
    label's category); method B (extract_csv.m): per category κ, distinct best_κ labels with score_κ > tau.

    Returns dict: ``detectors`` int, ``unique_A`` int, ``unique_B`` int, ``unique_A_percat`` (n_cat,) list,
    ``unique_B_percat`` list, ``detectors_percat`` list (B-style: #{k : score_κ(k) > tau}).
    """
    K = _num_categories(primary_category, num_categories)
    ul = unit_labels(iou_, primary_category, tau, K)
    det = ul["detector"]
    a_labels = {(int(c), int(lab)) for c, lab, d in zip(ul["category"], ul["label"], det, strict=True) if d}
    a_percat = [sum(1 for c, _ in a_labels if c == k) for k in range(K)]
    b_percat, d_percat = [], []
    for k in range(K):
        hit = ul["score_percat"][:, k] > tau
        b_percat.append(len(set(ul["label_percat"][hit, k].tolist())))
        d_percat.append(int(hit.sum()))
    return {"detectors": int(det.sum()), "unique_A": len(a_labels), "unique_B": sum(b_percat),
            "unique_A_percat": a_percat, "unique_B_percat": b_percat, "detectors_percat": d_percat}


def tally_table(tally, iou_: torch.Tensor, primary_category, label_names: Sequence[str],
                categories: Sequence[str], denominator: str = "paper") -> pd.DataFrame:
    """NetDissect ``tally.csv`` layout (§2.6): one row per unit sorted by score (descending): ``unit`` (1-based),
    ``category``, ``label``, ``score``, then per category κ: ``κ-label``, ``κ-truth`` (G), ``κ-activation`` (A,
    per ``denominator``), ``κ-intersect`` (I), ``κ-iou``."""
    t = _tally_dict(tally)
    K = len(categories)
    ul = unit_labels(iou_, primary_category, num_categories=K)
    A = t["act_paper" if denominator == "paper" else "act_lite"].cpu().numpy()
    I, G = t["intersection"].cpu().numpy(), t["label_count"].cpu().numpy()
    names = np.asarray(["", *label_names[1:]], dtype=object)  # label 0: no label
    units = np.arange(iou_.shape[0])
    cols: dict[str, Any] = {"unit": units + 1, "category": np.asarray(categories, dtype=object)[ul["category"].numpy()],
                            "label": np.asarray(label_names, dtype=object)[ul["label"].numpy()],
                            "score": ul["score"].numpy().astype(np.float64)}
    for j, cat in enumerate(categories):
        c = ul["label_percat"][:, j].numpy()
        cols[f"{cat}-label"] = names[c]
        cols[f"{cat}-truth"] = np.where(c > 0, G[c], 0).astype(np.int64)
        cols[f"{cat}-activation"] = A[:, j].astype(np.int64)
        cols[f"{cat}-intersect"] = np.where(c > 0, I[units, c], 0).astype(np.int64)
        cols[f"{cat}-iou"] = ul["score_percat"][:, j].numpy().astype(np.float64)
    df = pd.DataFrame(cols)
    return df.sort_values("score", ascending=False, kind="stable").reset_index(drop=True)


def counts_from_tally(table: pd.DataFrame, tau: float = 0.04) -> dict:
    """Detector counts (§2.6) from a ``tally.csv`` table alone: this project's, or the per-unit CSVs that
    NetDissect released with the paper (``plot/*.csv``, the same layout), for the counting regression of §6.

    Method A: distinct top labels of the units with ``score > tau``; method B: per category κ, distinct
    ``κ-label`` of the units with ``κ-iou > tau``. Returns the keys of :func:`unique_detectors`, with the
    per-category lists in the order of the table's ``κ-label`` columns, plus ``categories``.
    """
    categories = [c[: -len("-label")] for c in table.columns if c.endswith("-label")]
    det = table[table["score"] > tau]
    a_labels = set(zip(det["category"], det["label"], strict=True))
    out = {"categories": categories, "detectors": len(det), "unique_A": len(a_labels),
           "unique_A_percat": [sum(1 for c, _ in a_labels if c == k) for k in categories],
           "unique_B_percat": [], "detectors_percat": []}
    for k in categories:
        hit = table[table[f"{k}-iou"] > tau]
        out["unique_B_percat"].append(int(hit[f"{k}-label"].nunique()))
        out["detectors_percat"].append(len(hit))
    out["unique_B"] = sum(out["unique_B_percat"])
    return out


# ---------------------------------------------------------------------------------------------------------------
# Rotation baseline (§2.7)
# ---------------------------------------------------------------------------------------------------------------
def random_rotation(U: int, alpha: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Q^alpha (U, U) float64 for a random Q ∈ SO(U) (§2.7).

    Q: QR of a standard-Gaussian matrix, columns times sign(diag R), one column negated if det = −1.
    Q^alpha via the real Schur form Q = Z T Zᵀ (scipy): 2×2 rotation blocks of angle θ become angle αθ; pairs of
    −1 entries are treated as angle-π rotations. Real and orthogonal; alpha=0 gives exactly I, alpha=1 gives Q.
    """
    from scipy.linalg import schur

    g = torch.randn(U, U, generator=generator, dtype=torch.float64)
    Qm, R = torch.linalg.qr(g)
    Qm = Qm * torch.sign(torch.diagonal(R))[None, :]
    if torch.linalg.det(Qm) < 0:
        Qm[:, 0] = -Qm[:, 0]
    if alpha == 0:
        return torch.eye(U, dtype=torch.float64)
    Q = Qm.numpy()
    T, Z = schur(Q, output="real")
    Ta = np.zeros_like(T)
    neg = []
    i = 0
    while i < U:
        if i + 1 < U and abs(T[i + 1, i]) > 1e-12:
            c = 0.5 * (T[i, i] + T[i + 1, i + 1])
            s = 0.5 * (T[i + 1, i] - T[i, i + 1])
            th = alpha * math.atan2(s, c)
            Ta[i, i] = Ta[i + 1, i + 1] = math.cos(th)
            Ta[i + 1, i], Ta[i, i + 1] = math.sin(th), -math.sin(th)
            i += 2
        else:
            if T[i, i] < 0:
                neg.append(i)
            else:
                Ta[i, i] = 1.0
            i += 1
    if len(neg) % 2:
        raise RuntimeError("odd number of -1 eigenvalues for a matrix in SO(U)")
    for a, b in zip(neg[::2], neg[1::2], strict=True):
        th = alpha * math.pi
        Ta[a, a] = Ta[b, b] = math.cos(th)
        Ta[b, a], Ta[a, b] = math.sin(th), -math.sin(th)
    return torch.from_numpy(Z @ Ta @ Z.T)


# ---------------------------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------------------------
QUANTILE_METHODS = ("exact_topk", "sort", "subsample")


class TopImages(Metric):
    """The ``k`` images with the highest per-image max activation, per unit (for the top-image strips, §5).

    States ``values`` / ``index`` (k, U), "cat"-reduced across ranks and re-top-k'd in :meth:`compute`.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = None

    def __init__(self, num_units: int, k: int = 10, **kwargs):
        super().__init__(**kwargs)
        self.k = int(k)
        self.add_state("values", default=torch.full((self.k, num_units), -math.inf), dist_reduce_fx="cat")
        self.add_state("index", default=torch.full((self.k, num_units), -1, dtype=torch.int64), dist_reduce_fx="cat")

    def update(self, acts: torch.Tensor, index: torch.Tensor) -> None:
        """acts (B, U, h, w); index (B,) dataset indices of the images."""
        peak = acts.detach().float().flatten(2).amax(dim=2)  # (B, U)
        vals = torch.cat([self.values, peak])
        idx = torch.cat([self.index, index.to(self.index.device)[:, None].expand_as(peak)])
        top = vals.topk(min(self.k, vals.shape[0]), dim=0)
        self.values, self.index = top.values, idx.gather(0, top.indices)

    def compute(self) -> torch.Tensor:
        """(k, U) dataset indices, best first (−1 where fewer than k images were seen)."""
        vals, idx = self.values.reshape(-1, self.values.shape[-1]), self.index.reshape(-1, self.index.shape[-1])
        top = vals.topk(min(self.k, vals.shape[0]), dim=0)
        return idx.gather(0, top.indices)


def make_quantiles(num_units: int, num_values: int, q: float | Sequence[float] = 0.005, method: str = "exact_topk",
                   max_bytes: int = 2 * 1024**3, seed: int = 0) -> tuple[UnitQuantiles, str]:
    """The pass-1 Metric for ``quantile.method`` and the method actually used (§2.2).

    ``exact_topk`` is exact while its buffer fits in ``max_bytes`` and otherwise falls back to ``subsample``
    with the largest p that fits; ``sort`` keeps every value (tests, tiny data); ``subsample`` always estimates,
    with p chosen so the buffer fits in ``max_bytes`` (p = 1 if it fits anyway).
    """
    if method not in QUANTILE_METHODS:
        raise ValueError(f"quantile.method={method!r} is unknown; valid: {list(QUANTILE_METHODS)}")
    if method == "sort":
        return UnitQuantiles(num_units, num_values, q, seed=seed, keep_all=True), "sort"
    qmax = float(np.max(q))
    need = UnitQuantiles.buffer_bytes(num_units, num_values, qmax)
    if need <= max_bytes:
        return UnitQuantiles(num_units, num_values, q, seed=seed), "exact_topk"
    p = max_bytes / need
    return UnitQuantiles(num_units, num_values, q, subsample=p, seed=seed), f"subsample(p={p:.3g})"


def default_layer(model: torch.nn.Module) -> str:
    """The spec's default layer (§4): ResNet ``layer4``; otherwise the last ReLU (else conv) in ``features``
    (VGG16 conv5_3 + ReLU, AlexNet conv5 + ReLU, the small CNN's last block, the MLP's last hidden layer);
    otherwise the last conv."""
    names = dict(model.named_modules())
    if "layer4" in names:
        return "layer4"
    for kinds in ((torch.nn.ReLU,), (torch.nn.Conv2d,)):
        hits = [n for n, m in names.items() if n.startswith("features.") and isinstance(m, kinds)]
        if hits:
            return hits[-1]
    convs = [n for n, m in names.items() if isinstance(m, torch.nn.Conv2d)]
    if convs:
        return convs[-1]
    raise ValueError(f"{type(model).__name__} has no conv layer to dissect; name one in analysis.dissection.layers")


def resolve_layer(model: torch.nn.Module, name: str) -> torch.nn.Module:
    modules = dict(model.named_modules())
    if name not in modules or name == "":
        convs = [n for n, m in modules.items() if isinstance(m, torch.nn.Conv2d | torch.nn.ReLU)]
        raise ValueError(f"layer {name!r} is not a module of {type(model).__name__}; e.g. {convs[-6:]}")
    return modules[name]


def random_init_copy(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """The same architecture, untrained: a deep copy with every ``reset_parameters`` re-run under ``seed``
    (PyTorch's default initialisation; BatchNorm running statistics reset)."""
    import copy

    clone = copy.deepcopy(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for m in clone.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
    return clone


def _read(images: bool, labels: bool) -> str:
    """:class:`_Shard`'s ``read`` for a pass that needs the images and/or the labels."""
    return "both" if images and labels else "images" if images else "labels"


class _Shard(torch.utils.data.Dataset):
    """Every ``world``-th item from ``rank`` on, as ``(x, labels, global index)``, decoding only what a pass needs:
    ``read="images"`` (thresholds) leaves the labels empty, ``read="labels"`` (tallies over cached activations)
    leaves the image None, where the dataset can (``load_image`` / ``load_labels``, e.g. :class:`BrodenDataset`).
    Labels come as :func:`parse_labels` (built here, in the DataLoader worker)."""

    def __init__(self, dataset, rank: int = 0, world: int = 1, read: str = "both"):
        self.dataset, self.idx, self.read = dataset, range(rank, len(dataset), world), read

    def __len__(self) -> int:
        return len(self.idx)

    def __getitem__(self, i):
        j = self.idx[i]
        if self.read == "images" and hasattr(self.dataset, "load_image"):
            return self.dataset.load_image(j), None, j
        if self.read == "labels" and hasattr(self.dataset, "load_labels"):
            return None, parse_labels(self.dataset.load_labels(j)), j
        x, labels = self.dataset[j]
        return x, (None if self.read == "images" else parse_labels(labels)), j


def _collate_indexed(batch):
    xs, labels, idx = zip(*batch, strict=True)
    return (None if xs[0] is None else torch.stack(list(xs))), list(labels), torch.tensor(idx)


def _as_maps(a: torch.Tensor) -> torch.Tensor:
    """A layer output as float (B, U, h, w) maps (a linear layer's (B, U) as 1 x 1 maps)."""
    a = a.float()
    return a[:, :, None, None] if a.ndim == 2 else a


def _in_order(fn: Callable[[Any], Any], items: Iterable[Any], threads: int) -> Iterator[Any]:
    """``map(fn, items)``, computed by ``threads`` threads at once (at most 2·threads calls ahead of the
    consumer); the results come in order. One thread: the plain map, in the calling thread."""
    if threads == 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(threads) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 2 * threads:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


@contextlib.contextmanager
def _one_thread_per_batch(threads: int) -> Iterator[None]:
    """With several batches at once, each op runs on the thread of its batch (torch's intra-op threads: 1; the
    previous count is restored on exit)."""
    intra = torch.get_num_threads()
    if threads > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(intra)


def dissect_layers(model: torch.nn.Module, layers: Mapping[str, torch.nn.Module], data, num_labels: int,
                   primary_category, q: float | Sequence[float] = 0.005, denominator: str = "paper",
                   device: str | torch.device = "cpu", rotations: Mapping[str, torch.Tensor] | None = None,
                   batch_size: int = 64,
                   tau: float = 0.04, categories: Sequence[str] | None = None,
                   label_names: Sequence[str] | None = None, quantile_method: str = "exact_topk",
                   max_bytes: int = 2 * 1024**3, preprocess=None, shard: tuple[int, int] = (0, 1), topn: int = 0,
                   num_workers: int = 0, progress: bool = False, cache_bytes: int = 1024**3,
                   threads: int | None = None) -> dict[str, dict]:
    """Run both streaming passes (§2.2 thresholds, §2.5 tallies) on the outputs of ``layers`` ({name: module}).

    All layers are hooked at once, so the model runs once or twice in all, whatever the number of layers, and
    each forward pass stops after the last hooked layer. Pass 1 computes the thresholds, pass 2 the tallies.
    Within ``cache_bytes``, pass 1 keeps for pass 2: first every hooked layer's activations of this shard (float32,
    on ``device``; then pass 2 runs no forward pass), then the parsed labels (then pass 1 decodes the masks too and
    pass 2 reads no file; tried when the first image's labels times the images fit the budget). What does not fit
    pass 2 computes again: the forward pass (``forward_passes``: 2) and the masks (``labels_cached``: False), so
    memory stays bounded whatever the number of images. Several names may hook the same module (e.g. with
    different rotations).

    Args:
        data: a sized Dataset of ``(x, {category: tensor})`` items (e.g. :class:`BrodenDataset`); images in
            [0, 1], passed through ``preprocess`` (the model's own normalisation) before the model.
        rotations: optional {layer name: (U, U) matrix R}; that layer's activations are replaced by R·A per pixel
            (the rotation baseline, §2.7).
        categories / label_names: for the table (default: ``data.categories`` / ``data.label_names`` if present).
        shard: (rank, world size): this process reads every world-th image; the Metrics sync across ranks
            when torch.distributed is initialised, so every rank returns the same global result.
        topn: also track the ``topn`` images with the highest max activation per unit (``top_images``).
        num_workers: DataLoader workers decoding images and masks (and parsing the labels) beside the model.
        cache_bytes: the memory pass 1 may keep for pass 2: activations, then parsed labels (0: nothing, two
            forward passes and pass 2 decodes the masks).
        threads: batches processed at once, each by one thread from its decoding (without ``num_workers``) to
            its tallies, with torch's intra-op threads set to 1 for the call (default: torch's thread count on
            the CPU, 1 on other devices); each thread's batch is ⌈batch_size / threads⌉ images, so about
            ``batch_size`` images are in the model at once. On a CPU that keeps every core busy where one batch's
            ops, split across the cores, do not (decoding, parsing and most of the tally run on one core). The
            thresholds and tallies are the same for any number (the Metrics are updated in order; the tallies
            are integer sums).

    On the CPU the model runs on oneDNN tensors (:func:`~featurelens.analysis.hooks.onednn_forward`) when that
    gives bitwise the plain forward's outputs on the shard's first batch, checked with one intra-op thread where
    the batches run so, for every batch of that shape (a shorter last batch runs the plain forward; ``onednn``
    in the result).

    Returns {layer name: dict}: ``thresholds`` (U,) float64, ``tally`` (dict of int64 tensors), ``iou`` (U, C+1)
    float64, ``labels`` (:func:`unit_labels`), ``counts`` (:func:`unique_detectors`), ``table`` (DataFrame or None
    if no names), ``frac_active`` (mean |M|/(N·sh·sw) over units, after upsampling), ``frac_active_raw`` (mean
    share of raw values above T_k: ≈ q by construction, lower where ties at T_k, e.g. ReLU zeros, fill the top
    quantile), ``quantile_method`` (the method used), ``top_images`` ((topn, U) dataset indices or None),
    ``forward_passes`` (1 or 2), ``labels_cached`` (whether pass 2 used the labels pass 1 parsed), ``onednn``
    (whether the model ran on oneDNN tensors), ``threads`` (batches at once).
    """
    if not layers:
        raise ValueError("no layer to dissect")
    categories = categories if categories is not None else getattr(data, "categories", None)
    label_names = label_names if label_names is not None else getattr(data, "label_names", None)
    n_images = len(data)
    device = torch.device(device)
    rots = {name: torch.as_tensor(r, dtype=torch.float32, device=device) for name, r in (rotations or {}).items()}
    if threads is None:
        threads = torch.get_num_threads() if device.type == "cpu" else 1
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")

    def rotated(rot: torch.Tensor | None):
        return _as_maps if rot is None else (lambda a: torch.einsum("ij,bjhw->bihw", rot, _as_maps(a)))

    def model_input(x: torch.Tensor) -> torch.Tensor:
        x = x.to(device)
        return preprocess(x) if preprocess is not None else x

    def forward(i: int, x) -> dict[str, torch.Tensor]:
        """Batch ``i``'s recorded outputs: on oneDNN tensors where that was checked exact for its shape."""
        if i == 0:
            return dict(first)
        x = model_input(x)
        return record(model, x.to_mkldnn() if onednn and len(x) == chunk else x)

    def batches(desc: str, read: str, fn):
        """``fn(batch number, x, labels, idx)`` over this shard's batches, in order, ``threads`` at once."""
        part = _Shard(data, *shard, read=read)
        starts = range(0, len(part), chunk)
        if num_workers:  # decoded in the DataLoader's worker processes, read as the threads take them
            loader = torch.utils.data.DataLoader(part, batch_size=chunk, shuffle=False, collate_fn=_collate_indexed,
                                                 num_workers=num_workers)
            out = _in_order(lambda item: fn(item[0], *item[1]), enumerate(loader), threads)
        else:  # decoded by the thread that runs the batch
            def load(i: int):
                return fn(i, *_collate_indexed([part[j] for j in range(starts[i], min(starts[i] + chunk, len(part)))]))

            out = _in_order(load, range(len(starts)), threads)
        if not progress:
            return out
        from tqdm.auto import tqdm

        return tqdm(out, total=len(starts), desc=desc, leave=False)

    K = len(categories) if categories is not None else None
    quant: dict[str, UnitQuantiles] = {}
    method: dict[str, str] = {}
    top: dict[str, TopImages] = {}
    reduce = {name: rotated(rots.get(name)) for name in layers}
    n_shard = len(range(shard[0], n_images, shard[1]))
    if not n_shard:
        raise ValueError("empty dataset")
    # What pass 1 keeps for pass 2 within cache_bytes: the activations first (then pass 2 runs no forward pass),
    # then the parsed labels (then pass 1 decodes the masks beside the forward pass and pass 2 reads no file),
    # the latter only if the first image's labels, times the images, fit the budget on their own.
    cache: list[dict[str, torch.Tensor]] | None = []
    label_cache: list[list[ImageLabels]] | None = None
    if cache_bytes:
        first = _Shard(data, *shard, read="labels")[0][1]
        label_cache = [] if first.nbytes * n_shard <= cache_bytes else None
    kept = 0  # bytes of cached labels
    chunk = -(-batch_size // threads)  # images per thread and forward pass
    probe = _Shard(data, *shard, read="images")  # the first batch, the plain forward's and oneDNN's check
    probe = torch.stack([probe[j][0] for j in range(min(chunk, n_shard))])
    with torch.no_grad(), eval_mode(model), outputs_of(layers, reduce) as record:
        with _one_thread_per_batch(threads), onednn_forward(model, record, model_input(probe),
                                                             concurrent=threads > 1) as (onednn, first):
            pass1 = batches("dissection pass 1/2", _read(True, label_cache is not None),
                            lambda i, x, labels, idx: (forward(i, x), labels, idx))
            for acts, labels, idx in pass1:  # the Metrics are updated here, in order
                acts_bytes = sum(a[0].numel() * 4 for a in acts.values()) * n_shard  # all of them, kept
                if cache is not None:
                    if acts_bytes <= cache_bytes:
                        cache.append(acts)
                    else:
                        cache = None
                if label_cache is not None:
                    kept += sum(lab.nbytes for lab in labels)
                    if (0 if cache is None else acts_bytes) + kept <= cache_bytes:
                        label_cache.append(labels)
                    else:
                        label_cache = None
                for name, a in acts.items():
                    if name not in quant:
                        q_metric, method[name] = make_quantiles(a.shape[1], n_images * a.shape[2] * a.shape[3], q,
                                                                quantile_method, max_bytes)
                        quant[name] = q_metric.to(device)
                        if topn:
                            top[name] = TopImages(a.shape[1], topn).to(device)
                    quant[name].update(a)
                    if name in top:
                        top[name].update(a, idx)
            T = {name: m.compute() for name, m in quant.items()}
            # pass 2: each thread sums into its own tallies (integer sums: the order does not matter), merged after
            parts: list[dict[str, IoUTally]] = []
            local = threading.local()

            def count(i: int, x, labels, _idx) -> None:
                if not hasattr(local, "tally"):
                    local.tally = {name: IoUTally(T[name].numel(), num_labels, primary_category,
                                                  num_categories=K).to(device) for name in layers}
                    parts.append(local.tally)
                acts = forward(i, x) if cache is None else cache[i]
                for name, a in acts.items():
                    local.tally[name].update(a, labels if label_cache is None else label_cache[i], T[name])

            if cache is not None and label_cache is not None:
                second = _in_order(lambda i: count(i, None, None, None), range(len(cache)), threads)
            else:
                second = batches("dissection pass 2/2", _read(cache is None, label_cache is None), count)
            for _ in second:
                pass
            tally = parts[0]
            for other in parts[1:]:
                for name, m in tally.items():
                    m.merge_state(other[name])
            tallies = {name: {k: v.cpu() for k, v in m.compute().items()} for name, m in tally.items()}
    results = {}
    for name, t in tallies.items():
        I = iou(t, primary_category, denominator)
        n_cat = tally[name].num_categories
        res = {"thresholds": T[name].cpu(), "tally": t, "iou": I,
               "labels": unit_labels(I, primary_category, tau, n_cat),
               "counts": unique_detectors(I, primary_category, tau, n_cat), "quantile_method": method[name],
               "frac_active": float(t["act_total"].double().mean() / max(int(t["pixels"]), 1)),
               "frac_active_raw": float(t["raw_active"].double().mean() / max(int(t["raw_values"]), 1)),
               "top_images": top[name].compute().cpu() if name in top else None, "table": None,
               "forward_passes": 2 if cache is None else 1, "labels_cached": label_cache is not None,
               "onednn": onednn, "threads": threads}
        if categories is not None and label_names is not None:
            res["table"] = tally_table(t, I, primary_category, label_names, categories, denominator)
        results[name] = res
    return results


def dissect(model: torch.nn.Module, layer_module: torch.nn.Module, data, num_labels: int, primary_category,
            rotation: torch.Tensor | None = None, **kwargs) -> dict:
    """:func:`dissect_layers` for one layer (optionally rotated by ``rotation``): its result dict."""
    rotations = None if rotation is None else {"layer": rotation}
    return dissect_layers(model, {"layer": layer_module}, data, num_labels, primary_category, rotations=rotations,
                          **kwargs)["layer"]


def unit_masks(model: torch.nn.Module, layer_module: torch.nn.Module, images: torch.Tensor, unit: int,
               threshold: float, mask_size: tuple[int, int], preprocess=None) -> torch.Tensor:
    """M_k(x) (n, sh, sw) bool for one unit on a few images (§2.3: bilinear upsampling, ``S_k > T_k``)."""
    with torch.no_grad(), record_outputs({"layer": layer_module}, _as_maps, stop=True) as captured:
        run_forward(model, preprocess(images) if preprocess is not None else images)
    S = F.interpolate(captured["layer"][:, unit:unit + 1], size=tuple(mask_size), mode="bilinear",
                      align_corners=False)
    return S[:, 0].to(torch.float64) > threshold
