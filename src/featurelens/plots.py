"""Matplotlib figures shared by the callbacks and the table scripts (Agg backend, files on disk)."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

_EPOCH: list[int] = []  # the epoch being reported (see :func:`epoch_stamp`)


@contextlib.contextmanager
def epoch_stamp(epoch: int) -> Iterator[None]:
    """Every figure saved inside the block says ``epoch <epoch>`` in its corner and is also kept as
    ``<name>_epoch<epoch>.png`` beside ``<name>.png`` (the latest), so a later epoch never overwrites it."""
    _EPOCH.append(epoch)
    try:
        yield
    finally:
        _EPOCH.pop()


def _save(fig: plt.Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if _EPOCH:
        fig.text(0.995, 0.005, f"epoch {_EPOCH[-1]}", ha="right", va="bottom", fontsize=7, color="0.4")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    if _EPOCH:
        shutil.copyfile(path, path.with_name(f"{path.stem}_epoch{_EPOCH[-1]}{path.suffix}"))
    plt.close(fig)
    return path


def colours(n: int) -> list:
    """``n`` distinguishable line colours: the 10-colour cycle, then tab20, then evenly spaced on a colour map."""
    if n <= 10:
        return [plt.cm.tab10(i) for i in range(n)]
    if n <= 20:
        return [plt.cm.tab20(i) for i in range(n)]
    return [plt.cm.turbo(v) for v in np.linspace(0.02, 0.98, n)]


def line_plot(x: Sequence, series: Mapping[str, Sequence[float]], path: Path, *, xlabel: str, ylabel: str,
              title: str = "", bands: Mapping[str, Sequence[float]] | None = None, legend_cols: int = 1,
              hline: float | Mapping[str, float] | None = None, xticks: Sequence[str] | None = None) -> Path:
    """One line per series over ``x``, each its own colour (and, past 10, alternating line styles); optional
    ±band per series (e.g. seed spread); ``hline``: dashed reference line(s), a value or label -> value."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    styles = ("-", "--", ":") if len(series) > 10 else ("-",)
    for i, ((label, ys), colour) in enumerate(zip(series.items(), colours(len(series)), strict=True)):
        ys = np.asarray(ys, dtype=float)
        ax.plot(x[: len(ys)], ys, marker="o", ms=3, lw=1.2, label=label, color=colour, ls=styles[i % len(styles)])
        if bands and label in bands:
            sd = np.asarray(bands[label], dtype=float)
            ax.fill_between(x[: len(ys)], ys - sd, ys + sd, alpha=0.2, color=colour)
    refs = hline if isinstance(hline, Mapping) else ({} if hline is None else {"": hline})
    for (label, value), ls in zip(refs.items(), ("--", "-.", ":", (0, (5, 5))), strict=False):
        ax.axhline(value, color="0.35", ls=ls, lw=0.9, label=label or None)
    if xticks is not None:
        ax.set_xticks(range(len(xticks)), xticks, rotation=60, ha="right", fontsize=7)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    if len(series) <= 24:
        ax.legend(fontsize=7, ncol=legend_cols, loc="best")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def histogram_grid(edges: Sequence[float], hists: Mapping[str, Mapping[str, Sequence[float]]], path: Path,
                   *, xlabel: str, title: str = "") -> Path:
    """Small multiples, one panel per key of ``hists``; each panel overlays its named histograms (densities)."""
    n = len(hists)
    cols = min(4, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.5 * rows), squeeze=False)
    edges = np.asarray(edges, dtype=float)
    width = np.diff(edges)
    for ax, (panel, curves) in zip(axes.flat, hists.items(), strict=False):
        for label, counts in curves.items():
            counts = np.asarray(counts, dtype=float)
            density = counts / max(counts.sum(), 1) / width
            ax.stairs(density, edges, label=label, fill=False, lw=1.2)
        ax.set_title(panel, fontsize=8)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def filter_montage(weight: np.ndarray, labels: Sequence[str], path: Path, *, title: str = "") -> Path:
    """Conv filters (O, C, k, k) as images (RGB if C == 3, else the channel mean), each with a caption."""
    w = np.asarray(weight, dtype=float)
    img = w.transpose(0, 2, 3, 1) if w.shape[1] == 3 else w.mean(axis=1)[..., None].repeat(3, axis=-1)
    lo, hi = img.min(axis=(1, 2, 3), keepdims=True), img.max(axis=(1, 2, 3), keepdims=True)
    img = (img - lo) / np.maximum(hi - lo, 1e-12)
    return image_grid(list(img), labels, path, title=title, max_cols=16, cell=(0.9, 1.05), fontsize=6)


def heatmap(matrix: np.ndarray, path: Path, *, xlabel: str, ylabel: str, title: str = "",
            yticks: Sequence[str] | None = None) -> Path:
    """A matrix as an image (e.g. the class × feature selection mask); ``yticks``: a label per row (up to 40)."""
    matrix = np.asarray(matrix, dtype=float)
    fig, ax = plt.subplots(figsize=(min(14, 3 + 0.08 * matrix.shape[1]), min(10, 1.5 + 0.25 * matrix.shape[0])))
    im = ax.imshow(matrix, aspect="auto", interpolation="nearest", cmap="viridis")
    fig.colorbar(im, ax=ax, fraction=0.03)
    if yticks is not None and len(yticks) <= 40:
        ax.set_yticks(range(len(yticks)), yticks, fontsize=7)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    return _save(fig, path)


def bar_plot(x: Sequence, heights: Sequence[float], path: Path, *, xlabel: str, ylabel: str, title: str = "",
             rotate_labels: bool = False, empty: str = "nothing to show") -> Path:
    """Bars over ``x``; with no bars, a panel that says ``empty`` instead of empty axes."""
    fig, ax = plt.subplots(figsize=(max(7.0, 0.18 * len(x)) if rotate_labels else 7, 3.5))
    if not len(x):
        ax.text(0.5, 0.5, empty, ha="center", va="center", fontsize=11, transform=ax.transAxes)
        ax.set_xticks([])
        ax.set_yticks([])
    ax.bar(x, heights, width=1.0 if not rotate_labels else 0.8)
    if rotate_labels:
        ax.tick_params(axis="x", labelrotation=80, labelsize=7)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    return _save(fig, path)


def histogram_with_marker(values: Sequence[float], marker: float, path: Path, *, xlabel: str, title: str = "") -> Path:
    """A histogram of null values (e.g. shuffled n-cuts) with the observed value as a vertical line."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(np.asarray(values, dtype=float), bins=max(5, len(values) // 2), color="grey", alpha=0.7)
    ax.axvline(marker, color="red", lw=2)
    ax.set(xlabel=xlabel, ylabel="count", title=title)
    return _save(fig, path)


def image_grid(images: Sequence[np.ndarray], titles: Sequence[str], path: Path, *, title: str = "",
               max_cols: int = 4, cell: tuple[float, float] = (2.2, 2.4), fontsize: int = 7) -> Path:
    """Images (H, W, C) in [0, 1] in a row-major grid, each with a caption."""
    n = len(images)
    cols = min(max_cols, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cell[0] * cols, cell[1] * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, img, caption in zip(axes.flat, images, titles, strict=False):
        ax.imshow(np.clip(img.squeeze(-1) if img.shape[-1] == 1 else img, 0, 1), cmap="gray",
                  interpolation="nearest")
        ax.set_title(caption, fontsize=fontsize)
    if title:
        fig.suptitle(title, fontsize=fontsize + 2)
    return _save(fig, path)
