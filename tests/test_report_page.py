"""The run report page (issue 14 item 6): what ``report.html`` holds, checked against the run's own files, and
that a real headless browser (Chromium; ``.ci/run`` installs it) renders it with every image loaded."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest
from conftest import TINY
from test_tables import make_tables

from featurelens.report_page import MAX_ROWS, write_run_report
from featurelens.results import read_results
from featurelens.train import train

CHROMIUM = next((p for p in (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")) if p), None)
needs_browser = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on this machine (.ci/run installs it)")


class _Page(HTMLParser):
    """The page's image sources, figure captions, section ids and table cells."""

    def __init__(self, text: str):
        super().__init__()
        self.images, self.captions, self.ids, self.cells = [], [], [], []
        self._in: str | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs["src"])
        if "id" in attrs:
            self.ids.append(attrs["id"])
        self._in = tag if tag in ("figcaption", "td") else None

    def handle_data(self, data):
        if self._in == "figcaption":
            self.captions.append(data)
        elif self._in == "td":
            self.cells.append(data)

    def handle_endtag(self, tag):
        self._in = None


def render(page: Path, tmp_path: Path) -> dict[str, str]:
    """Open ``page`` in headless Chromium (no network, a fresh profile) and return the ``<body>`` attributes of
    the rendered DOM: the page's script sets how many images there are and how many loaded."""
    out = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
         "--virtual-time-budget=20000", "--dump-dom", page.resolve().as_uri()],
        capture_output=True, text=True, timeout=120, check=True).stdout
    body = re.search(r"<body([^>]*)>", out)
    assert body, out[:500]
    return dict(re.findall(r'([\w-]+)="([^"]*)"', body.group(1)))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A 2-epoch tiny training run with chirality, class filters and network dissection."""
    from conftest import make_cfg

    out = tmp_path_factory.mktemp("report_run")
    base = [o for o in TINY if not o.startswith("analysis.")]
    cfg = make_cfg(out, [*base, "analysis=[chirality,class_filters,dissection]", "analysis.chirality.fmap.n_probe=16",
                         "analysis.dissection.synthbroden.n_images=40", "analysis.dissection.batch_size=16",
                         "analysis.dissection.quantile.q=0.02", "analysis.dissection.top_units=4"])
    train(cfg)
    return out


def test_the_run_page_holds_the_runs_headline_values_figures_tables_and_unit_gallery(run_dir):
    page = run_dir / "report.html"
    assert page.exists()  # written by the runner after every analysed epoch
    text = page.read_text()
    parsed = _Page(text)
    assert {"chirality", "class_filters", "dissection"} <= set(parsed.ids)
    # the headline values of every analysed epoch, as the results file has them
    for name, key in (("chirality", "model"), ("class_filters", "acc_full"), ("dissection", "unique_detectors")):
        records = read_results(run_dir / "analysis" / name / "results.jsonl")
        assert [r["epoch"] for r in records] == [0, 1, 2]
        assert f"<th>{name}/{key}</th>" in text
        for r in records:
            assert f"{r[f'{name}/{key}']:.4g}" in parsed.cells, (name, r["epoch"])
    # every image exists; the latest figures are shown (the per-epoch copies are linked, not shown)
    assert parsed.images and all((run_dir / src).is_file() for src in parsed.images)
    assert "analysis/chirality/chirality_vs_epoch.png" in parsed.images
    assert not any(re.search(r"_epoch\d+\.png$", src) for src in parsed.images)
    assert 'href="analysis/chirality/chirality_vs_epoch_epoch0.png"' in text
    # the latest per-epoch table only
    assert "analysis/chirality/table_epoch2.csv" in text and "table_epoch1.csv" not in text
    # the dissection gallery: one card per unit strip, captioned from the layer's tally, best IoU first
    layer = run_dir / "analysis/dissection/features.5"
    tally = pd.read_csv(layer / "tally.csv").set_index("unit")
    strips = sorted((layer / "topimages").glob("unit_*.jpg"))
    assert 1 <= len(strips) <= 4
    units = [int(c.split(":")[0].split()[1]) for c in parsed.captions if c.startswith("unit ")]
    assert sorted(units) == sorted(int(p.stem.split("_")[1]) for p in strips)
    assert "<h3>conv2 (features.5): top images per unit</h3>" in text  # the small CNN [4, 8]: conv2's ReLU
    assert [tally.loc[u, "score"] for u in units] == sorted((tally.loc[u, "score"] for u in units), reverse=True)
    u = units[0]
    assert (f"unit {u}: {tally.loc[u, 'label']} ({tally.loc[u, 'category']}), IoU {tally.loc[u, 'score']:.3f}"
            in parsed.captions)


def test_a_failed_run_says_why_and_long_tables_are_cut(tmp_path):
    run = tmp_path / "run"
    (run / "analysis/demo").mkdir(parents=True)
    (run / "analysis/demo/results.jsonl").write_text(json.dumps({"epoch": 0, "demo/x": 1.5}) + "\n")
    pd.DataFrame({"unit": range(MAX_ROWS + 5)}).to_csv(run / "analysis/demo/long.csv", index=False)
    (run / "FAILED").write_text("Traceback ...\nDivergedError: epoch 1: loss 1e9\n")
    text = write_run_report(run).read_text()
    assert "FAILED: DivergedError: epoch 1: loss 1e9" in text
    assert f"first {MAX_ROWS} of {MAX_ROWS + 5} rows" in text and 'href="analysis/demo/long.csv"' in text
    assert "<td class=\"n\">1.5</td>" in text


@needs_browser
def test_the_run_page_renders_in_a_headless_browser_with_every_image(run_dir, tmp_path):
    body = render(run_dir / "report.html", tmp_path)
    n = len(_Page((run_dir / "report.html").read_text()).images)
    assert int(body["data-images"]) == n > 5
    assert int(body["data-images-loaded"]) == n


@needs_browser
def test_the_sweep_page_renders_with_its_tables_and_figures(tmp_path):
    from test_tables import _job

    sweep = tmp_path / "sweep"
    for i, (model, init, acc) in enumerate((("vgg16", "kaiming", 0.8), ("vgg16", "xavier", 0.4),
                                            ("resnet50", "kaiming", 0.7), ("resnet50", "xavier", 0.3))):
        _job(sweep, str(i), model, init, 0, acc)
    (sweep / "4/.hydra").mkdir(parents=True)
    (sweep / "4/.hydra/config.yaml").write_text("seed: 0\n")
    (sweep / "4/FAILED").write_text("DivergedError: epoch 0\n")
    out = tmp_path / "tables"
    assert make_tables.main([str(sweep), "--out", str(out)]) == 0
    text = (out / "report.html").read_text()
    parsed = _Page(text)
    assert "skipping diverged (DivergedError: epoch 0) job" in text
    assert "<h2>class_filters_k</h2>" in text and "<h2>chirality_init</h2>" in text
    assert "Rows grouped by model and the swept setting (init); seeds averaged." in text
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs and sorted(Path(s).name for s in parsed.images) == pngs
    body = render(out / "report.html", tmp_path)
    assert int(body["data-images"]) == int(body["data-images-loaded"]) == len(pngs)
