"""Test and oracle generators for the linking analysis (linking spec §6, "Test generators").

* :class:`LinearGenerator`: ``image = reshape(G @ w + offset)``, optionally squashed. With ``output="linear"``
  (the default) the image range is whatever the matrix gives: this is the exact-inverse oracle of spec §9.1,
  not a conformant image generator. Build it with ``output="sigmoid"`` (or ``"clamp"``) when images must lie in
  [0, 1] (spec §9.7 conformance).
* :class:`ShapeRenderer`: a procedural renderer whose 6-d latent is ``w = (size, x, y, hue, brightness,
  rotation)``, every entry in [0, 1], with exact part masks (:data:`~.base.PART_NAMES`: background = 0,
  body = 1, rim = 2). Not differentiable.

Both follow the :class:`~featurelens.models.generators.base.Generator` protocol: ``w_dim``, ``num_ws = 1``,
``num_classes``, ``resolution``, ``w_avg(c)``, seeded ``sample_w`` truncated toward the *class* mean and
``synthesize``. Both are parameter-free ``nn.Module`` s (buffers only), so ``.to(device)`` and ``freeze`` work.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from featurelens.models.generators.base import check_class, truncate

__all__ = ["LinearGenerator", "ShapeRenderer", "SHAPE_KINDS"]

_OUTPUTS = ("linear", "sigmoid", "clamp")


class LinearGenerator(nn.Module):
    """``image = reshape(out(G @ w + offset), image_shape)``: the linear oracle generator.

    Args:
        G: ``(C*H*W, m)`` matrix; its dtype is the dtype of latents and images (float64 for exact oracles).
        image_shape: ``(C, H, W)``.
        num_classes: number of classes; ``w_avg`` has one row per class.
        w_avg: ``(num_classes, m)`` class means (default zeros).
        offset: ``(C*H*W,)`` added before the output map (default zeros).
        output: ``"linear"`` (no squashing: range is whatever ``G`` gives), ``"sigmoid"`` or ``"clamp"``
            (to [0, 1]).

    ``sample_w(n, c, psi, seed)`` draws ``randn(n, m)`` from ``torch.Generator().manual_seed(seed)`` and
    truncates toward ``w_avg[c]``: latents are ``w_avg[c] + psi * z``.
    """

    num_ws = 1

    def __init__(
        self,
        G: Tensor,
        image_shape: tuple[int, int, int],
        num_classes: int,
        w_avg: Tensor | None = None,
        offset: Tensor | None = None,
        output: str = "linear",
    ) -> None:
        super().__init__()
        G = torch.as_tensor(G)
        if G.dim() != 2:
            raise ValueError(f"LinearGenerator: G must be a (C*H*W, m) matrix, got shape {tuple(G.shape)}")
        C, H, W = (int(s) for s in image_shape)
        if C * H * W != G.shape[0]:
            raise ValueError(
                f"LinearGenerator: G has {G.shape[0]} rows but image_shape={image_shape} needs {C * H * W}"
            )
        if output not in _OUTPUTS:
            raise ValueError(f"LinearGenerator: output={output!r} is not one of {_OUTPUTS}")
        if num_classes < 1:
            raise ValueError(f"LinearGenerator: num_classes must be >= 1, got {num_classes}")
        m = int(G.shape[1])
        w_avg = torch.zeros(num_classes, m, dtype=G.dtype) if w_avg is None else torch.as_tensor(w_avg, dtype=G.dtype)
        if tuple(w_avg.shape) != (num_classes, m):
            raise ValueError(f"LinearGenerator: w_avg must have shape ({num_classes}, {m}), got {tuple(w_avg.shape)}")
        offset = torch.zeros(G.shape[0], dtype=G.dtype) if offset is None else torch.as_tensor(offset, dtype=G.dtype)
        if offset.numel() != G.shape[0]:
            raise ValueError(f"LinearGenerator: offset must have {G.shape[0]} entries, got {offset.numel()}")
        self.register_buffer("G", G.clone())
        self.register_buffer("offset", offset.reshape(-1).clone())
        self.register_buffer("_w_avg", w_avg.clone())
        self.image_shape = (C, H, W)
        self.num_classes = int(num_classes)
        self.w_dim = m
        self.resolution = H
        self.output = output

    def w_avg(self, c: int) -> Tensor:
        """The ``(w_dim,)`` class mean of class ``c``."""
        check_class(c, self.num_classes)
        return self._w_avg[int(c)]

    def sample_w(self, n: int, class_idx: int, psi: float = 0.7, seed: int = 0) -> Tensor:
        """``(n, w_dim)`` latents: seeded ``randn`` truncated toward ``w_avg(class_idx)``; deterministic in ``seed``."""
        check_class(class_idx, self.num_classes)
        g = torch.Generator().manual_seed(int(seed))
        z = torch.randn(n, self.w_dim, generator=g, dtype=self.G.dtype).to(self.G.device)
        avg = self.w_avg(class_idx)
        return truncate(avg + z, avg, psi)

    def synthesize(self, w: Tensor) -> Tensor:
        """``(n, C, H, W)`` images in ``G``'s dtype; see the class docstring for the range."""
        w = torch.as_tensor(w).to(device=self.G.device, dtype=self.G.dtype)
        if w.dim() == 3:  # (n, num_ws, w_dim): take the first row, this generator has one
            w = w[:, 0]
        if w.dim() != 2 or w.shape[1] != self.w_dim:
            raise ValueError(f"LinearGenerator: w must have shape (n, {self.w_dim}), got {tuple(w.shape)}")
        x = w @ self.G.T + self.offset
        if self.output == "sigmoid":
            x = torch.sigmoid(x)
        elif self.output == "clamp":
            x = x.clamp(0.0, 1.0)
        return x.reshape(w.shape[0], *self.image_shape)


SHAPE_KINDS: tuple[str, ...] = ("disk", "square", "ellipse")
"""Shapes of :class:`ShapeRenderer`; the hue band of ``w`` picks one (see the class docstring)."""


def _hsv_to_rgb(h: Tensor, s: Tensor, v: Tensor) -> Tensor:
    """``(n,)`` HSV in [0, 1] -> ``(n, 3)`` RGB in [0, 1]."""
    k = torch.stack([(5 + h * 6) % 6, (3 + h * 6) % 6, (1 + h * 6) % 6], dim=1)
    return v[:, None] - v[:, None] * s[:, None] * torch.clamp(torch.minimum(k, 4 - k), 0, 1)


class ShapeRenderer(nn.Module):
    """Procedural shapes with exact part masks: the planted-concept oracle of spec §9.5.

    Latent ``w = (size, x, y, hue, brightness, rotation)``, each entry in [0, 1] (clamped in ``synthesize``):

    * ``size`` -> outer half-extent ``R = resolution * (0.10 + 0.20 * size)`` px;
    * ``x``, ``y`` -> centre ``resolution * (0.25 + 0.5 * x)`` px from the left / top edge;
    * ``hue`` -> body hue (HSV, saturation 0.8); it also picks the shape: with ``K = num_classes`` hue bands
      ``[k/K, (k+1)/K)``, band ``k`` draws ``SHAPE_KINDS[k % 3]`` (disk, square, ellipse with aspect 1/2);
    * ``brightness`` -> body HSV value ``0.35 + 0.65 * brightness``;
    * ``rotation`` -> angle ``pi * rotation`` (radians, counter-clockwise on screen).

    Parts (pixel-centre sampling, no anti-aliasing, so masks are exact): ``rim`` = shape pixels less than
    ``rim_width`` px inside the outline (fixed width in pixels), ``body`` = the rest of the shape,
    ``background`` = everything else. The background and the rim have fixed colours, so ``brightness`` and
    ``hue`` change only the body.

    Class ``c`` has ``w_avg(c) = (0.5, 0.5, 0.5, (c + 0.5)/K, 0.6, 0.5)``; ``sample_w`` draws
    ``w_avg(c) + psi * spread * z`` (``z`` seeded ``randn``, ``spread = (0.25, 0.2, 0.2, 0.2/K, 0.2, 0.3)``)
    and clamps to [0, 1], the hue to the class band, so every sample of class ``c`` has class ``c``'s shape.
    """

    num_ws = 1
    w_dim = 6
    LATENT_NAMES: tuple[str, ...] = ("size", "x", "y", "hue", "brightness", "rotation")

    def __init__(
        self,
        resolution: int = 32,
        num_classes: int = 3,
        rim_width: float = 1.5,
        background: tuple[float, float, float] = (0.1, 0.1, 0.1),
        rim_color: tuple[float, float, float] = (0.95, 0.95, 0.95),
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if resolution < 8:
            raise ValueError(f"ShapeRenderer: resolution must be >= 8, got {resolution}")
        if num_classes < 1:
            raise ValueError(f"ShapeRenderer: num_classes must be >= 1, got {num_classes}")
        if rim_width <= 0:
            raise ValueError(f"ShapeRenderer: rim_width must be > 0, got {rim_width}")
        self.resolution = int(resolution)
        self.num_classes = int(num_classes)
        self.rim_width = float(rim_width)
        self.dtype = dtype
        K = self.num_classes
        avg = torch.tensor([[0.5, 0.5, 0.5, (c + 0.5) / K, 0.6, 0.5] for c in range(K)], dtype=torch.float64)
        self.register_buffer("_w_avg", avg)
        self.register_buffer("_spread", torch.tensor([0.25, 0.2, 0.2, 0.2 / K, 0.2, 0.3], dtype=torch.float64))
        self.register_buffer("_background", torch.tensor(background, dtype=torch.float64))
        self.register_buffer("_rim_color", torch.tensor(rim_color, dtype=torch.float64))

    def w_avg(self, c: int) -> Tensor:
        """The ``(6,)`` class mean of class ``c`` (float64)."""
        check_class(c, self.num_classes)
        return self._w_avg[int(c)]

    def shape_kind(self, hue: float) -> str:
        """The shape drawn for a hue in [0, 1]."""
        k = min(int(hue * self.num_classes), self.num_classes - 1)
        return SHAPE_KINDS[k % len(SHAPE_KINDS)]

    def sample_w(self, n: int, class_idx: int, psi: float = 0.7, seed: int = 0) -> Tensor:
        """``(n, 6)`` float64 latents of class ``class_idx``, deterministic in ``seed`` (see the class docstring)."""
        check_class(class_idx, self.num_classes)
        g = torch.Generator().manual_seed(int(seed))
        z = torch.randn(n, self.w_dim, generator=g, dtype=torch.float64).to(self._w_avg.device)
        avg = self.w_avg(class_idx)
        w = truncate(avg + self._spread * z, avg, psi).clamp(0.0, 1.0)
        K = self.num_classes
        lo, hi = class_idx / K, (class_idx + 1) / K - 1e-6
        w[:, 3] = w[:, 3].clamp(lo, hi)
        return w

    def synthesize(self, w: Tensor) -> Tensor:
        """``(n, 3, H, W)`` images in [0, 1] (dtype of the constructor)."""
        return self.synthesize_with_masks(w)[0]

    def synthesize_with_masks(self, w: Tensor) -> tuple[Tensor, Tensor]:
        """Images ``(n, 3, H, W)`` in [0, 1] and int64 part masks ``(n, H, W)`` (0 background, 1 body, 2 rim)."""
        w = torch.as_tensor(w).to(device=self._w_avg.device, dtype=torch.float64)
        if w.dim() == 3:
            w = w[:, 0]
        if w.dim() != 2 or w.shape[1] != self.w_dim:
            raise ValueError(f"ShapeRenderer: w must have shape (n, 6) = {self.LATENT_NAMES}, got {tuple(w.shape)}")
        w = w.clamp(0.0, 1.0)
        n, S = w.shape[0], self.resolution
        coords = torch.arange(S, dtype=torch.float64, device=w.device) + 0.5
        Y, X = torch.meshgrid(coords, coords, indexing="ij")
        R = S * (0.10 + 0.20 * w[:, 0])
        cx, cy = S * (0.25 + 0.5 * w[:, 1]), S * (0.25 + 0.5 * w[:, 2])
        theta = math.pi * w[:, 5]
        dx, dy = X[None] - cx[:, None, None], Y[None] - cy[:, None, None]
        cos, sin = torch.cos(theta)[:, None, None], torch.sin(theta)[:, None, None]
        # screen y points down: a counter-clockwise rotation on screen uses -dy
        u = cos * dx - sin * dy
        v = sin * dx + cos * dy
        depth = torch.empty(n, S, S, dtype=torch.float64, device=w.device)  # px inside the outline (< 0 outside)
        kinds = [self.shape_kind(float(h)) for h in w[:, 3]]
        for i, kind in enumerate(kinds):
            r = R[i]
            if kind == "square":
                half = r / math.sqrt(2.0) * 1.2
                depth[i] = half - torch.maximum(u[i].abs(), v[i].abs())
            else:
                a, b = (r, r) if kind == "disk" else (r, r / 2)
                f = (u[i] / a) ** 2 + (v[i] / b) ** 2 - 1.0
                grad = 2 * torch.sqrt((u[i] / a**2) ** 2 + (v[i] / b**2) ** 2)
                depth[i] = torch.where(f <= 0, -f / grad.clamp_min(1e-12), -1.0)
        inside = depth >= 0
        body = depth >= self.rim_width
        masks = torch.zeros(n, S, S, dtype=torch.int64, device=w.device)
        masks[inside] = 2
        masks[body] = 1
        color = _hsv_to_rgb(w[:, 3], torch.full_like(w[:, 3], 0.8), 0.35 + 0.65 * w[:, 4])  # (n, 3)
        img = self._background[None, :, None, None].expand(n, 3, S, S).clone()
        img = torch.where((masks == 2)[:, None], self._rim_color[None, :, None, None], img)
        img = torch.where((masks == 1)[:, None], color[:, :, None, None], img)
        return img.clamp(0.0, 1.0).to(self.dtype), masks
