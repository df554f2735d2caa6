"""Offline procedural Broden-format concept set (dissection spec §3.3).

``write_synthbroden`` renders scenes with :func:`featurelens.data.shapes.render_scene` and writes the exact
Broden directory contract of spec §3.1 (``index.csv``, ``category.csv``, ``label.csv``, ``c_<cat>.csv``,
``README.txt``, ``images/<source>/...``), so the real loader (:mod:`featurelens.data.broden`) is what gets
tested and used.

Categories and labels:
- color (pixel, every pixel): the nominal colour painted there, names ``<colour>-c``.
- object (pixel): the shape class (circle, square, triangle, ring, star) on the shape's pixels.
- part (pixel, two layers): ``top-half`` (layer 1, ``x_part_1.png``) and ``rim`` (layer 2, ``x_part_2.png``).
- material (pixel): the fill inside shapes (flat, noisy, gradient, striped).
- scene (image-level): the background layout, names ``<layout>-s``.
- texture (image-level): 0-2 overlays; ``striped`` shares its label number with the material.

Masks are RGB PNGs at half the image side (nearest downsampling: pixel (i, j) of the mask is pixel
(2i+1, 2j+1) of the full-resolution label map, as PIL's NEAREST resize to half size), label = R + 256*G.
Label numbers are assigned by descending frequency, then coverage (then name, for determinism); labels that
never occur get no number. The split is ``train`` iff int(md5(image path)[:8], 16) / 2**32 < 0.7.
"""

from __future__ import annotations

import csv
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from featurelens.data.shapes import COLORS, GENERATOR_VERSION, MATERIALS, SHAPE_CLASSES, render_scene

__all__ = [
    "CATEGORIES", "IMAGE_CATEGORIES", "OBJECT_CLASSES", "PART_NAMES", "SIZE_RANGE", "SOURCE",
    "cached_synthbroden", "encode_mask", "split_of", "write_synthbroden",
]

CATEGORIES: tuple[str, ...] = ("color", "object", "part", "material", "scene", "texture")
IMAGE_CATEGORIES: tuple[str, ...] = ("scene", "texture")
INDEX_HEADER: tuple[str, ...] = ("image", "split", "ih", "iw", "sh", "sw", *CATEGORIES)
OBJECT_CLASSES: tuple[str, ...] = tuple(SHAPE_CLASSES[:5])
PART_NAMES: tuple[str, ...] = ("top-half", "rim")
# Main shape's circumscribed diameter as a fraction of the side: a disk of diameter 0.16 covers 2% of the
# image, one of 0.437 covers 15%; non-disk shapes cover less, distractors are smaller (spec §3.3: 2-15%).
SIZE_RANGE: tuple[float, float] = (0.18, 0.43)
SOURCE = "synth"
TRAIN_FRACTION = 0.7
_COLOR_NAMES = [f"{name}-c" for name in COLORS]


def split_of(image_path: str) -> str:
    """'train' iff the first 8 hex digits of md5(path), as an integer / 2**32, are below 0.7."""
    h = int(hashlib.md5(image_path.encode("utf-8")).hexdigest()[:8], 16)
    return "train" if h / 2**32 < TRAIN_FRACTION else "val"


def encode_mask(labels: np.ndarray) -> np.ndarray:
    """Global label numbers (H, W), 0 <= n < 65536 -> RGB uint8 (H, W, 3) with R = n % 256, G = n // 256."""
    labels = np.asarray(labels)
    if labels.size and (labels.min() < 0 or labels.max() >= 65536):
        raise ValueError("mask labels must lie in [0, 65536)")
    lab = labels.astype(np.int64)
    rgb = np.zeros((*lab.shape, 3), dtype=np.uint8)
    rgb[..., 0] = lab % 256
    rgb[..., 1] = lab // 256
    return rgb


def _fmt(x: float) -> str:
    return repr(float(x))


def _render(n_images: int, size: int, seed: int) -> list[dict]:
    """Render every image and its half-resolution label maps, as label *names* (per-image dicts)."""
    rng = np.random.default_rng(seed)
    records = []
    for _ in range(n_images):
        sc = render_scene(rng, size, distractors=True, classes=OBJECT_CLASSES, size_range=SIZE_RANGE,
                          texture_p=0.06)
        sub = (slice(1, None, 2), slice(1, None, 2))  # nearest downsampling to size // 2
        shape_mask = sc.shape_mask[sub].astype(np.int64)
        obj_names = ["", *[s["class"] for s in sc.shapes]]
        mat_map = sc.material_map[sub].astype(np.int64)
        records.append({
            "image": sc.image,
            # pixel categories: list of layers, each (names list, index map with 0 = unlabeled)
            "color": [(list(_COLOR_NAMES), sc.color_map[sub].astype(np.int64) + 1)],
            "object": [(obj_names[1:], shape_mask)],
            "part": [(["top-half"], sc.top_half[sub].astype(np.int64)),
                     (["rim"], sc.rim[sub].astype(np.int64))],
            "material": [(list(MATERIALS), mat_map + 1)],
            "scene": [f"{sc.scene}-s"],
            "texture": list(sc.textures),
        })
    return records


def write_synthbroden(root: str | Path, n_images: int = 300, size: int = 64, seed: int = 0,
                      image_format: str = "png") -> Path:
    """Write a procedural Broden-format dataset under ``root`` and return ``root``.

    Args:
        root: output directory (created; existing files of the same names are overwritten).
        n_images: number of images.
        size: image side (even, >= 8); masks are size // 2.
        seed: the only source of randomness; same seed -> byte-identical files.
        image_format: 'png' (default, lossless) or 'jpg'.
    """
    if image_format not in ("png", "jpg"):
        raise ValueError(f"image_format must be 'png' or 'jpg', got {image_format!r}")
    if size < 8 or size % 2:
        raise ValueError(f"size must be even and >= 8, got {size}")
    if n_images < 1:
        raise ValueError(f"n_images must be >= 1, got {n_images}")
    root = Path(root)
    (root / "images" / SOURCE).mkdir(parents=True, exist_ok=True)
    ms = size // 2
    npix = float(ms * ms)
    records = _render(n_images, size, seed)

    # Per-image label names -> per-image, per-category {name: pixel fraction}.
    per_image: list[dict[str, dict[str, float]]] = []
    for rec in records:
        cats: dict[str, dict[str, float]] = {}
        for cat in CATEGORIES:
            if cat in IMAGE_CATEGORIES:
                cats[cat] = {name: 1.0 for name in rec[cat]}
                continue
            counts: dict[str, float] = {}
            for names, idx in rec[cat]:
                bc = np.bincount(idx.ravel(), minlength=len(names) + 1)
                for k, name in enumerate(names, start=1):
                    if bc[k]:
                        counts[name] = counts.get(name, 0.0) + float(bc[k])
            # (a name occurs in one layer only, and object classes that repeat in one image share a map)
            cats[cat] = {name: c / npix for name, c in counts.items()}
        per_image.append(cats)

    # Statistics: overall and within each category.
    freq: dict[str, int] = {}
    cov: dict[str, float] = {}
    cat_freq: dict[str, dict[str, int]] = {c: {} for c in CATEGORIES}
    cat_cov: dict[str, dict[str, float]] = {c: {} for c in CATEGORIES}
    for cats in per_image:
        present = set()
        for cat in CATEGORIES:
            for name, f in cats[cat].items():
                present.add(name)
                cat_freq[cat][name] = cat_freq[cat].get(name, 0) + 1
                cat_cov[cat][name] = cat_cov[cat].get(name, 0.0) + f
                cov[name] = cov.get(name, 0.0) + f
        for name in present:
            freq[name] = freq.get(name, 0) + 1
    order = sorted(freq, key=lambda n: (-freq[n], -cov[n], n))
    number = {name: i + 1 for i, name in enumerate(order)}

    # Images, masks and index.csv.
    index_rows = []
    for i, (rec, cats) in enumerate(zip(records, per_image, strict=True)):
        base = f"{SOURCE}/{SOURCE}_{i:06d}"
        img_rel = f"{base}.{image_format}"
        im = Image.fromarray(rec["image"], "RGB")
        if image_format == "jpg":
            im.save(root / "images" / img_rel, quality=95)
        else:
            im.save(root / "images" / img_rel)
        row = {"image": img_rel, "split": split_of(img_rel), "ih": size, "iw": size, "sh": ms, "sw": ms}
        for cat in CATEGORIES:
            if cat in IMAGE_CATEGORIES:
                names = sorted(cats[cat], key=lambda n: rec[cat].index(n))
                row[cat] = ";".join(str(number[n]) for n in names)
                continue
            layers = rec[cat]
            paths = []
            for k, (names, idx) in enumerate(layers, start=1):
                lut = np.array([0, *[number.get(n, 0) for n in names]], dtype=np.int64)
                lab = lut[idx]
                if not lab.any():
                    continue
                rel = f"{base}_{cat}_{k}.png" if len(layers) > 1 else f"{base}_{cat}.png"
                Image.fromarray(encode_mask(lab), "RGB").save(root / "images" / rel)
                paths.append(rel)
            row[cat] = ";".join(paths)
        index_rows.append(row)
    with open(root / "index.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(INDEX_HEADER), lineterminator="\n")
        w.writeheader()
        w.writerows(index_rows)

    # label.csv
    with open(root / "label.csv", "w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["number", "name", "category", "frequency", "coverage", "syns"])
        for name in order:
            cs = sorted((c for c in CATEGORIES if name in cat_freq[c]),
                        key=lambda c: (-cat_freq[c][name], CATEGORIES.index(c)))
            catstr = ";".join(f"{c}({cat_freq[c][name]})" for c in cs)
            w.writerow([number[name], name, catstr, freq[name], _fmt(cov[name]), ""])

    # c_<cat>.csv and category.csv
    with open(root / "category.csv", "w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["name", "first", "last", "count", "frequency"])
        for cat in CATEGORIES:
            names = sorted(cat_freq[cat], key=lambda n: number[n])
            with open(root / f"c_{cat}.csv", "w", newline="") as fc:
                wc = csv.writer(fc, lineterminator="\n")
                wc.writerow(["code", "number", "name", "frequency", "coverage"])
                for code, name in enumerate(names, start=1):
                    wc.writerow([code, number[name], name, cat_freq[cat][name], _fmt(cat_cov[cat][name])])
            nums = [number[n] for n in names]
            touched = sum(1 for cats in per_image if cats[cat])
            w.writerow([cat, min(nums, default=0), max(nums, default=0), len(nums), touched])

    (root / "README.txt").write_text(
        "featurelens synthbroden: offline procedural Broden-format concept set (dissection spec 3.3)\n"
        f"images: {n_images}\nimage size: {size}x{size}\nmask size: {ms}x{ms}\nseed: {seed}\n"
        f"image format: {image_format}\ncrop: False\nsplit: train iff md5(image path)[:8]/2**32 < 0.7\n"
        f"categories: {', '.join(CATEGORIES)}\nlabels: {len(order)}\n"
        "masks: RGB png, label = R + 256*G, 0 = unlabeled\n")
    return root


def cached_synthbroden(data_dir: str | Path, n_images: int, size: int, seed: int, image_format: str) -> Path:
    """The procedural concept set for these parameters, written once under ``data_dir`` (into a temporary
    folder, then renamed, so a concurrent writer or a killed run never leaves a half-written set)."""
    root = Path(data_dir) / "synthbroden" / f"n{n_images}_s{size}_seed{seed}_{image_format}_v{GENERATOR_VERSION}"
    if (root / "index.csv").exists():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=".tmp_"))
    try:
        write_synthbroden(tmp, n_images=n_images, size=size, seed=seed, image_format=image_format)
        os.replace(tmp, root)
    except OSError:
        if not (root / "index.csv").exists():  # not a concurrent writer that got there first
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root
