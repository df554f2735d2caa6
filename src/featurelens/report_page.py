"""The run report page: one static ``report.html`` per run (and per ``make_tables.py`` output folder).

The page reads only what the run wrote to its directory: the composed config (``.hydra/config.yaml``), the final
metrics, a ``FAILED`` reason, and per analysis its records (``analysis/<name>/results.jsonl``: the headline
values per epoch, every scalar in a folded table), its end-of-run summary, its latest figures (each linking the
per-epoch copies), its tables and, for network dissection, the per-unit gallery of top images with each unit's
concept, category and IoU, as in NetDissect-Lite's html. Images and tables are linked by relative paths, so the
folder opens anywhere without a network or a server; the inline script only marks on ``<body>`` how many images
loaded (``data-images-loaded`` of ``data-images``), which the test reads back from a headless browser.
"""

from __future__ import annotations

import html
import json
import math
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from featurelens.results import atomic_write, read_results

MAX_ROWS = 30  # table rows shown on the page (every table links its full file)
_EPOCH_COPY = re.compile(r"_epoch(\d+)$")  # figure copies kept per epoch (plots.epoch_stamp)
_TABLE_EPOCH = re.compile(r"^(.*)_epoch(\d+)$")  # per-epoch tables: the latest is shown

_STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 1.5em auto; max-width: 1200px; padding: 0 1em; color: #222 }
h1 { font-size: 1.5em } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em }
h3 { font-size: 1.05em; margin: 1.2em 0 .4em } .note { color: #666 } .failed { background: #fde; padding: .5em }
table { border-collapse: collapse; margin: .4em 0; font-size: 12px } td, th { border: 1px solid #ddd;
padding: 2px 6px; text-align: left } td.n { text-align: right } th { background: #f4f4f4 }
.figs { display: flex; flex-wrap: wrap; gap: 12px } figure { margin: 0 } figure img { max-width: 560px;
border: 1px solid #eee } figcaption { font-size: 12px; color: #555 } .gallery figure img { max-width: 100% }
.gallery { display: grid; grid-template-columns: 1fr; gap: 8px } .scroll { overflow-x: auto }
"""
_SCRIPT = """
window.addEventListener('load', () => {
  const images = [...document.images];
  document.body.dataset.images = images.length;
  document.body.dataset.imagesLoaded = images.filter(i => i.complete && i.naturalWidth > 0).length;
});
"""


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):  # e.g. no val loss before training
        return "–"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _table(frame: pd.DataFrame, link: str | None = None) -> str:
    """``frame`` as an html table, cut to :data:`MAX_ROWS` rows with a note (and a link to the full file)."""
    shown = frame.head(MAX_ROWS)
    head = "".join(f"<th>{_esc(c)}</th>" for c in shown.columns)
    body = "".join("<tr>" + "".join(f'<td class="n">{_esc(_fmt(v))}</td>' if isinstance(v, int | float)
                                    else f"<td>{_esc(_fmt(v))}</td>" for v in row) + "</tr>"
                   for row in shown.itertuples(index=False))
    note = f"first {MAX_ROWS} of {len(frame)} rows; " if len(frame) > MAX_ROWS else ""
    more = f'<p class="note">{note}<a href="{_esc(link)}">{_esc(link)}</a></p>' if link else ""
    return f'<div class="scroll"><table><tr>{head}</tr>{body}</table></div>{more}'


def _figure(src: str, caption: str, copies: Iterable[tuple[int, str]] = ()) -> str:
    links = " ".join(f'<a href="{_esc(path)}">{epoch}</a>' for epoch, path in copies)
    kept = f" · epochs {links}" if links else ""
    return (f'<figure><img src="{_esc(src)}" alt="{_esc(caption)}" loading="eager">'
            f"<figcaption>{_esc(caption)}{kept}</figcaption></figure>")


def _page(title: str, body: list[str]) -> str:
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{_esc(title)}</title>'
            f"<style>{_STYLE}</style></head><body><h1>{_esc(title)}</h1>{''.join(body)}"
            f"<script>{_SCRIPT}</script></body></html>")


def _write(path: Path, text: str) -> Path:
    return atomic_write(path, lambda fh: fh.write(text.encode()))


def _figures(folder: Path, root: Path) -> list[str]:
    """The latest figures below ``folder`` (not the per-epoch copies, which each figure links)."""
    pngs = sorted(folder.rglob("*.png"))
    copies: dict[Path, list[tuple[int, str]]] = {}
    for p in pngs:
        if m := _EPOCH_COPY.search(p.stem):
            latest = p.with_name(p.stem[: m.start()] + p.suffix)
            copies.setdefault(latest, []).append((int(m.group(1)), p.relative_to(root).as_posix()))
    return [_figure(p.relative_to(root).as_posix(), p.relative_to(folder).as_posix(), sorted(copies.get(p, [])))
            for p in pngs if not _EPOCH_COPY.search(p.stem)]


def _tables(folder: Path, root: Path) -> list[str]:
    """The csv tables below ``folder``: of per-epoch tables (``<name>_epoch<E>.csv``) the latest epoch's."""
    latest: dict[tuple[Path, str], tuple[int, Path]] = {}
    for p in sorted(folder.rglob("*.csv")):
        m = _TABLE_EPOCH.match(p.stem)
        key, epoch = ((p.parent, m.group(1)), int(m.group(2))) if m else ((p.parent, p.stem), -1)
        if key not in latest or epoch > latest[key][0]:
            latest[key] = (epoch, p)
    parts = []
    for _, path in sorted(latest.values(), key=lambda e: e[1]):
        try:
            frame = pd.read_csv(path)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError):
            continue
        parts.append(f"<h3>{_esc(path.relative_to(folder).as_posix())}</h3>"
                     + _table(frame, path.relative_to(root).as_posix()))
    return parts


def _gallery(folder: Path, root: Path) -> list[str]:
    """Per dissected layer (by the name in its ``counts.json``), every unit with a top-image strip: its concept,
    category and IoU (from the layer's ``tally.csv``), best unit first."""
    parts = []
    for strips in sorted(folder.rglob("topimages")):
        counts = strips.parent / "counts.json"
        layer = json.loads(counts.read_text()).get("layer_name") if counts.exists() else None
        layer = layer or strips.parent.relative_to(folder).as_posix()
        tally_path = strips.parent / "tally.csv"
        tally = pd.read_csv(tally_path).set_index("unit") if tally_path.exists() else None
        cards = []
        for jpg in sorted(strips.glob("unit_*.jpg")):
            unit = int(jpg.stem.split("_")[1])
            if tally is not None and unit in tally.index:
                row = tally.loc[unit]
                score = row["score"]
                caption = f"unit {unit}: {row['label']} ({row['category']}), IoU {score:.3f}"
            else:
                caption, score = f"unit {unit}", float("-inf")
            cards.append((-score, unit, _figure(jpg.relative_to(root).as_posix(), caption)))
        if cards:
            parts.append(f"<h3>{_esc(layer)}: top images per unit</h3>"
                         f'<div class="gallery">{"".join(card for *_, card in sorted(cards))}</div>')
    return parts


def _epochs_table(records: list[dict], keys: list[str]) -> str:
    rows = [{"epoch": r.get("epoch"), **{k: r.get(k) for k in keys}} for r in records]
    return _table(pd.DataFrame(rows, columns=["epoch", *keys]))


def _analysis_section(folder: Path, root: Path, headline: tuple[str, ...]) -> str:
    name = folder.name
    records = read_results(folder / "results.jsonl") if (folder / "results.jsonl").exists() else []
    parts = [f'<h2 id="{_esc(name)}">{_esc(name)}</h2>']
    if records:
        metrics = [k for k in ("train/loss_epoch", "val/loss", "val/acc") if any(k in r for r in records)]
        keys = [*metrics, *(f"{name}/{k}" for k in headline if any(f"{name}/{k}" in r for r in records))]
        scalars = sorted({k for r in records for k, v in r.items() if k.startswith(f"{name}/")
                          and isinstance(v, int | float) and not isinstance(v, bool)})
        parts += ["<h3>Headline values per epoch</h3>", _epochs_table(records, keys),
                  f"<details><summary>every scalar per epoch ({len(scalars)})</summary>"
                  f"{_epochs_table(records, scalars)}</details>"]
    else:
        parts.append('<p class="note">no analysed epoch yet</p>')
    summary_path = folder / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    summary = {k: v for k, v in summary.items() if k != "epochs"}
    if summary:
        parts += ["<h3>End of run</h3>", _table(pd.DataFrame({"value": summary}).rename_axis("key").reset_index())]
    figures = _figures(folder, root)
    if figures:
        parts += ["<h3>Figures</h3>", f'<div class="figs">{"".join(figures)}</div>']
    parts += _tables(folder, root)
    parts += _gallery(folder, root)
    return "".join(parts)


def _run_header(run_dir: Path) -> list[str]:
    from omegaconf import OmegaConf

    parts = [f'<p class="note">{_esc(run_dir.resolve())}</p>']
    failed = run_dir / "FAILED"
    if failed.exists():
        lines = [line for line in failed.read_text(errors="replace").splitlines() if line.strip()]
        parts.append(f'<p class="failed">FAILED: {_esc(lines[-1] if lines else "no reason recorded")}</p>')
    config_path = run_dir / ".hydra" / "config.yaml"
    if config_path.exists():
        cfg = OmegaConf.load(config_path)
        facts = {"model": OmegaConf.select(cfg, "model.arch"), "data": OmegaConf.select(cfg, "data.name"),
                 "init": OmegaConf.select(cfg, "init.method"), "optimizer": OmegaConf.select(cfg, "optimizer._target_"),
                 "lr": OmegaConf.select(cfg, "optimizer.lr"), "epochs": OmegaConf.select(cfg, "trainer.max_epochs"),
                 "seed": OmegaConf.select(cfg, "seed")}
        overrides = run_dir / ".hydra" / "overrides.yaml"
        if overrides.exists():
            facts["overrides"] = " ".join(OmegaConf.to_container(OmegaConf.load(overrides))) or "(none)"
        parts.append(_table(pd.DataFrame({"value": {k: v for k, v in facts.items() if v is not None}})
                            .rename_axis("setting").reset_index(), ".hydra/config.yaml"))
    metrics_path = run_dir / "metrics.json"
    if metrics_path.exists():
        metrics = json.loads(metrics_path.read_text())
        shown = {k: v for k, v in metrics.items() if isinstance(v, int | float) and k.split("/")[0] in
                 ("train", "val", "test", "epochs")}
        if shown:
            frame = pd.DataFrame({"value": shown}).rename_axis("metric").reset_index()
            parts += ["<h3>Final metrics</h3>", _table(frame, "metrics.json")]
    return parts


def write_run_report(run_dir: Path) -> Path:
    """Write ``<run_dir>/report.html`` from what the run has written so far; returns its path."""
    from featurelens.api import REGISTRY

    run_dir = Path(run_dir)
    folders = sorted(p for p in (run_dir / "analysis").glob("*") if p.is_dir()) if (run_dir / "analysis").is_dir() \
        else []
    nav = " · ".join(f'<a href="#{_esc(f.name)}">{_esc(f.name)}</a>' for f in folders)
    body = [*_run_header(run_dir), f"<p>analyses: {nav or 'none'}</p>"]
    body += [_analysis_section(f, run_dir, getattr(REGISTRY.get(f.name), "headline", ())) for f in folders]
    return _write(run_dir / "report.html", _page(f"featurelens run {run_dir.name}", body))


def write_sweep_report(out: Path, files: list[Path], notes: list[str]) -> Path:
    """Write ``<out>/report.html`` for ``make_tables.py``: ``notes`` (what was skipped, how rows are grouped),
    then per table its csv (or, without one, its markdown text) and every figure written."""
    out = Path(out)
    body = [f"<p>{_esc(note)}</p>" for note in notes]
    stems = {p.with_suffix("") for p in files if p.suffix == ".csv"}
    for path in sorted(files):
        rel = path.resolve().relative_to(out.resolve()).as_posix() if path.resolve().is_relative_to(out.resolve()) \
            else path.resolve().as_uri()
        if path.suffix == ".csv":
            body += [f"<h2>{_esc(path.stem)}</h2>", _table(pd.read_csv(path), rel)]
            md = path.with_suffix(".md")
            if md.exists():
                lines = [ln for ln in md.read_text().splitlines() if ln.strip() and not ln.startswith("|")]
                body += [f'<p class="note">{_esc(ln.lstrip("# "))}</p>' for ln in lines]
        elif path.suffix == ".md" and path.with_suffix("") not in stems:
            body += [f"<h2>{_esc(path.stem)}</h2>", f"<pre>{_esc(path.read_text())}</pre>"]
        elif path.suffix == ".png":
            body.append(f'<div class="figs">{_figure(rel, path.name)}</div>')
    return _write(out / "report.html", _page(f"featurelens sweep tables: {out.name}", body))
