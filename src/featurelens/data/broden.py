"""Broden-format dataset loader (dissection spec §3.1).

Reads ``index.csv``, ``category.csv``, ``label.csv`` and ``c_<cat>.csv`` by column name, validates them and
raises :class:`BrodenError` (naming the file and the problem) instead of silently dropping images.

``BrodenDataset[i]`` returns ``(image, labels)``: ``image`` is a float32 CHW tensor in [0, 1];
``labels`` maps each selected category to an int64 tensor: pixel categories (object, part, material, color)
as ``(n_layers, sh, sw)`` global label maps (``n_layers`` may be 0), image-level categories (scene, texture)
as a 1-D tensor of global label numbers.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from featurelens.errors import ConfigError

__all__ = [
    "DEFAULT_CATEGORIES", "IMAGE_LEVEL", "BrodenDataset", "BrodenError", "decode_mask", "encode_mask",
    "read_csv",
]

DEFAULT_CATEGORIES: tuple[str, ...] = ("object", "part", "scene", "material", "texture", "color")
IMAGE_LEVEL: frozenset[str] = frozenset({"scene", "texture"})
INDEX_REQUIRED: tuple[str, ...] = ("image", "split", "ih", "iw", "sh", "sw")
LABEL_REQUIRED: tuple[str, ...] = ("number", "name", "category", "frequency", "coverage")
CATEGORY_REQUIRED: tuple[str, ...] = ("name", "first", "last", "count", "frequency")
CFILE_REQUIRED: tuple[str, ...] = ("code", "number", "name", "frequency", "coverage")


class BrodenError(ConfigError):
    """A Broden directory violates the file contract; the message names the file and the problem."""


def decode_mask(rgb: np.ndarray) -> np.ndarray:
    """RGB uint8 (H, W, 3) (or (H, W) / (H, W, 4)) -> int64 (H, W) global labels, R + 256*G."""
    a = np.asarray(rgb)
    if a.ndim == 2:
        return a.astype(np.int64)
    if a.ndim != 3 or a.shape[2] < 2:
        raise ValueError(f"expected an (H, W, 3) RGB mask, got shape {a.shape}")
    return a[..., 0].astype(np.int64) + 256 * a[..., 1].astype(np.int64)


def encode_mask(labels: np.ndarray) -> np.ndarray:
    """int (H, W) labels in [0, 65536) -> RGB uint8 (H, W, 3) with R = n % 256, G = n // 256, B = 0."""
    lab = np.asarray(labels).astype(np.int64)
    if lab.size and (lab.min() < 0 or lab.max() >= 65536):
        raise ValueError("mask labels must lie in [0, 65536)")
    rgb = np.zeros((*lab.shape, 3), dtype=np.uint8)
    rgb[..., 0] = lab % 256
    rgb[..., 1] = lab // 256
    return rgb


def read_csv(path: Path, required: Sequence[str]) -> list[dict[str, str]]:
    """Read a csv into dicts keyed by column name; BrodenError if missing or lacking required columns."""
    if not path.is_file():
        raise BrodenError(f"{path.name}: file is missing ({path})")
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        header = [h.strip() for h in (reader.fieldnames or [])]
        missing = [c for c in required if c not in header]
        if missing:
            raise BrodenError(f"{path.name}: bad header {header}, missing column(s) {missing}")
        reader.fieldnames = header
        rows = []
        for lineno, row in enumerate(reader, start=2):
            if None in row or any(row.get(c) is None for c in required):
                raise BrodenError(f"{path.name}: line {lineno} has the wrong number of fields")
            rows.append({k: (v or "").strip() for k, v in row.items()})
    return rows


def _int(value: str, fname: str, what: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise BrodenError(f"{fname}: {what} is not an integer: {value!r}") from None


class BrodenDataset(torch.utils.data.Dataset):
    """A Broden directory (spec §3.1).

    Args:
        root: the directory holding index.csv, category.csv, label.csv, c_<cat>.csv and images/.
        split: 'train', 'val' or None (all).
        categories: categories to load (default: the six of the spec that category.csv lists).
        image_size: resize images to this side (bilinear); masks keep their sh x sw size.
        validate: also open every image and mask at construction and check their sizes (slower).

    Attributes:
        categories, records (kept index rows), labels (list of dicts from label.csv, index = number,
        entry 0 a padding row), label_names, num_labels (C + 1), primary_category (array, number -> index into
        categories, -1 for none), category_labels ({cat: [global numbers]}).
    """

    def __init__(self, root: str | Path, split: str | None = None, categories: Sequence[str] | None = None,
                 image_size: int | None = None, validate: bool = False):
        self.root = Path(root)
        self._images = str(self.root / "images")
        if not self.root.is_dir():
            raise BrodenError(f"{self.root}: Broden directory does not exist")
        self.split = split
        self.image_size = image_size

        cat_rows = read_csv(self.root / "category.csv", CATEGORY_REQUIRED)
        known = [r["name"] for r in cat_rows]
        if categories is None:
            categories = [c for c in DEFAULT_CATEGORIES if c in known] + \
                         [c for c in known if c not in DEFAULT_CATEGORIES]
        else:
            unknown = [c for c in categories if c not in known]
            if unknown:
                raise BrodenError(f"category.csv: categories {unknown} not listed (have {known})")
        self.categories: list[str] = list(categories)

        # label.csv
        label_rows = read_csv(self.root / "label.csv", LABEL_REQUIRED)
        numbers = [_int(r["number"], "label.csv", "number") for r in label_rows]
        if len(set(numbers)) != len(numbers) or any(n < 1 for n in numbers):
            raise BrodenError("label.csv: label numbers must be unique and >= 1")
        C = max(numbers, default=0)
        self.num_labels = C + 1
        self.labels: list[dict] = [{"number": 0, "name": "-", "category": "", "frequency": 0, "coverage": 0.0}
                                   for _ in range(C + 1)]
        for n, r in zip(numbers, label_rows, strict=True):
            self.labels[n] = {"number": n, "name": r["name"], "category": r["category"],
                              "frequency": _int(r["frequency"], "label.csv", "frequency"),
                              "coverage": float(r["coverage"]), "syns": r.get("syns", "")}
        self.label_names = [d["name"] for d in self.labels]

        # c_<cat>.csv: per-category codes and coverages -> primary category.
        self.category_labels: dict[str, list[int]] = {}
        self.category_stats: dict[str, dict[int, tuple[int, float]]] = {}
        coverage = np.zeros((len(self.categories), C + 1), dtype=np.float64)
        present = np.zeros((len(self.categories), C + 1), dtype=bool)
        for k, cat in enumerate(self.categories):
            fname = f"c_{cat}.csv"
            rows = read_csv(self.root / fname, CFILE_REQUIRED)
            stats = {}
            for r in rows:
                n = _int(r["number"], fname, "number")
                if not 1 <= n <= C or self.labels[n]["name"] == "-":
                    raise BrodenError(f"{fname}: label number {n} is not in label.csv")
                stats[n] = (_int(r["frequency"], fname, "frequency"), float(r["coverage"]))
                coverage[k, n] = stats[n][1]
                present[k, n] = True
            self.category_stats[cat] = stats
            self.category_labels[cat] = sorted(stats)
        # argmax coverage over the selected categories, ties to the later category
        primary = np.full(C + 1, -1, dtype=np.int64)
        best = np.full(C + 1, -np.inf)
        for k in range(len(self.categories)):
            take = present[k] & (coverage[k] >= best)
            primary[take] = k
            best[take] = coverage[k][take]
        self.primary_category = primary
        self._cat_members = present

        # index.csv
        rows = read_csv(self.root / "index.csv", INDEX_REQUIRED)
        with open(self.root / "index.csv", newline="") as fh:
            header = [h.strip() for h in next(csv.reader(fh))]
        missing = [c for c in self.categories if c not in header]
        if missing:
            raise BrodenError(f"index.csv: bad header {header}, missing category column(s) {missing}")
        self.image_level = {c: c in IMAGE_LEVEL for c in self.categories}
        self.records: list[dict] = []
        for lineno, r in enumerate(rows, start=2):
            if split is not None and r["split"] != split:
                continue
            rec = {"image": r["image"], "split": r["split"]}
            for key in ("ih", "iw", "sh", "sw"):
                rec[key] = _int(r[key], "index.csv", f"line {lineno} {key}")
            has_data = False
            for cat in self.categories:
                entries = [e.strip() for e in r[cat].split(";") if e.strip()] if r[cat] else []
                if self.image_level[cat]:
                    nums = [_int(e, "index.csv", f"line {lineno} {cat} label") for e in entries]
                    bad = [n for n in nums if not 1 <= n <= C or self.labels[n]["name"] == "-"]
                    if bad:
                        raise BrodenError(f"index.csv: line {lineno} {cat} labels {bad} not in label.csv")
                    rec[cat] = nums
                else:
                    for e in entries:
                        if not (self.root / "images" / e).is_file():
                            raise BrodenError(f"index.csv: line {lineno}: missing {cat} mask images/{e}")
                    rec[cat] = entries
                has_data = has_data or bool(entries)
            if not has_data:
                continue  # spec: keep images having any data in the selected categories
            img_path = self.root / "images" / rec["image"]
            if not img_path.is_file():
                raise BrodenError(f"index.csv: line {lineno}: missing image images/{rec['image']}")
            self.records.append(rec)
        if validate:
            for i in range(len(self.records)):
                try:
                    self._check_sizes(i)
                except BrodenError:
                    raise
                except (OSError, SyntaxError, ValueError) as e:  # PIL cannot decode one of its files
                    raise BrodenError(f"index.csv image {self.records[i]['image']}: an unreadable image or mask "
                                      f"({type(e).__name__}: {e})") from None

    # --- access ---------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.records)

    def _open_mask(self, rec: dict, rel: str) -> np.ndarray:
        path = os.path.join(self._images, rel)  # a str join: masks are many and small, pathlib's parsing shows
        try:
            with Image.open(path) as im:
                if im.size != (rec["sw"], rec["sh"]):
                    raise BrodenError(f"{rel}: mask size {im.size[1]}x{im.size[0]} != sh x sw "
                                      f"{rec['sh']}x{rec['sw']} of index.csv image {rec['image']}")
                arr = np.asarray(im if im.mode == "RGB" else im.convert("RGB"))
        except FileNotFoundError:
            raise BrodenError(f"{rel}: mask file is missing (index.csv image {rec['image']})") from None
        except BrodenError:
            raise
        except (OSError, SyntaxError, ValueError) as e:  # PIL cannot decode it
            raise BrodenError(f"{rel}: unreadable mask image ({type(e).__name__}: {e})") from None
        return decode_mask(arr)

    def _check_sizes(self, i: int) -> None:
        rec = self.records[i]
        try:
            with Image.open(self.root / "images" / rec["image"]) as im:
                if im.size != (rec["iw"], rec["ih"]):
                    raise BrodenError(f"{rec['image']}: image size {im.size[1]}x{im.size[0]} != ih x iw "
                                      f"{rec['ih']}x{rec['iw']} of index.csv")
        except FileNotFoundError:
            raise BrodenError(f"{rec['image']}: image file is missing (index.csv)") from None
        for cat in self.categories:
            if not self.image_level[cat]:
                for rel in rec[cat]:
                    with Image.open(self.root / "images" / rel) as m:
                        if m.size != (rec["sw"], rec["sh"]):
                            raise BrodenError(f"{rel}: mask size {m.size[1]}x{m.size[0]} != sh x sw "
                                              f"{rec['sh']}x{rec['sw']} of index.csv image {rec['image']}")

    def load_image(self, i: int) -> torch.Tensor:
        rec = self.records[i]
        path = self.root / "images" / rec["image"]
        try:
            with Image.open(path) as im:
                if im.size != (rec["iw"], rec["ih"]):
                    raise BrodenError(f"{rec['image']}: image size {im.size[1]}x{im.size[0]} != ih x iw "
                                      f"{rec['ih']}x{rec['iw']} of index.csv")
                im = im.convert("RGB")
                if self.image_size is not None and im.size != (self.image_size, self.image_size):
                    im = im.resize((self.image_size, self.image_size), Image.BILINEAR)
                arr = np.asarray(im, dtype=np.float32) / 255.0
        except FileNotFoundError:
            raise BrodenError(f"{rec['image']}: image file is missing (index.csv)") from None
        except BrodenError:
            raise
        except (OSError, SyntaxError, ValueError) as e:  # PIL cannot decode it
            raise BrodenError(f"{rec['image']}: unreadable image ({type(e).__name__}: {e})") from None
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()

    def load_labels(self, i: int) -> dict[str, torch.Tensor]:
        rec = self.records[i]
        out: dict[str, torch.Tensor] = {}
        for cat in self.categories:
            if self.image_level[cat]:
                out[cat] = torch.tensor(rec[cat], dtype=torch.int64)
            else:
                layers = [self._open_mask(rec, rel) for rel in rec[cat]]
                arr = np.stack(layers) if layers else np.zeros((0, rec["sh"], rec["sw"]), dtype=np.int64)
                out[cat] = torch.from_numpy(arr)
        return out

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.load_image(i), self.load_labels(i)

    def summary(self) -> dict[str, dict[str, int]]:
        """Per category: images (kept images with data in it) and labels (labels listed in c_<cat>.csv)."""
        return {cat: {"images": sum(1 for r in self.records if r[cat]),
                      "labels": len(self.category_labels[cat])}
                for cat in self.categories}

    def primary_category_name(self, number: int) -> str | None:
        k = int(self.primary_category[number])
        return self.categories[k] if k >= 0 else None
