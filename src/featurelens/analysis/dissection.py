"""Network Dissection: streaming per-unit thresholds, IoU tallies, unit labels and detector counts.

Implements /work/shared/spec/dissection.md §2 with plain torch (+ torchmetrics states for DDP reduction):

- :class:`UnitQuantiles` — pass 1, exact per-unit (1 - q) quantile T_k of the raw low-resolution activations
  (§2.2, ``quantile.method: exact_topk``).
- :class:`IoUTally` — pass 2, integer tallies I (U, C+1), G (C+1), A^paper and A^lite (U, n_cat) (§2.3-§2.5).
- :func:`iou`, :func:`unit_labels`, :func:`unique_detectors` (methods A and B), :func:`tally_table` (§2.5-§2.6).
- :func:`dissect` — both passes with a forward hook on ``layer_module`` (eval, no_grad).
- :func:`random_rotation` — Q^alpha for the random-rotation baseline (§2.7).

Label batches are a list (one entry per image) of ``{category: tensor}`` dicts as returned by
:class:`featurelens.data.broden.BrodenDataset`: pixel categories ``(n_layers, sh, sw)`` int64 global label maps,
image-level categories (scene, texture) 1-D tensors of global label numbers. Use :func:`collate_broden` as the
DataLoader ``collate_fn``. Label 0 (unlabeled) never counts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torchmetrics import Metric

__all__ = [
    "EPS", "IoUTally", "UnitQuantiles", "collate_broden", "dissect", "iou", "random_rotation", "tally_table",
    "unique_detectors", "unit_labels",
]

EPS = 1e-10  # §2.5 epsilon in the IoU denominator
IMAGE_LEVEL = frozenset({"scene", "texture"})


def collate_broden(batch):
    """DataLoader collate: ``[(image, labels), ...] -> (stacked images, [labels, ...])``."""
    xs, labels = zip(*batch, strict=True)
    return torch.stack(list(xs)), list(labels)


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
    float64). Memory: 8·m·U bytes (e.g. q=0.005, N=63,305, 7×7, U=2048: m=15,512 -> 254 MB; use float32
    activations chunked by unit if that is too much). Each update merges buffer ∪ batch and keeps the top m.
    DDP: ``buffer`` is reduced by "cat" (→ (world·m, U)) and re-top-m'd in :meth:`compute`; ``count`` is summed.
    ``compute`` uses the number of values actually seen; it raises if the buffer cannot hold the needed order
    statistic (n − ⌊r⌋ > m, i.e. more values were seen than ``num_values`` allowed for).
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = None

    def __init__(self, num_units: int, num_values: int, q: float | Sequence[float] | torch.Tensor = 0.005,
                 **kwargs):
        super().__init__(**kwargs)
        qt = torch.as_tensor(q, dtype=torch.float64)
        if qt.ndim == 0:
            qt = qt.expand(num_units).clone()
        if qt.shape != (num_units,) or (qt < 0).any() or (qt >= 1).any():
            raise ValueError(f"q must be a float in [0, 1) or a length-{num_units} vector of them")
        if num_values < 1:
            raise ValueError("num_values must be >= 1")
        self.num_units = int(num_units)
        self.num_values = int(num_values)
        self.q = qt
        self.m = min(int(math.ceil(float(qt.max()) * (num_values - 1))) + 2, num_values)
        self.add_state("buffer", default=torch.full((self.m, num_units), -math.inf, dtype=torch.float64),
                       dist_reduce_fx="cat")
        self.add_state("count", default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, acts: torch.Tensor) -> None:
        """acts: (B, U, H, W) (or (B, U)) raw activations."""
        if acts.shape[1] != self.num_units:
            raise ValueError(f"expected {self.num_units} units, got shape {tuple(acts.shape)}")
        vals = acts.detach().to(torch.float64).transpose(0, 1).reshape(self.num_units, -1).T  # (n_b, U)
        merged = torch.cat([self.buffer, vals], dim=0)
        self.buffer = merged.topk(self.m, dim=0).values
        self.count += vals.shape[0]

    def compute(self) -> torch.Tensor:
        """T (U,) float64."""
        buf = self.buffer
        if buf.ndim == 3:  # some torchmetrics versions stack instead of cat
            buf = buf.reshape(-1, buf.shape[-1])
        n = int(self.count)
        if n == 0:
            raise RuntimeError("UnitQuantiles.compute() before any update")
        top = buf.topk(min(self.m, buf.shape[0]), dim=0).values  # descending
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
class IoUTally(Metric):
    """Integer IoU tallies (§2.5), all sum-reduced and fixed-size.

    States: ``intersection`` I (U, C+1), ``label_count`` G (C+1), ``act_paper`` A^paper (U, n_cat) (images
    having ≥1 label of primary category κ), ``act_lite`` A^lite (U, n_cat) ([LITE]: image adds |M_k| only if
    M_k overlaps a pixel label of category κ or the image has an image-level label of κ), ``act_total``
    (U,) Σ_x |M_k(x)|, ``pixels`` Σ_x sh·sw, ``images``.

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
        self.add_state("images", default=torch.tensor(0, dtype=z), dist_reduce_fx="sum")

    def _labels_of(self, labels: Mapping[str, torch.Tensor], mask_size, device):
        """-> (pixel_ids (n,) unique label*P + pixel for label>0, image-level label set (m,), (sh, sw))."""
        size = None
        pix, img = [], []
        for cat, t in labels.items():
            t = torch.as_tensor(t)
            if cat in self.image_level or t.ndim <= 1:
                img.append(t.reshape(-1).to(device=device, dtype=torch.int64))
            else:
                if t.ndim == 2:
                    t = t.unsqueeze(0)
                if size is None:
                    size = (int(t.shape[-2]), int(t.shape[-1]))
                elif size != (int(t.shape[-2]), int(t.shape[-1])):
                    raise ValueError(f"category {cat!r}: mask size {tuple(t.shape[-2:])} != {size}")
                pix.append(t.reshape(t.shape[0], -1).to(device=device, dtype=torch.int64))
        if size is None:
            if mask_size is None:
                raise ValueError("image without pixel categories: pass mask_size")
            size = (int(mask_size[0]), int(mask_size[1]))
        P = size[0] * size[1]
        img_set = torch.unique(torch.cat(img)) if img else torch.zeros(0, dtype=torch.int64, device=device)
        img_set = img_set[img_set > 0]
        if pix:
            lab = torch.cat(pix, dim=0)  # (layers, P); layers OR-ed per label (§2.4)
            pos = torch.arange(P, device=device).expand_as(lab)
            keep = lab > 0
            if img_set.numel():  # an image-level label already covers the whole grid
                keep &= ~torch.isin(lab, img_set)
            ids = torch.unique(lab[keep] * P + pos[keep])
        else:
            ids = torch.zeros(0, dtype=torch.int64, device=device)
        return ids, img_set, size

    def update(self, acts: torch.Tensor, labels: Sequence[Mapping[str, torch.Tensor]],
               thresholds: torch.Tensor, mask_size: tuple[int, int] | None = None) -> None:
        """acts (B, U, h, w) raw activations; labels: B dicts {category: tensor}; thresholds (U,)."""
        if len(labels) != acts.shape[0]:
            raise ValueError(f"{acts.shape[0]} activation maps but {len(labels)} label dicts")
        device = acts.device
        T = thresholds.to(device=device, dtype=torch.float64)
        onehot = self._cat_onehot.to(device)
        U, L = self.num_units, self.num_labels
        for b in range(acts.shape[0]):
            ids, img_set, (sh, sw) = self._labels_of(labels[b], mask_size, device)
            P = sh * sw
            a = acts[b:b + 1].detach()
            live = a.reshape(U, -1).amax(dim=1).to(torch.float64) > T  # skip rule (§2.3)
            M = torch.zeros(U, P, dtype=torch.bool, device=device)
            if live.any():
                li = live.nonzero().squeeze(1)
                S = F.interpolate(a[:, li].float(), size=(sh, sw), mode="bilinear", align_corners=False)
                M[li] = S[0].reshape(len(li), P).to(torch.float64) > T[li, None]
            nM = M.sum(dim=1)  # (U,)
            # per-image intersections I_x (U, C+1)
            Ix = torch.zeros(U, L, dtype=torch.int64, device=device)
            Gx = torch.zeros(L, dtype=torch.int64, device=device)
            if ids.numel():
                lab, pos = ids // P, ids % P
                Gx += torch.bincount(lab, minlength=L)
                if live.any():
                    Ix.index_add_(1, lab, M[:, pos].to(torch.int64))
            if img_set.numel():
                Gx[img_set] += P
                Ix[:, img_set] += nM[:, None]
            self.intersection += Ix
            self.label_count += Gx
            # paper denominator: categories present in the image
            present = torch.zeros(L, dtype=torch.bool, device=device)
            present[Gx > 0] = True
            cats = (present.float() @ onehot) > 0  # (n_cat,)
            self.act_paper += nM[:, None] * cats[None, :].to(torch.int64)
            # lite denominator: M_k overlaps a label of category κ (image-level labels: whole grid)
            overlap = ((Ix > 0).float() @ onehot) > 0  # (U, n_cat)
            self.act_lite += nM[:, None] * overlap.to(torch.int64)
            self.act_total += nM
            self.pixels += P
            self.images += 1

    def compute(self) -> dict[str, torch.Tensor]:
        return {"intersection": self.intersection, "label_count": self.label_count,
                "act_paper": self.act_paper, "act_lite": self.act_lite, "act_total": self.act_total,
                "pixels": self.pixels, "images": self.images}


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
    A = t["act_paper" if denominator == "paper" else "act_lite"].cpu()
    I, G = t["intersection"].cpu(), t["label_count"].cpu()
    rows = []
    for k in range(iou_.shape[0]):
        row = {"unit": k + 1, "category": categories[int(ul["category"][k])],
               "label": label_names[int(ul["label"][k])], "score": float(ul["score"][k])}
        for j, cat in enumerate(categories):
            c = int(ul["label_percat"][k, j])
            row[f"{cat}-label"] = label_names[c] if c > 0 else ""
            row[f"{cat}-truth"] = int(G[c]) if c > 0 else 0
            row[f"{cat}-activation"] = int(A[k, j])
            row[f"{cat}-intersect"] = int(I[k, c]) if c > 0 else 0
            row[f"{cat}-iou"] = float(ul["score_percat"][k, j])
        rows.append(row)
    df = pd.DataFrame(rows)
    return df.sort_values("score", ascending=False, kind="stable").reset_index(drop=True)


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
def dissect(model: torch.nn.Module, layer_module: torch.nn.Module, data, num_labels: int, primary_category,
            q: float | Sequence[float] = 0.005, denominator: str = "paper", device: str | torch.device = "cpu",
            rotation: torch.Tensor | None = None, batch_size: int = 64, tau: float = 0.04,
            categories: Sequence[str] | None = None, label_names: Sequence[str] | None = None) -> dict:
    """Run both streaming passes (§2.2 thresholds, §2.5 tallies) on ``layer_module``'s output.

    Args:
        data: a Dataset of ``(x, {category: tensor})`` items (wrapped in a DataLoader with
            :func:`collate_broden`) or a DataLoader yielding ``(x, [labels per image])``. Its dataset must be
            sized (n = N·H·W is needed before pass 1).
        rotation: optional (U, U) matrix R; the hooked activations are replaced by R·A per pixel (§2.7).
        categories / label_names: for the table (default: ``data.categories`` / ``data.label_names`` if present).

    Returns dict: ``thresholds`` (U,) float64, ``tally`` (dict of int64 tensors), ``iou`` (U, C+1) float64,
    ``labels`` (:func:`unit_labels`), ``counts`` (:func:`unique_detectors`), ``table`` (DataFrame or None if no
    names), ``frac_active`` (mean |M|/(N·sh·sw) over units).
    """
    loader = data if isinstance(data, torch.utils.data.DataLoader) else torch.utils.data.DataLoader(
        data, batch_size=batch_size, shuffle=False, collate_fn=collate_broden)
    dataset = loader.dataset
    categories = categories if categories is not None else getattr(dataset, "categories", None)
    label_names = label_names if label_names is not None else getattr(dataset, "label_names", None)
    n_images = len(dataset)
    device = torch.device(device)
    captured: dict[str, torch.Tensor] = {}
    rot = None if rotation is None else torch.as_tensor(rotation, dtype=torch.float32, device=device)

    def hook(_module, _inp, out):
        a = out[0] if isinstance(out, (tuple, list)) else out
        a = a.detach().float()
        if a.ndim == 2:
            a = a[:, :, None, None]
        if rot is not None:
            a = torch.einsum("ij,bjhw->bihw", rot, a)
        captured["a"] = a

    was_training = model.training
    model.eval()
    handle = layer_module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            quant = None
            for x, _ in loader:
                model(x.to(device))
                a = captured.pop("a")
                if quant is None:
                    quant = UnitQuantiles(a.shape[1], n_images * a.shape[2] * a.shape[3], q).to(device)
                quant.update(a)
            if quant is None:
                raise ValueError("empty dataset")
            T = quant.compute()
            K = len(categories) if categories is not None else None
            tally = IoUTally(a.shape[1], num_labels, primary_category, num_categories=K).to(device)
            for x, labels in loader:
                model(x.to(device))
                tally.update(captured.pop("a"), labels, T)
            t = {k: v.cpu() for k, v in tally.compute().items()}
    finally:
        handle.remove()
        model.train(was_training)
    I = iou(t, primary_category, denominator)
    K = tally.num_categories
    out = {"thresholds": T.cpu(), "tally": t, "iou": I, "labels": unit_labels(I, primary_category, tau, K),
           "counts": unique_detectors(I, primary_category, tau, K),
           "frac_active": float(t["act_total"].double().mean() / max(int(t["pixels"]), 1)), "table": None}
    if categories is not None and label_names is not None:
        out["table"] = tally_table(t, I, primary_category, label_names, categories, denominator)
    return out
