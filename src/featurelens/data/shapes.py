"""Procedural "shapes" images: a 10-class classification set and the renderer behind the concept set.

Design
------
One renderer, :func:`render_scene`, paints a single image and returns a :class:`Scene` that records
*everything it painted*: the RGB image plus per-pixel label maps (which shape, top half, rim, nominal
colour, material) and the image-level labels (scene layout, texture overlays). Two consumers share it:

* **Classification** (:func:`make_shapes`, :func:`load_or_make_shapes`): the target is the class of the
  *main* shape (index 0 in ``Scene.shapes``); only ``Scene.image`` and ``Scene.label`` are kept.
* **Broden-format concept masks** (the later ``featurelens.data.synthbroden`` writer, dissection spec §3.3):
  it calls :func:`render_scene` directly and turns the maps into mask PNGs. The mapping is

  ==========  ==============================================================================
  category    source in :class:`Scene`
  ==========  ==============================================================================
  object      ``shape_mask`` (``k > 0`` -> ``shapes[k - 1]["class"]``)
  part        ``top_half`` and ``rim`` (two layers, ``x_part_1.png;x_part_2.png``)
  material    ``material_map`` (``-1`` background, else index into :data:`MATERIALS`)
  color       ``color_map`` (every pixel; index into ``list(COLORS)``), *nominal*, never re-derived
  scene       ``scene`` (image-level; one of :data:`SCENES`; names carry no ``-s`` suffix)
  texture     ``textures`` (image-level; 0-2 names from :data:`TEXTURES`)
  ==========  ==============================================================================

  Colour and scene names are stored bare (``"blue"``, ``"sky-field"``); the writer appends Broden's
  ``-c``/``-s`` suffixes. To match the spec's object list it passes ``classes=SHAPE_CLASSES[:5]`` (circle,
  square, triangle, ring, star) and a ``size_range`` that gives 2-15 % coverage per shape (e.g.
  ``(0.2, 0.45)``: a disk of diameter f*S covers pi*f^2/4 of the image); with ``distractors=True`` every
  image then holds 1-3 shapes (distractors are 0.3-0.55x the main shape's diameter). Masks are at image
  resolution; the writer downsamples them (mask = image / 2), e.g. by nearest-neighbour on the label maps.
  ``noise=0`` keeps the image exactly on the nominal colours wherever the material is flat and no texture
  is painted.

Rendering
---------
Numpy only, vectorised over pixel-centre coordinate grids, no anti-aliasing. Each shape class is a
signed distance function (SDF) in shape-local units, where the shape fits the unit disk: circle, ring and
crescent are analytic; the other classes are polygons (the ellipse and heart as sampled outlines) with an
exact polygon SDF. A shape of circumscribed diameter ``size`` px is placed at ``center`` and rotated by
``rotation`` degrees (clockwise on screen); a pixel belongs to it iff its centre has SDF <= 0. Shapes are
painted in order (main shape first, distractors on top), and every per-pixel map follows the same
painter's rule, so each map describes the shape that is visible at that pixel.

* Background (= scene): two palette colours split top/bottom by a slightly jittered, slightly tilted line.
* Textures: each of the 8 overlays is switched on with probability ``texture_p`` (at most two are kept);
  they are painted on the background only, as a contrasting tone (towards white on dark colours, towards
  black on light ones). They do not change the nominal colour map.
* Materials (shape fill): ``flat`` (the colour), ``noisy`` (strong grey per-pixel noise), ``gradient``
  (linear brightness ramp 0.55-1.0 in a random direction) and ``striped`` (colour / darkened colour
  stripes). All keep the shape's colour as the nominal colour.
* ``top_half``: shape pixels above the midline of that shape's own bounding box, in image coordinates
  (i.e. after rotation, so it is the half that *looks* upper).
* ``rim``: shape pixels within ``max(1 px, 0.15 * size)`` of the shape's *outer* outline (holes filled,
  so a ring's rim is its outer band, not its inner edge).
* Finally additive Gaussian pixel noise (std ``noise`` in 0-255 units), then rounding and clipping.

Determinism: every random draw comes from the ``np.random.Generator`` passed in; nothing touches the global
numpy/python RNGs. The noise is drawn last, so the same generator state yields the same label maps for
any ``noise``. Bump :data:`GENERATOR_VERSION` whenever the output for a given seed changes; it is part of
the cache file name.
"""

from __future__ import annotations

import logging
import re
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "BACKGROUND_COLORS",
    "COLORS",
    "FOREGROUND_COLORS",
    "GENERATOR_VERSION",
    "MATERIALS",
    "SCENES",
    "SHAPE_CLASSES",
    "TEXTURES",
    "Scene",
    "load_or_make_shapes",
    "make_shapes",
    "render_scene",
]

log = logging.getLogger(__name__)

GENERATOR_VERSION: int = 1

SHAPE_CLASSES: tuple[str, ...] = (
    "circle", "square", "triangle", "ring", "star",  # the dissection spec's objects (§3.3) come first
    "cross", "crescent", "ellipse", "arrow", "heart",
)

# Nominal colours (standard web values, dissection spec §3.3), in Broden's alphabetical colour order.
COLORS: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0),
    "blue": (0, 0, 255),
    "brown": (139, 69, 19),
    "grey": (128, 128, 128),
    "green": (0, 128, 0),
    "orange": (255, 165, 0),
    "pink": (255, 192, 203),
    "purple": (128, 0, 128),
    "red": (255, 0, 0),
    "white": (255, 255, 255),
    "yellow": (255, 255, 0),
}
BACKGROUND_COLORS: tuple[str, ...] = ("black", "blue", "brown", "grey", "green", "white")
FOREGROUND_COLORS: tuple[str, ...] = ("orange", "pink", "purple", "red", "yellow")

MATERIALS: tuple[str, ...] = ("flat", "noisy", "gradient", "striped")
TEXTURES: tuple[str, ...] = (
    "striped", "dotted", "chequered", "zigzagged", "banded", "grid", "spotted", "crosshatched",
)

# 16 scene layouts: (name, top colour, bottom colour); distinct ordered pairs of distinct background
# colours. Each background colour is the top colour of 2-3 scenes and the bottom colour of 2-3 scenes.
SCENES: tuple[tuple[str, str, str], ...] = (
    ("sky-field", "blue", "green"),
    ("wall-floor", "grey", "brown"),
    ("night", "black", "blue"),
    ("ocean-deep", "blue", "black"),
    ("cloud-sea", "white", "blue"),
    ("fog-meadow", "white", "green"),
    ("forest-soil", "green", "brown"),
    ("cave", "black", "brown"),
    ("studio", "white", "grey"),
    ("street", "grey", "black"),
    ("earth-cellar", "brown", "black"),
    ("cabin-snow", "brown", "white"),
    ("harbour", "blue", "grey"),
    ("canopy-path", "green", "grey"),
    ("night-lawn", "black", "green"),
    ("ash-snow", "grey", "white"),
)

# --- rendering constants -------------------------------------------------------------------------------
_COLOR_INDEX = {name: i for i, name in enumerate(COLORS)}
_PALETTE = np.array(list(COLORS.values()), dtype=np.float32)  # (11, 3)
_LUMA = _PALETTE @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
# Texture tone per nominal colour: lighten dark colours, darken light ones.
_TEXTURE_TONE = np.where(_LUMA[:, None] < 110.0, 255.0, 0.0).astype(np.float32)
_TEXTURE_MIX = 0.35

_MAIN_SIZE_RANGE = (0.25, 0.70)  # main-shape circumscribed diameter, as a fraction of the image side
_DISTRACTOR_SCALE = (0.3, 0.55)  # distractor diameter, as a fraction of the main shape's
_MIN_SHAPE_PX = 4.0  # smallest diameter drawn, in pixels
_RIM_FRACTION = 0.15  # rim band width, as a fraction of the shape's diameter (at least 1 px)
_SPLIT_JITTER = 0.12  # background split line: row = side * (0.5 +- jitter) ...
_SPLIT_TILT = 0.15  # ... with slope +- tilt
_NOISY_STD = 25.0  # grey noise of the `noisy` material
_STRIPE_DARK = 0.6  # brightness of the dark stripes of the `striped` material
_PLACEMENT_TRIES = 8  # candidate positions tried per distractor


# --- shape geometry ------------------------------------------------------------------------------------
class _Polygon:
    """A closed polygon with an exact, vectorised signed distance function (negative inside)."""

    def __init__(self, vertices: np.ndarray):
        v = np.asarray(vertices, dtype=np.float64)
        v = v / np.max(np.hypot(v[:, 0], v[:, 1]))  # fit the unit disk
        e = np.roll(v, -1, axis=0) - v
        self.vertices = v
        self._ax, self._ay = v[:, 0, None, None], v[:, 1, None, None]
        self._ex, self._ey = e[:, 0, None, None], e[:, 1, None, None]
        self._inv_len2 = 1.0 / (self._ex**2 + self._ey**2)
        self._inv_ey = np.where(self._ey == 0.0, 0.0, 1.0 / np.where(self._ey == 0.0, 1.0, self._ey))

    def sdf(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        wx, wy = u - self._ax, v - self._ay  # (E, h, w)
        t = np.clip((wx * self._ex + wy * self._ey) * self._inv_len2, 0.0, 1.0)
        dist = np.sqrt(((wx - self._ex * t) ** 2 + (wy - self._ey * t) ** 2).min(axis=0))
        # Even-odd rule: count edges crossed by a ray from the point towards +u.
        straddles = (self._ay > v) != (self._ay + self._ey > v)
        crosses = straddles & (u < self._ax + self._ex * wy * self._inv_ey)
        inside = np.count_nonzero(crosses, axis=0) % 2 == 1
        return np.where(inside, -dist, dist)


def _star(points: int = 5, inner: float = 0.45) -> np.ndarray:
    angles = -np.pi / 2 + np.pi * np.arange(2 * points) / points
    radii = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


def _regular(n: int, phase: float) -> np.ndarray:
    angles = phase + 2 * np.pi * np.arange(n) / n
    return np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _heart(n: int = 48) -> np.ndarray:
    t = 2 * np.pi * np.arange(n) / n
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))  # image y points down
    pts = np.stack([x, y], axis=1)
    return pts - (pts.max(axis=0) + pts.min(axis=0)) / 2  # centre the bounding box


def _ellipse(aspect: float = 0.5, n: int = 40) -> np.ndarray:
    t = 2 * np.pi * np.arange(n) / n
    return np.stack([np.cos(t), aspect * np.sin(t)], axis=1)


_CROSS_W = 0.3
_ARROW = [(-1.0, -0.25), (0.1, -0.25), (0.1, -0.62), (1.0, 0.0), (0.1, 0.62), (0.1, 0.25), (-1.0, 0.25)]
_POLYGONS: dict[str, _Polygon] = {
    "square": _Polygon(_regular(4, np.pi / 4)),
    "triangle": _Polygon(_regular(3, -np.pi / 2)),  # apex up
    "star": _Polygon(_star()),
    "cross": _Polygon([(-_CROSS_W, -1), (_CROSS_W, -1), (_CROSS_W, -_CROSS_W), (1, -_CROSS_W),
                       (1, _CROSS_W), (_CROSS_W, _CROSS_W), (_CROSS_W, 1), (-_CROSS_W, 1),
                       (-_CROSS_W, _CROSS_W), (-1, _CROSS_W), (-1, -_CROSS_W), (-_CROSS_W, -_CROSS_W)]),
    "ellipse": _Polygon(_ellipse()),
    "arrow": _Polygon(_ARROW),  # points to +u
    "heart": _Polygon(_heart()),
}
_RING_INNER = 0.55
_CRESCENT_CUT = (0.5, 0.85)  # centre offset along +u and radius of the disk cut out of the unit disk

SdfPair = tuple[np.ndarray, np.ndarray]


def _shape_sdf(name: str, u: np.ndarray, v: np.ndarray) -> SdfPair:
    """(body SDF, outer-outline SDF) of shape ``name`` in unit coordinates (outline = body, holes filled)."""
    if name in _POLYGONS:
        body = _POLYGONS[name].sdf(u, v)
        return body, body
    rho = np.hypot(u, v)
    disk = rho - 1.0
    if name == "circle":
        return disk, disk
    if name == "ring":
        return np.maximum(disk, _RING_INNER - rho), disk
    if name == "crescent":
        offset, radius = _CRESCENT_CUT
        body = np.maximum(disk, radius - np.hypot(u - offset, v))
        return body, body
    raise ValueError(f"unknown shape class {name!r}; valid: {SHAPE_CLASSES}")



# --- textures ------------------------------------------------------------------------------------------
def _periodic(s: np.ndarray, period: float, phase: float, duty: float) -> np.ndarray:
    """True on the first ``duty`` fraction of each period of coordinate ``s`` (pixels)."""
    return np.mod(s / period + phase, 1.0) < duty


def _texture_mask(name: str, rng: np.random.Generator, side: int) -> np.ndarray:
    """Boolean (side, side) overlay pattern for texture ``name`` (random period, phase and angle)."""
    period = max(4.0, side * rng.uniform(0.12, 0.2))
    phase = rng.uniform(0.0, 1.0, size=2)
    angle = rng.uniform(0.0, np.pi)
    c = np.arange(side, dtype=np.float64) + 0.5
    y, x = c[:, None], c[None, :]
    line = max(1.0 / period, 0.2)  # line duty cycle: at least 1 px wide
    if name == "striped":  # thin lines at a random angle
        return _periodic(x * np.cos(angle) + y * np.sin(angle), period, phase[0], line + 0.1)
    if name == "banded":  # wide, nearly horizontal bands
        tilt = (angle - np.pi / 2) * 0.1
        return _periodic(y * np.cos(tilt) - x * np.sin(tilt), 2 * period, phase[0], 0.5)
    if name == "dotted":  # small dots on a regular lattice
        dx = np.mod(x / period + phase[0], 1.0) - 0.5
        dy = np.mod(y / period + phase[1], 1.0) - 0.5
        return dx**2 + dy**2 < max(0.2, 0.75 / period) ** 2
    if name == "spotted":  # larger spots at random positions
        n_spots = max(2, round(0.6 * (side / period) ** 2))
        centres = rng.uniform(0.0, side, size=(n_spots, 2))
        radii = period * rng.uniform(0.3, 0.5, size=n_spots)
        d2 = (x[None] - centres[:, 0, None, None]) ** 2 + (y[None] - centres[:, 1, None, None]) ** 2
        return (d2 < radii[:, None, None] ** 2).any(axis=0)
    if name == "chequered":  # axis-aligned or diagonal chequerboard
        a = rng.choice([0.0, np.pi / 4])
        s, t = x * np.cos(a) + y * np.sin(a), -x * np.sin(a) + y * np.cos(a)
        return (np.floor(s / period + phase[0]) + np.floor(t / period + phase[1])) % 2 == 0
    if name == "zigzagged":  # horizontal zigzag lines
        tri = np.abs(np.mod(x / period + phase[1], 1.0) - 0.5) * 2.0  # triangle wave in [0, 1]
        return _periodic(y + 0.6 * period * tri, period, phase[0], max(line, 0.3))
    if name == "grid":  # thin axis-aligned lines both ways
        return _periodic(x, period, phase[0], line) | _periodic(y, period, phase[1], line)
    if name == "crosshatched":  # thin diagonal lines both ways
        s, t = (x + y) / np.sqrt(2), (x - y) / np.sqrt(2)
        return _periodic(s, period, phase[0], line) | _periodic(t, period, phase[1], line)
    raise ValueError(f"unknown texture {name!r}; valid: {TEXTURES}")


# --- scene ---------------------------------------------------------------------------------------------
@dataclass(eq=False)
class Scene:
    """Everything known about one rendered image (all maps are at image resolution, ``(S, S)``)."""

    image: np.ndarray  # (S, S, 3) uint8
    label: int  # index into SHAPE_CLASSES of the main shape (shapes[0]); the classification target
    shape_mask: np.ndarray  # (S, S) int16: 0 background, k > 0: pixel shows shapes[k - 1]
    top_half: np.ndarray  # (S, S) bool: in the upper half (image coords) of the shape shown there
    rim: np.ndarray  # (S, S) bool: within the outer rim band of the shape shown there
    color_map: np.ndarray  # (S, S) uint8: index into list(COLORS) of the nominal colour painted there
    material_map: np.ndarray  # (S, S) int8: -1 background, else index into MATERIALS
    # Per shape, in painting order (main shape first): "class", "label" (index into SHAPE_CLASSES),
    # "color", "material", "center" (x, y) px, "size" (circumscribed diameter, px), "rotation" (degrees,
    # clockwise), "area" (visible pixel count, after occlusion).
    shapes: list[dict]
    scene: str  # name of the background layout, one of SCENES
    textures: list[str]  # 0, 1 or 2 texture overlay names, from TEXTURES


def _place_distractor(rng: np.random.Generator, side: int, radius: float,
                      placed: list[tuple[float, float, float]]) -> tuple[float, float]:
    """Pick a centre for a shape of ``radius`` px, avoiding the circumscribed disks in ``placed``."""
    best, best_gap = (side / 2, side / 2), -np.inf
    for _ in range(_PLACEMENT_TRIES):
        cx, cy = rng.uniform(radius, side - radius, size=2)
        gap = min(np.hypot(cx - px, cy - py) - radius - pr for px, py, pr in placed)
        if gap > best_gap:
            best, best_gap = (float(cx), float(cy)), gap
        if gap >= 0:
            break
    return best


def _paint_shape(rng: np.random.Generator, spec: dict, index: int, image: np.ndarray,
                 maps: dict[str, np.ndarray]) -> None:
    """Paint ``spec`` into ``image`` and overwrite every map at its pixels (painter's algorithm)."""
    side = image.shape[0]
    (cx, cy), diameter = spec["center"], spec["size"]
    r = diameter / 2
    x0, x1 = max(0, int(np.floor(cx - r)) - 1), min(side, int(np.ceil(cx + r)) + 1)
    y0, y1 = max(0, int(np.floor(cy - r)) - 1), min(side, int(np.ceil(cy + r)) + 1)
    dx = (np.arange(x0, x1, dtype=np.float64) + 0.5 - cx)[None, :]
    dy = (np.arange(y0, y1, dtype=np.float64) + 0.5 - cy)[:, None]
    theta = np.deg2rad(spec["rotation"])
    cos, sin = np.cos(theta), np.sin(theta)
    u, v = (cos * dx + sin * dy) / r, (cos * dy - sin * dx) / r
    body, outline = _shape_sdf(spec["class"], u, v)
    inside = body <= 0.0

    # Material fill (the random draws happen even if the shape turned out empty, to keep streams stable).
    base = _PALETTE[_COLOR_INDEX[spec["color"]]]
    material = spec["material"]
    if material == "flat":
        fill = np.broadcast_to(base, inside.shape + (3,))
    elif material == "noisy":
        fill = base + rng.normal(0.0, _NOISY_STD, size=inside.shape + (1,)).astype(np.float32)
    elif material == "gradient":
        phi = rng.uniform(0.0, 2 * np.pi)
        ramp = np.clip((np.cos(phi) * dx + np.sin(phi) * dy) / r, -1.0, 1.0)
        fill = base * (0.775 + 0.225 * ramp)[..., None].astype(np.float32)
    elif material == "striped":
        phi = rng.uniform(0.0, np.pi)
        period = max(3.0, diameter / 3.5)
        dark = _periodic(np.cos(phi) * dx + np.sin(phi) * dy, period, rng.uniform(), 0.5)
        fill = np.where(dark[..., None], base * _STRIPE_DARK, base)
    else:
        raise ValueError(f"unknown material {material!r}; valid: {MATERIALS}")

    if not inside.any():
        return
    rows = np.flatnonzero(inside.any(axis=1))
    midline = (rows[0] + rows[-1] + 1) / 2  # middle of this shape's bounding box, box-local rows
    top = np.arange(y1 - y0)[:, None] + 0.5 < midline
    rim = outline * r > -max(1.0, _RIM_FRACTION * diameter)

    box = np.s_[y0:y1, x0:x1]
    image[box][inside] = fill[inside]
    maps["shape_mask"][box][inside] = index + 1
    maps["color_map"][box][inside] = _COLOR_INDEX[spec["color"]]
    maps["material_map"][box][inside] = MATERIALS.index(material)
    maps["top_half"][box][inside] = np.broadcast_to(top, inside.shape)[inside]
    maps["rim"][box][inside] = rim[inside]


def render_scene(rng: np.random.Generator, size: int = 32, *, distractors: bool = True, noise: float = 8.0,
                 label: int | None = None, classes: Sequence[str] | None = None,
                 size_range: tuple[float, float] = _MAIN_SIZE_RANGE, texture_p: float = 0.06) -> Scene:
    """Render one image with all its label maps.

    Args:
        rng: the only source of randomness.
        size: image side S in pixels.
        distractors: add 0-2 smaller shapes of other classes, painted over the main shape's layer.
        noise: std of the additive Gaussian pixel noise, in 0-255 units (0 disables it).
        label: class index (into SHAPE_CLASSES) of the main shape; drawn uniformly from ``classes`` if None.
        classes: class names allowed for all shapes (default: all of SHAPE_CLASSES); the Broden writer
            passes ``SHAPE_CLASSES[:5]``. Distractors use the allowed classes other than the main one.
        size_range: the main shape's circumscribed diameter, as a fraction of ``size`` (uniform).
        texture_p: probability of each texture overlay (at most two are kept).
    """
    if size < 8:
        raise ValueError(f"size must be >= 8 px, got {size}")
    allowed = tuple(SHAPE_CLASSES) if classes is None else tuple(classes)
    unknown = set(allowed) - set(SHAPE_CLASSES)
    if not allowed or unknown:
        raise ValueError(f"classes must be a non-empty subset of {SHAPE_CLASSES}, got {classes!r}")
    if not 0 < size_range[0] <= size_range[1] <= 1:
        raise ValueError(f"size_range must satisfy 0 < low <= high <= 1, got {size_range}")
    if label is None:
        label = SHAPE_CLASSES.index(allowed[rng.integers(len(allowed))])
    elif not (0 <= label < len(SHAPE_CLASSES) and SHAPE_CLASSES[label] in allowed):
        raise ValueError(f"label {label} is not the index of an allowed class {allowed}")

    # Background: the scene's two colours, split by a jittered, slightly tilted line.
    scene_idx = int(rng.integers(len(SCENES)))
    scene_name, top_color, bottom_color = SCENES[scene_idx]
    split = size * (0.5 + rng.uniform(-_SPLIT_JITTER, _SPLIT_JITTER))
    slope = rng.uniform(-_SPLIT_TILT, _SPLIT_TILT)
    c = np.arange(size, dtype=np.float64) + 0.5
    is_top = c[:, None] < split + slope * (c[None, :] - size / 2)
    color_map = np.where(is_top, _COLOR_INDEX[top_color], _COLOR_INDEX[bottom_color]).astype(np.uint8)
    image = _PALETTE[color_map]  # (S, S, 3) float32, a fresh array

    # Texture overlays on the background (shapes are painted over them afterwards).
    on = np.flatnonzero(rng.random(len(TEXTURES)) < texture_p)
    if len(on) > 2:
        on = rng.choice(on, size=2, replace=False)
    textures = [TEXTURES[i] for i in on]
    for name in textures:
        mask = _texture_mask(name, rng, size)
        image[mask] = (1 - _TEXTURE_MIX) * image[mask] + _TEXTURE_MIX * _TEXTURE_TONE[color_map[mask]]

    # Shapes: the main one, then distractors (smaller, other classes, placed to avoid overlaps).
    def shape_spec(name: str, center: tuple[float, float], diameter: float) -> dict:
        return {
            "class": name,
            "label": SHAPE_CLASSES.index(name),
            "color": FOREGROUND_COLORS[rng.integers(len(FOREGROUND_COLORS))],
            "material": MATERIALS[rng.integers(len(MATERIALS))],
            "center": center,
            "size": float(diameter),
            "rotation": float(rng.uniform(0.0, 360.0)),
        }

    main_d = max(_MIN_SHAPE_PX, size * rng.uniform(*size_range))
    lo, hi = min(main_d / 2, size / 2), max(size - main_d / 2, size / 2)
    main_center = (float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi)))
    specs = [shape_spec(SHAPE_CLASSES[label], main_center, main_d)]
    others = [name for name in allowed if name != SHAPE_CLASSES[label]]
    n_distractors = int(rng.integers(3)) if distractors and others else 0
    placed = [(*main_center, main_d / 2)]
    for _ in range(n_distractors):
        name = others[rng.integers(len(others))]
        d = max(_MIN_SHAPE_PX, main_d * rng.uniform(*_DISTRACTOR_SCALE))
        d = min(d, 0.9 * main_d)  # keep distractors strictly smaller than the main shape
        center = _place_distractor(rng, size, d / 2, placed)
        placed.append((*center, d / 2))
        specs.append(shape_spec(name, center, d))

    maps = {
        "shape_mask": np.zeros((size, size), dtype=np.int16),
        "top_half": np.zeros((size, size), dtype=bool),
        "rim": np.zeros((size, size), dtype=bool),
        "color_map": color_map,
        "material_map": np.full((size, size), -1, dtype=np.int8),
    }
    for index, spec in enumerate(specs):
        _paint_shape(rng, spec, index, image, maps)
    areas = np.bincount(maps["shape_mask"].ravel(), minlength=len(specs) + 1)
    for index, spec in enumerate(specs):
        spec["area"] = int(areas[index + 1])

    if noise > 0:  # drawn last, so the label maps do not depend on `noise`
        image += rng.normal(0.0, noise, size=image.shape).astype(np.float32)
    image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    return Scene(image=image, label=int(label), shapes=specs, scene=scene_name, textures=textures, **maps)


# --- classification dataset ----------------------------------------------------------------------------
def make_shapes(n: int, size: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` images ``(n, size, size, 3)`` uint8 and labels ``(n,)`` int64, deterministic from ``seed``.

    Classes are balanced (label ``i % 10``, then shuffled), so counts differ by at most one.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n, dtype=np.int64) % len(SHAPE_CLASSES))
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    for i, label in enumerate(labels):
        images[i] = render_scene(rng, size, label=int(label)).image
    return images, labels


def _split_seed(seed: int, split: str) -> int:
    """A seed for ``split`` derived from ``seed``; different split names give independent streams."""
    state = np.random.SeedSequence([seed, zlib.crc32(split.encode())]).generate_state(1, np.uint64)
    return int(state[0])


def _cache_path(root: str | Path, split: str, n: int, size: int, seed: int) -> Path:
    return Path(root) / "shapes" / f"{split}_{size}px_n{n}_seed{seed}_v{GENERATOR_VERSION}.npz"


def _save_npz_atomic(path: Path, **arrays: np.ndarray) -> None:
    """Write ``arrays`` to ``path`` all or nothing."""
    from featurelens.results import atomic_write

    atomic_write(path, lambda fh: np.savez(fh, **arrays))


def _load_cached(path: Path, n: int, size: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The cached arrays, or None if the file is missing, unreadable or has the wrong shapes."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            images, labels = data["images"], data["labels"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        log.warning("ignoring unreadable shapes cache %s (%s); regenerating", path, err)
        return None
    if (images.shape != (n, size, size, 3) or images.dtype != np.uint8 or labels.shape != (n,)
            or labels.dtype != np.int64):
        log.warning("ignoring shapes cache %s with unexpected arrays; regenerating", path)
        return None
    return images, labels


def load_or_make_shapes(root: str | Path, split: str, n: int, size: int = 32,
                        seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """:func:`make_shapes` for ``split``, cached in ``root/shapes/`` as an ``.npz``.

    The split's images come from ``make_shapes(n, size, seed=_split_seed(seed, split))``, so train/val/test
    differ for the same ``seed``. The cache is written atomically; an unreadable cache file is regenerated.
    """
    if not re.fullmatch(r"[A-Za-z0-9_-]+", split):
        raise ValueError(f"split must be a simple name (letters, digits, '_', '-'), got {split!r}")
    path = _cache_path(root, split, n, size, seed)
    cached = _load_cached(path, n, size)
    if cached is not None:
        return cached
    images, labels = make_shapes(n, size, _split_seed(seed, split))
    _save_npz_atomic(path, images=images, labels=labels)
    log.info("wrote %d %dpx shapes images to %s", n, size, path)
    return images, labels

