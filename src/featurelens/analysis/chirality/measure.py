"""Feature chirality of CNN kernels and feature maps (spec: ``shared/spec/chirality.md``).

Background: Ji et al., "Feature Chirality in Deep Learning Models" (arXiv 2305.03966) and Lin et al.,
"Visual Chirality" (CVPR 2020).  Only the abstract of the former is public, so the measure below is this
project's reading of it (spec §2).

Kernel-level measure (spec §2.1-§2.4)
-------------------------------------
A *feature* is one 2-D kernel slice ``w = W[o, i]`` of a conv weight ``W`` of shape ``(O, I, kh, kw)``.
``T`` is the horizontal mirror ``(Tw)[r, j] = w[r, kw-1-j]``; ``V`` the vertical mirror; for square kernels
``D`` (transpose) and ``A`` (anti-transpose).  Per slice, with ``w`` read as a vector (§2.2)::

    rho(w) = <w, Tw> / ||w||^2            in [-1, 1]  (cosine between w and its mirror)
    c(w)   = ||w - Tw|| / (2 ||w||)       = sqrt((1 - rho) / 2)  in [0, 1]

``c = 0`` iff the slice is mirror symmetric, ``c = 1`` iff it is mirror antisymmetric.  ``c_v`` uses ``V``
and ``c_d4`` is the per-slice minimum over ``T, V, D, A`` (square kernels) or ``T, V`` (otherwise).
Everything is computed in float64; slices with ``||w|| <= eps`` are skipped and counted.

Per layer (§2.4): ``C_l`` is the mean of ``c`` over kept slices (primary, invariant to per-channel scale);
the pooled value ``C~_l = sqrt((1 - rho~)/2)`` uses ``rho~ = sum_s <w_s, Tw_s> / sum_s ||w_s||^2``; both are
also reported divided by their i.i.d.-init baselines ``c0`` (§5.3, :func:`c0_gaussian`) and ``c~0``
(:func:`c0_pooled`).  Per model: unweighted / parameter-weighted / normalised layer means (§2.4, §4).

Eligible layers (§2.3): every ``nn.Conv2d`` whose mirrored axis is longer than one (1x1 convs are excluded,
``T`` is the identity on them).  Optionally the first ``nn.Linear`` after the conv stack of AlexNet/VGG is
read as a conv with kernel ``H x H`` (see :func:`eligible_convs`).

Activation-level measure (§2.5)
-------------------------------
``F_l = mean_x ||phi(Tx) - T phi(x)|| / (||phi(Tx)|| + ||T phi(x)||)`` and
``G_l = mean_x [1 - cos(GAP phi(Tx), GAP phi(x))]`` at a few stages, plus the logit flip consistency
(:func:`fmap_chirality`).  Strided convs/pools only commute with the mirror at *compatible* input widths
(§2.5 "stride caveat"); :func:`stride_compatible` / :func:`compatible_width` find them.

This module is plain torch and works on any ``nn.Module``; it does not import Lightning.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator

import torch
from scipy.special import gammaln
from torch import Tensor, nn

from featurelens.analysis.hooks import eval_mode, forward_hooks

__all__ = [
    "FLIPS",
    "mirror",
    "slice_rho",
    "slice_c",
    "c0_gaussian",
    "c0_pooled",
    "eligible_convs",
    "layer_stats",
    "model_chirality",
    "stride_compatible",
    "compatible_width",
    "default_stages",
    "fmap_chirality",
    "set_level_conv1",
    "symmetrize_",
]

#: The elementary mirrors: horizontal (T), vertical (V), diagonal (D) and anti-diagonal (A).
FLIPS = ("h", "v", "d", "a")
#: Names accepted in ``flips`` arguments of the aggregate functions ("d4": best of the dihedral mirrors).
_AGG_FLIPS = ("h", "v", "d", "a", "d4")

#: Per-layer entries copied into the flat scalar dict of :func:`model_chirality` (spec §4).
_LAYER_SCALAR_KEYS = (
    "c", "c_pooled", "c_norm", "rho_mean", "frac_sym", "frac_anti", "c_v", "c_d4", "n_skipped",
)

#: Number of kernel entries converted to float64 at once (bounds memory on huge layers, e.g. VGG fc-as-conv).
_CHUNK_ELEMS = 1 << 22

#: Denominator guard of the feature-map measures (spec §2.5).
_FMAP_EPS = 1e-12


# ----------------------------------------------------------------------------------------------------------
# Mirrors and per-slice measures
# ----------------------------------------------------------------------------------------------------------
def mirror(w: Tensor, flip: str) -> Tensor:
    """Apply a mirror to the last two dims ``(kh, kw)`` of ``w`` (spec §2.1).

    ``"h"``: ``w[..., r, kw-1-j]``; ``"v"``: ``w[..., kh-1-r, j]``; ``"d"``: ``w[..., j, r]``;
    ``"a"``: ``w[..., k-1-j, k-1-r]``.  ``"d"`` and ``"a"`` need square kernels.
    """
    if w.dim() < 2:
        raise ValueError(f"mirror needs a tensor with at least 2 dims, got shape {tuple(w.shape)}")
    if flip == "h":
        return w.flip(-1)
    if flip == "v":
        return w.flip(-2)
    if flip in ("d", "a"):
        if w.shape[-1] != w.shape[-2]:
            raise ValueError(f"flip {flip!r} needs a square kernel, got {tuple(w.shape[-2:])}")
        if flip == "d":
            return w.transpose(-2, -1)
        return w.flip((-2, -1)).transpose(-2, -1)
    raise ValueError(f"unknown flip {flip!r}; expected one of {FLIPS}")


def _slice_moments(w: Tensor, flips: tuple[str, ...]) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-slice ``||w_s||^2`` and ``<w_s, M w_s>`` for each mirror ``M`` in ``flips`` (float64, on CPU).

    ``w`` has shape ``(..., kh, kw)``; the leading dims are flattened into one slice axis.  Work is chunked so
    that at most :data:`_CHUNK_ELEMS` entries are held in float64 at a time.
    """
    if w.dim() < 2:
        raise ValueError(f"expected a tensor (..., kh, kw), got shape {tuple(w.shape)}")
    kh, kw = w.shape[-2:]
    slices = w.detach().reshape(-1, kh, kw)
    rows = max(1, _CHUNK_ELEMS // max(1, kh * kw))
    nrm2_parts: list[Tensor] = []
    dot_parts: dict[str, list[Tensor]] = {f: [] for f in flips}
    for start in range(0, slices.shape[0], rows):
        chunk = slices[start : start + rows].to(torch.float64)
        nrm2_parts.append((chunk * chunk).sum(dim=(-2, -1)).cpu())
        for f in flips:
            dot_parts[f].append((chunk * mirror(chunk, f)).sum(dim=(-2, -1)).cpu())
    empty = torch.zeros(0, dtype=torch.float64)
    nrm2 = torch.cat(nrm2_parts) if nrm2_parts else empty
    dots = {f: (torch.cat(p) if p else empty) for f, p in dot_parts.items()}
    return nrm2, dots


def _kept_mask(nrm2: Tensor, eps: float) -> Tensor:
    """Slices whose norm exceeds ``eps`` (spec §2.2 guard)."""
    return nrm2.sqrt() > eps


def _rho(dot: Tensor, nrm2: Tensor) -> Tensor:
    """``<w, Mw> / ||w||^2`` clamped to its mathematical range [-1, 1] (removes round-off overshoot)."""
    return (dot / nrm2).clamp(-1.0, 1.0)


def slice_rho(w: Tensor, flip: str = "h", eps: float = 1e-12) -> tuple[Tensor, Tensor]:
    """Per-slice mirror cosine ``rho = <w, Mw>/||w||^2`` (spec §2.2).

    Args:
        w: tensor ``(..., kh, kw)``; any leading dims (a single 2-D kernel is one slice).
        flip: one of :data:`FLIPS`.
        eps: slices with ``||w|| <= eps`` are skipped.

    Returns:
        ``(rho, n_skipped)``: ``rho`` is a flat float64 CPU tensor over the kept slices (in slice order),
        ``n_skipped`` a 0-d int64 tensor.
    """
    nrm2, dots = _slice_moments(w, (flip,))
    keep = _kept_mask(nrm2, eps)
    n_skipped = torch.tensor(int((~keep).sum()), dtype=torch.int64)
    return _rho(dots[flip][keep], nrm2[keep]), n_skipped


def slice_c(rho: Tensor) -> Tensor:
    """Chirality ``c = sqrt(clamp((1 - rho)/2, 0, 1))`` from the mirror cosine (spec §2.2)."""
    return ((1.0 - rho) / 2.0).clamp(0.0, 1.0).sqrt()


# ----------------------------------------------------------------------------------------------------------
# Random-init baselines (spec §5.3)
# ----------------------------------------------------------------------------------------------------------
def c0_gaussian(kh: int, kw: int) -> float:
    """Expected per-slice ``c`` for i.i.d. zero-mean Gaussian entries, mirrored along ``kw`` (spec §5.3).

    With ``m_a = kh*floor(kw/2)`` antisymmetric and ``m_s = kh*ceil(kw/2)`` symmetric degrees of freedom,
    ``c^2 ~ Beta(m_a/2, m_s/2)`` and ``E[c] = G(a+1/2) G(a+b) / (G(a) G(a+b+1/2))`` (``G`` = Gamma).
    Returns 0 for ``kw == 1`` (the mirror is the identity).
    """
    if kh < 1 or kw < 1:
        raise ValueError(f"kernel size must be positive, got {kh}x{kw}")
    m_a, m_s = kh * (kw // 2), kh * ((kw + 1) // 2)
    if m_a == 0:
        return 0.0
    a, b = m_a / 2.0, m_s / 2.0
    return float(math.exp(gammaln(a + 0.5) + gammaln(a + b) - gammaln(a) - gammaln(a + b + 0.5)))


def c0_pooled(kh: int, kw: int) -> float:
    """Large-layer limit of the pooled chirality for any i.i.d. zero-mean init: ``sqrt(floor(kw/2)/kw)``."""
    if kh < 1 or kw < 1:
        raise ValueError(f"kernel size must be positive, got {kh}x{kw}")
    return math.sqrt((kw // 2) / kw)


# ----------------------------------------------------------------------------------------------------------
# Eligible layers (spec §2.3)
# ----------------------------------------------------------------------------------------------------------
def _unwrap(model: nn.Module) -> nn.Module:
    """Strip ``torch.compile`` / (Distributed)DataParallel wrappers so names are the plain qualified names."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def _is_eligible(kh: int, kw: int, flip: str) -> bool:
    """Whether the mirrored axis of a ``kh x kw`` kernel is longer than one for ``flip``."""
    if flip == "h":
        return kw > 1
    if flip == "v":
        return kh > 1
    if flip in ("d", "a"):
        return kh == kw > 1
    if flip == "d4":
        return kh > 1 or kw > 1
    raise ValueError(f"unknown flip {flip!r}; expected one of {_AGG_FLIPS}")


def _fc_as_conv(model: nn.Module) -> tuple[str, Tensor] | None:
    """The first ``nn.Linear`` registered after the last ``nn.Conv2d``, reshaped to ``(O, C, H, H)``.

    ``C`` is the last conv's ``out_channels``; the linear layer qualifies only if ``in_features == C*H*H``
    (PyTorch's ``(C, H, W)`` flatten order, square map).  AlexNet: ``classifier.1 -> 4096x256x6x6``;
    VGG: ``classifier.0 -> 4096x512x7x7``.  Only the *first* linear layer is considered, so deeper FCs whose
    width happens to factorise are never picked.
    """
    modules = list(model.named_modules())
    last_conv = max((i for i, (_, m) in enumerate(modules) if isinstance(m, nn.Conv2d)), default=None)
    if last_conv is None:
        return None
    channels = modules[last_conv][1].out_channels
    for name, m in modules[last_conv + 1 :]:
        if isinstance(m, nn.Linear):
            n = m.in_features
            if n % channels:
                return None
            side = math.isqrt(n // channels)
            if side * side * channels != n:
                return None
            weight = m.weight.detach().reshape(m.out_features, channels, side, side)
            return f"{name}(as_conv)", weight
    return None


def _all_kernels(model: nn.Module, include_fc_as_conv: bool) -> Iterator[tuple[str, Tensor]]:
    """Every ``nn.Conv2d`` weight (qualified name, detached 4-D weight), then the optional fc-as-conv."""
    model = _unwrap(model)
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d) and not isinstance(m.weight, nn.parameter.UninitializedParameter):
            yield name, m.weight.detach()
    if include_fc_as_conv:
        fc = _fc_as_conv(model)
        if fc is not None:
            yield fc


def eligible_convs(
    model: nn.Module, flip: str = "h", include_fc_as_conv: bool = False
) -> list[tuple[str, Tensor]]:
    """Layers whose kernels are measured, as ``(qualified name, detached weight (O, I/groups, kh, kw))``.

    A ``nn.Conv2d`` (grouped, depthwise and dilated included) is eligible for ``flip`` if its mirrored axis
    is longer than one: ``kw > 1`` for ``"h"``, ``kh > 1`` for ``"v"``, ``kh == kw > 1`` for ``"d"``/``"a"``
    (``"d4"``: any non-1x1 kernel).  1x1 convs are never eligible (spec §2.3).

    ``include_fc_as_conv``: also return the first ``nn.Linear`` after the conv stack read as a conv with an
    ``H x H`` kernel over the last conv's ``C`` channels, named ``"<name>(as_conv)"`` (e.g.
    ``"classifier.1(as_conv)"`` for AlexNet, 4096x256x6x6).  It is added only when its ``in_features`` equal
    ``C*H*H``; for ResNets (``H = 1``) it is therefore never eligible.  Modules are taken in registration
    order, which for torchvision models is the forward order.
    """
    return [(n, w) for n, w in _all_kernels(model, include_fc_as_conv) if _is_eligible(*w.shape[-2:], flip)]


# ----------------------------------------------------------------------------------------------------------
# Layer and model aggregates (spec §2.4, §4)
# ----------------------------------------------------------------------------------------------------------
def _mean(x: Tensor) -> float:
    """Mean as a float; NaN for an empty tensor."""
    return float(x.mean()) if x.numel() else float("nan")


def layer_stats(
    weight: Tensor,
    eps: float = 1e-12,
    flips: tuple[str, ...] | list[str] = ("h", "v", "d4"),
    hist_bins: int = 40,
    sym_threshold: float = 0.9,
) -> dict:
    """Chirality statistics of one layer's kernels (spec §2.2, §2.4), all computed in float64.

    Args:
        weight: ``(O, I, kh, kw)`` (any leading dims are accepted and flattened into slices).
        eps: slices with ``||w|| <= eps`` are skipped and counted in ``n_skipped``.
        flips: extra variants to report besides the primary ``"h"``: ``"v"`` -> ``c_v``, ``"d4"`` -> ``c_d4``
            (``"d"``/``"a"`` -> ``c_d``/``c_a`` for square kernels).
        hist_bins: number of histogram bins of ``rho`` on ``[-1, 1]``.
        sym_threshold: ``frac_sym = P(rho > t)``, ``frac_anti = P(rho < -t)``.

    Returns:
        A dict with ``kh, kw, params (=weight.numel()), n_slices`` (kept slices), ``n_skipped`` and, when
        ``kw > 1`` (the horizontal mirror is not the identity):

        - ``c`` (slice mean), ``c_pooled``, ``c_norm = c / c0_gaussian``,
          ``c_pooled_norm = c_pooled / c0_pooled``, ``rho_pooled``, ``rho_mean``, ``frac_sym``, ``frac_anti``;
        - ``c_d4`` (if ``"d4"`` in flips): mean over slices of ``min(c_T, c_V, c_D, c_A)`` for square kernels,
          ``min(c_T, c_V)`` otherwise;
        - ``rho`` (float64 CPU tensor of kept-slice rho), ``hist`` (int64 counts, ``hist_bins`` bins on
          ``[-1, 1]``), ``rho_filter`` (per-filter pooled rho over the ``I`` slices; 4-D weights only).

        ``c_v`` is present if ``"v"`` in flips and ``kh > 1``.  Means over zero kept slices are NaN.
    """
    flips = tuple(flips)
    for f in flips:
        if f not in _AGG_FLIPS:
            raise ValueError(f"unknown flip {f!r}; expected a subset of {_AGG_FLIPS}")
    if weight.dim() < 2:
        raise ValueError(f"expected a weight (..., kh, kw), got shape {tuple(weight.shape)}")
    kh, kw = (int(s) for s in weight.shape[-2:])
    square = kh == kw
    has_h = kw > 1
    want_d4 = "d4" in flips and has_h

    needed = []
    if has_h:
        needed.append("h")
    if ("v" in flips and kh > 1) or want_d4:
        needed.append("v")
    for f in ("d", "a"):
        if square and kh > 1 and (f in flips or want_d4):
            needed.append(f)
    nrm2, dots = _slice_moments(weight, tuple(needed))
    keep = _kept_mask(nrm2, eps)
    nrm2_k = nrm2[keep]
    rhos = {f: _rho(dots[f][keep], nrm2_k) for f in needed}

    out: dict = {
        "kh": kh,
        "kw": kw,
        "params": int(weight.numel()),
        "n_slices": int(keep.sum()),
        "n_skipped": int((~keep).sum()),
    }
    if has_h:
        rho = rhos["h"]
        c = _mean(slice_c(rho))
        if rho.numel():  # norm^2-weighted mean of slice rho == <W, TW> / ||W||^2 over kept slices
            rho_pooled_t = _rho(dots["h"][keep].sum(), nrm2_k.sum())
            rho_pooled, c_pooled = float(rho_pooled_t), float(slice_c(rho_pooled_t))
        else:
            rho_pooled = c_pooled = float("nan")
        out.update(
            c=c,
            c_pooled=c_pooled,
            c_norm=c / c0_gaussian(kh, kw),
            c_pooled_norm=c_pooled / c0_pooled(kh, kw),
            rho_pooled=rho_pooled,
            rho_mean=_mean(rho),
            frac_sym=_mean((rho > sym_threshold).double()),
            frac_anti=_mean((rho < -sym_threshold).double()),
            rho=rho,
            hist=torch.histc(rho, bins=hist_bins, min=-1.0, max=1.0).long(),
        )
        if weight.dim() == 4:
            n_out = weight.shape[0]
            num = dots["h"].reshape(n_out, -1).sum(1)
            den = nrm2.reshape(n_out, -1).sum(1)
            out["rho_filter"] = torch.where(den.sqrt() > eps, num / den, torch.nan).clamp(-1.0, 1.0)
    if "v" in flips and kh > 1:
        out["c_v"] = _mean(slice_c(rhos["v"]))
    for f in ("d", "a"):
        if f in flips and f in rhos:
            out[f"c_{f}"] = _mean(slice_c(rhos[f]))
    if want_d4:
        best = torch.stack([rhos[f] for f in ("h", "v", "d", "a") if f in rhos]).amax(0)
        out["c_d4"] = _mean(slice_c(best))
    return out


def _finite_mean(values: list[float]) -> float:
    vals = [v for v in values if not math.isnan(v)]
    return sum(vals) / len(vals) if vals else float("nan")


def model_chirality(
    model: nn.Module,
    *,
    flips: tuple[str, ...] | list[str] = ("h", "v", "d4"),
    eps: float = 1e-12,
    hist_bins: int = 40,
    sym_threshold: float = 0.9,
    include_fc_as_conv: bool = False,
) -> dict:
    """Kernel chirality of every eligible layer and the model aggregates (spec §2.4, §4).

    Returns ``{"scalars": {...}, "layers": {name: layer_stats(...)}}``.  ``scalars`` is flat (names without
    the ``"chirality/"`` prefix, values are floats):

    - ``model`` (mean of ``C_l``; headline), ``model_pooled`` (mean of ``C~_l``), ``model_paramw`` (mean of
      ``C_l`` weighted by ``O*I*kh*kw``), ``model_norm`` (mean of ``C_l/c0``), ``model_d4`` — over the
      layers with ``kw > 1``;
    - ``model_v`` — mean of ``c_v`` over the layers with ``kh > 1``;
    - ``layer/<name>/{c, c_pooled, c_norm, rho_mean, frac_sym, frac_anti, c_v, c_d4, n_skipped}``, where
      present.

    The layer set is the union of the ``"h"``-eligible convs and, if ``"v"`` in flips, the ``"v"``-eligible
    ones (``k x 1`` convs only report ``c_v``).  Layers without any kept slice (all-zero weights) are left
    out of the model means.  A model without eligible layer (e.g. an MLP) warns once and returns empty dicts.
    """
    flips = tuple(flips)
    kernels = [
        (n, w)
        for n, w in _all_kernels(model, include_fc_as_conv)
        if _is_eligible(*w.shape[-2:], "h") or ("v" in flips and _is_eligible(*w.shape[-2:], "v"))
    ]
    if not kernels:
        warnings.warn(
            f"model_chirality: {type(_unwrap(model)).__name__} has no eligible conv layer "
            "(no Conv2d with a kernel larger than 1x1); nothing to measure",
            stacklevel=2,
        )
        return {"scalars": {}, "layers": {}}

    layers = {name: layer_stats(w, eps=eps, flips=flips, hist_bins=hist_bins, sym_threshold=sym_threshold)
              for name, w in kernels}
    scalars: dict[str, float] = {}
    primary = [s for s in layers.values() if "c" in s and not math.isnan(s["c"])]
    if primary:
        total = sum(s["params"] for s in primary)
        scalars["model"] = _finite_mean([s["c"] for s in primary])
        scalars["model_pooled"] = _finite_mean([s["c_pooled"] for s in primary])
        scalars["model_paramw"] = sum(s["params"] * s["c"] for s in primary) / total
        scalars["model_norm"] = _finite_mean([s["c_norm"] for s in primary])
    with_v = [s["c_v"] for s in layers.values() if "c_v" in s]
    if with_v:
        scalars["model_v"] = _finite_mean(with_v)
    with_d4 = [s["c_d4"] for s in primary if "c_d4" in s]
    if with_d4:
        scalars["model_d4"] = _finite_mean(with_d4)
    for name, s in layers.items():
        for key in _LAYER_SCALAR_KEYS:
            if key in s:
                scalars[f"layer/{name}/{key}"] = float(s[key])
    return {"scalars": scalars, "layers": layers}


# ----------------------------------------------------------------------------------------------------------
# Stride compatibility (spec §2.5 "stride caveat")
# ----------------------------------------------------------------------------------------------------------
def _width_arg(v) -> int:
    """Width component (index 1) of an int-or-pair module argument."""
    return int(v[1]) if isinstance(v, (tuple, list)) else int(v)


def _op_commutes(m: nn.Module, n: int) -> bool:
    """Whether conv/pool ``m`` applied to input width ``n`` commutes with the horizontal mirror."""
    k = _width_arg(m.kernel_size)
    s = _width_arg(m.stride if m.stride is not None else m.kernel_size)
    d = _width_arg(getattr(m, "dilation", 1))
    p = m.padding
    if isinstance(p, str):
        if p == "valid":
            p = 0
        else:  # "same" (stride 1 only): padding is asymmetric when the receptive field d*(k-1) is odd
            return (d * (k - 1)) % 2 == 0
    p = _width_arg(p)
    return (n + 2 * p - d * (k - 1) - 1) % s == 0


def _first_param(model: nn.Module) -> Tensor | None:
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            return t
    return None


def stride_compatible(model: nn.Module, width: int, in_channels: int = 3, height: int | None = None) -> bool:
    """Whether every strided conv/pool of ``model`` commutes with the mirror at input ``width``.

    Traces one forward (eval mode, no grad) on zeros of shape ``(1, in_channels, height or width, width)``
    with forward pre-hooks on every ``Conv2d``/``MaxPool2d``/``AvgPool2d`` that record the input width, then
    checks ``(n + 2p - d(k-1) - 1) % s == 0`` along the width axis (index 1 of kernel/stride/padding/
    dilation) for each call.  Adaptive pooling always commutes and is not checked; functional subsampling
    (e.g. CIFAR ResNet option-A shortcuts ``x[..., ::2]``) is invisible to the hooks.  The input takes the
    dtype/device of the model's first floating parameter (float32 on CPU if it has none), so float64 models
    work too.  Any exception from the forward (e.g. input too small) returns False.  Each module's
    train/eval flag is restored afterwards.
    """
    model = _unwrap(model)
    ref = _first_param(model)
    dtype = ref.dtype if ref is not None else torch.float32
    device = ref.device if ref is not None else torch.device("cpu")
    calls: list[tuple[nn.Module, int]] = []

    def pre_hook(m: nn.Module, args) -> None:
        if args and isinstance(args[0], Tensor):
            calls.append((m, int(args[0].shape[-1])))

    subsampling = [(m, pre_hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d))]
    try:
        with forward_hooks(subsampling, pre=True), eval_mode(model), torch.no_grad():
            x = torch.zeros(1, in_channels, height or width, width, dtype=dtype, device=device)
            model(x)
    except Exception:  # noqa: BLE001 -- any failure means the model does not accept this width
        return False
    return all(_op_commutes(m, n) for m, n in calls)


def compatible_width(model: nn.Module, n: int, in_channels: int = 3, max_delta: int = 64) -> int:
    """``n`` if :func:`stride_compatible`, else the nearest compatible width the model accepts.

    Candidates are tried in the order ``n, n+1, n-1, n+2, n-2, ...`` (ties go upward), up to ``max_delta``.
    Each candidate costs one forward pass at that width.  Raises ``ValueError`` if none is found.
    """
    for delta in range(max_delta + 1):
        for cand in (n + delta, n - delta) if delta else (n,):
            if cand >= 1 and stride_compatible(model, cand, in_channels=in_channels):
                return cand
    raise ValueError(f"no mirror-compatible input width within {max_delta} of {n}")


# ----------------------------------------------------------------------------------------------------------
# Feature-map chirality (spec §2.5)
# ----------------------------------------------------------------------------------------------------------
def default_stages(model: nn.Module) -> dict[str, nn.Module]:
    """Stages probed by :func:`fmap_chirality` (spec §2.5), keyed by qualified module name.

    ResNet-like models (attributes ``layer1``..``layer4``): ``relu`` (stem), ``maxpool``,
    ``layer1``..``layer4``.
    Otherwise every ``nn.MaxPool2d`` (AlexNet/VGG: each max-pool output); if there is none, every top-level
    child.  The logits are always handled separately as stage ``"logits"``.
    """
    model = _unwrap(model)
    if all(isinstance(getattr(model, f"layer{i}", None), nn.Module) for i in range(1, 5)):
        names = ("relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
        return {n: getattr(model, n) for n in names if isinstance(getattr(model, n, None), nn.Module)}
    pools = {n: m for n, m in model.named_modules() if isinstance(m, nn.MaxPool2d)}
    if pools:
        return pools
    return dict(model.named_children())


class _FmapAccumulator:
    """Running sums of the per-sample F and G terms of one stage."""

    def __init__(self) -> None:
        self.f_sum = 0.0
        self.f_n = 0
        self.g_sum = 0.0
        self.g_n = 0

    def add(self, out: Tensor, batch: int) -> None:
        """``out`` stacks ``phi(x)`` (first ``batch`` rows) and ``phi(Tx)`` (last ``batch`` rows)."""
        if not isinstance(out, Tensor) or out.dim() == 0 or out.shape[0] != 2 * batch:
            return
        a, b = out[:batch], out[batch:]  # phi(x), phi(Tx)
        if out.dim() == 4:
            ta = a.flip(-1)
            ga, gb = a.mean(dim=(-2, -1)), b.mean(dim=(-2, -1))
        else:  # mirror acts as the identity on non-spatial outputs
            ta = a
            ga, gb = a.reshape(batch, -1), b.reshape(batch, -1)
        num = torch.linalg.vector_norm((b - ta).reshape(batch, -1), dim=1)
        den = torch.linalg.vector_norm(b.reshape(batch, -1), dim=1) + torch.linalg.vector_norm(
            ta.reshape(batch, -1), dim=1
        )
        ok = den > _FMAP_EPS
        self.f_sum += float((num[ok] / den[ok]).double().sum())
        self.f_n += int(ok.sum())
        gden = torch.linalg.vector_norm(ga, dim=1) * torch.linalg.vector_norm(gb, dim=1)
        ok = gden > _FMAP_EPS
        cos = ((ga * gb).sum(1)[ok] / gden[ok]).clamp(-1.0, 1.0)
        self.g_sum += float((1.0 - cos).double().sum())
        self.g_n += int(ok.sum())


def _first_tensor(out) -> Tensor | None:
    if isinstance(out, Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    return None


def fmap_chirality(
    model: nn.Module,
    x: Tensor,
    stages: dict[str, nn.Module] | None = None,
    batch_size: int = 64,
) -> dict[str, float]:
    """Activation-level chirality of ``model`` on probe images ``x`` (spec §2.5).

    For each stage ``phi`` (default :func:`default_stages`) and the logits ``f``::

        fmap/<stage>      F = mean_x ||phi(Tx) - T phi(x)|| / (||phi(Tx)|| + ||T phi(x)||)
        fmap_gap/<stage>  G = mean_x [1 - cos(GAP phi(Tx), GAP phi(x))]
        fmap/logits, fmap_gap/logits    the same on the model output
        flip_consistency  share of x with argmax f(Tx) == argmax f(x)   (2-D outputs only)

    ``T`` flips the width (last) axis of 4-D tensors and is the identity on anything else (e.g. logits).
    Terms whose denominator is ``<= 1e-12`` are skipped; stages that never fire are omitted.

    Runs in eval mode under ``torch.no_grad`` in ``x``'s dtype/device (the model must already match them;
    use float64 for exactness checks).  ``x`` and its mirror go through the model together, so each forward
    sees ``2 * batch_size`` images.  The per-sample terms are computed inside the hooks, so later in-place ops
    cannot corrupt them.  If a stage module is called several times per forward, every call contributes.
    Hooks are removed and each module's train/eval flag restored afterwards.  Only use widths accepted by
    :func:`stride_compatible`, otherwise ``F > 0`` even for exactly symmetric kernels.
    """
    if x.dim() != 4:
        raise ValueError(f"x must be a batch (N, C, H, W), got shape {tuple(x.shape)}")
    model = _unwrap(model)
    if stages is None:
        stages = default_stages(model)
    accs = {name: _FmapAccumulator() for name in stages}
    logits_acc = _FmapAccumulator()
    agree, total = 0, 0
    current = {"batch": 0}

    def make_hook(acc: _FmapAccumulator):
        def hook(_m: nn.Module, _args, out) -> None:
            t = _first_tensor(out)
            if t is not None:
                acc.add(t.detach(), current["batch"])

        return hook

    hooks = [(m, make_hook(accs[name])) for name, m in stages.items()]
    with forward_hooks(hooks), eval_mode(model), torch.no_grad():
        for start in range(0, x.shape[0], batch_size):
            xb = x[start : start + batch_size]
            current["batch"] = xb.shape[0]
            out = _first_tensor(model(torch.cat([xb, xb.flip(-1)])))
            if out is None:
                continue
            logits_acc.add(out, xb.shape[0])
            if out.dim() == 2:
                pred = out.argmax(dim=1)
                agree += int((pred[: xb.shape[0]] == pred[xb.shape[0] :]).sum())
                total += xb.shape[0]

    result: dict[str, float] = {}
    for name, acc in [*accs.items(), ("logits", logits_acc)]:
        if acc.f_n:
            result[f"fmap/{name}"] = acc.f_sum / acc.f_n
        if acc.g_n:
            result[f"fmap_gap/{name}"] = acc.g_sum / acc.g_n
    if total:
        result["flip_consistency"] = agree / total
    return result


# ----------------------------------------------------------------------------------------------------------
# Set-level value and symmetrisation
# ----------------------------------------------------------------------------------------------------------
def set_level_conv1(weight: Tensor, eps: float = 1e-12) -> float:
    """Optional set-level chirality of a filter bank (spec §2.5; meant for conv1).

    With unit-norm whole filters ``w^_i`` (shape ``(I, kh, kw)``, zero filters skipped),
    ``m = mean_i min_j ||w^_i - T w^_j|| / 2`` (``j = i`` allowed), in ``[0, 1]``; ``m = 0`` iff the bank
    is closed under the horizontal mirror.  Only meaningful when the input channels map to themselves under
    the flip (RGB).
    """
    if weight.dim() != 4:
        raise ValueError(f"expected a conv weight (O, I, kh, kw), got shape {tuple(weight.shape)}")
    w = weight.detach().to(torch.float64).cpu()
    flat = w.reshape(w.shape[0], -1)
    mirrored = mirror(w, "h").reshape(w.shape[0], -1)
    norms = flat.norm(dim=1)
    keep = norms > eps
    if not bool(keep.any()):
        return float("nan")
    u = flat[keep] / norms[keep, None]
    tu = mirrored[keep] / norms[keep, None]
    # direct differences (not the Gram trick) so that a mirror-closed bank gives exactly ~0
    dist = torch.cdist(u, tu, compute_mode="donot_use_mm_for_euclid_dist") / 2.0
    return float(dist.min(dim=1).values.mean())


@torch.no_grad()
def symmetrize_(model: nn.Module, anti: bool = False) -> nn.Module:
    """In place ``W <- (W + TW)/2`` (``(W - TW)/2`` if ``anti``) for every ``Conv2d`` with ``kw > 1``.

    Gives ``C_l = 0`` (resp. 1) in every layer; used by tests and the "tied kernels" control (spec §5.2,
    §7).  The result is exactly (anti)symmetric, since IEEE addition is commutative.
    Returns ``model``.
    """
    sign = -1.0 if anti else 1.0
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and m.weight.shape[-1] > 1:
            w = m.weight
            w.copy_((w + sign * w.flip(-1)) / 2.0)
    return model
