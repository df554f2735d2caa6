"""Broden file contract: synthbroden writer <-> BrodenDataset loader (dissection spec §3.1, §3.3, §6)."""

from __future__ import annotations

import csv
import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from featurelens.data.broden import BrodenDataset, BrodenError, decode_mask, encode_mask
from featurelens.data.synthbroden import write_synthbroden

N, SIZE = 40, 32


@pytest.fixture(scope="module")
def broden(tmp_path_factory) -> Path:
    return write_synthbroden(tmp_path_factory.mktemp("sb") / "broden", n_images=N, size=SIZE, seed=0)


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(src, dst)
    return dst


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_rg_round_trip():
    for n, (r, g) in {300: (44, 1), 1197: (173, 4), 255: (255, 0), 256: (0, 1), 0: (0, 0)}.items():
        rgb = encode_mask(np.array([[n]]))
        assert tuple(rgb[0, 0]) == (r, g, 0)
    allv = np.arange(65536).reshape(256, 256)
    assert np.array_equal(decode_mask(encode_mask(allv)), allv)
    with pytest.raises(ValueError):
        encode_mask(np.array([[65536]]))


def test_layout_and_split(broden):
    for name in ("index.csv", "category.csv", "label.csv", "README.txt",
                 *[f"c_{c}.csv" for c in ("color", "object", "part", "material", "scene", "texture")]):
        assert (broden / name).is_file(), name
    with open(broden / "index.csv") as fh:
        assert fh.readline().strip() == "image,split,ih,iw,sh,sw,color,object,part,material,scene,texture"
    rows = _rows(broden / "index.csv")
    assert len(rows) == N
    for r in rows:
        h = int(hashlib.md5(r["image"].encode()).hexdigest()[:8], 16) / 2**32
        assert r["split"] == ("train" if h < 0.7 else "val")
        assert (int(r["ih"]), int(r["sh"])) == (SIZE, SIZE // 2)
        assert r["image"].startswith("synth/")
    labels = _rows(broden / "label.csv")
    key = [(-int(r["frequency"]), -float(r["coverage"])) for r in labels]
    assert key == sorted(key) and [int(r["number"]) for r in labels] == list(range(1, len(labels) + 1))
    names = {r["name"]: r for r in labels}
    assert all(n.endswith("-c") for n in names if "color(" in names[n]["category"])
    assert all(n.endswith("-s") for n in names if "scene(" in names[n]["category"])
    assert "material(" in names["striped"]["category"]  # the one label shared by material and texture
    mat = {r["name"]: r["number"] for r in _rows(broden / "c_material.csv")}
    tex = {r["name"]: r["number"] for r in _rows(broden / "c_texture.csv")}
    if "striped" in tex:
        assert tex["striped"] == mat["striped"]


def test_writer_loader_round_trip(broden):
    ds = BrodenDataset(broden, validate=True)
    assert len(ds) == N
    C = ds.num_labels
    freq = np.zeros(C, np.int64)
    cov = np.zeros(C)
    cfreq = {c: np.zeros(C, np.int64) for c in ds.categories}
    ccov = {c: np.zeros(C) for c in ds.categories}
    for i in range(len(ds)):
        img, lab = ds[i]
        assert img.shape == (3, SIZE, SIZE) and img.dtype.is_floating_point
        assert 0.0 <= float(img.min()) and float(img.max()) <= 1.0
        present = set()
        for cat, t in lab.items():
            members = set(ds.category_labels[cat])
            if ds.image_level[cat]:
                nums = t.tolist()
                assert t.ndim == 1 and set(nums) <= members
                fr = {n: 1.0 for n in nums}
            else:
                assert t.ndim == 3 and t.shape[1:] == (SIZE // 2, SIZE // 2) and t.dtype.is_signed
                vals = set(np.unique(t.numpy()).tolist()) - {0}
                assert vals <= members, (cat, vals - members)  # every mask decodes to its category's labels
                arr = t.numpy()
                fr = {n: float((arr == n).any(0).mean()) for n in vals}
            for n, f in fr.items():
                cfreq[cat][n] += 1
                ccov[cat][n] += f
                cov[n] += f
                present.add(n)
        for n in present:
            freq[n] += 1
    for n in range(1, C):
        assert ds.labels[n]["frequency"] == freq[n]
        assert ds.labels[n]["coverage"] == pytest.approx(cov[n], rel=1e-9)
    for cat in ds.categories:
        for n, (f, c) in ds.category_stats[cat].items():
            assert f == cfreq[cat][n] and c == pytest.approx(ccov[cat][n], rel=1e-9)
        assert set(ds.category_stats[cat]) == set(np.flatnonzero(cfreq[cat]).tolist())
    # primary category: striped's coverage as material vs texture decides it
    s = ds.label_names.index("striped")
    k = int(ds.primary_category[s])
    mc, tc = ds.category_stats["material"][s][1], ds.category_stats.get("texture", {}).get(s, (0, -1.0))[1]
    assert ds.categories.index("texture") > ds.categories.index("material")  # ties go to the later
    assert ds.categories[k] == ("texture" if tc >= mc else "material")


def test_summary_and_split_filter(broden):
    ds = BrodenDataset(broden)
    summ = ds.summary()
    cats = {r["name"]: r for r in _rows(broden / "category.csv")}
    for cat, d in summ.items():
        assert d["images"] == int(cats[cat]["frequency"])
        assert d["labels"] == int(cats[cat]["count"])
    assert summ["color"]["images"] == N and summ["scene"]["labels"] <= 16
    tr, va = BrodenDataset(broden, split="train"), BrodenDataset(broden, split="val")
    assert len(tr) + len(va) == N and all(r["split"] == "train" for r in tr.records)
    sub = BrodenDataset(broden, categories=["texture"])  # images without texture data are not kept
    assert len(sub) == summ["texture"]["images"] and sub.categories == ["texture"]
    assert BrodenDataset(broden, image_size=24)[0][0].shape == (3, 24, 24)


def test_shuffled_columns(broden, tmp_path):
    root = _copy(broden, tmp_path)
    with open(root / "index.csv", newline="") as fh:
        rows = list(csv.reader(fh))
    perm = np.random.default_rng(1).permutation(len(rows[0]))
    with open(root / "index.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([[r[j] for j in perm] for r in rows])
    a, b = BrodenDataset(broden), BrodenDataset(root)
    assert a.records == b.records
    for i in (0, len(a) - 1):
        (ia, la), (ib, lb) = a[i], b[i]
        assert (ia == ib).all() and all((la[c] == lb[c]).all() for c in la)


def test_deterministic(tmp_path, broden):
    other = write_synthbroden(tmp_path / "again", n_images=N, size=SIZE, seed=0)
    files = sorted(p.relative_to(broden) for p in broden.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(other) for p in other.rglob("*") if p.is_file())
    for f in files:
        assert (broden / f).read_bytes() == (other / f).read_bytes(), f
    third = write_synthbroden(tmp_path / "seed1", n_images=N, size=SIZE, seed=1)
    assert (third / "label.csv").read_bytes() != (broden / "label.csv").read_bytes()


def test_jpg_option(tmp_path):
    root = write_synthbroden(tmp_path / "j", n_images=4, size=16, seed=0, image_format="jpg")
    ds = BrodenDataset(root, validate=True)
    assert ds.records[0]["image"].endswith(".jpg") and ds[0][0].shape == (3, 16, 16)


def _first_mask(root: Path, cat: str = "object") -> str:
    return next(r[cat].split(";")[0] for r in _rows(root / "index.csv") if r[cat])


@pytest.mark.parametrize("case", ["missing_csv", "bad_header", "missing_image", "missing_mask", "mask_size",
                                  "missing_cfile", "bad_label_header"])
def test_malformed(broden, tmp_path, case):
    root = _copy(broden, tmp_path)
    expect = "index.csv"
    if case == "missing_csv":
        (root / "index.csv").unlink()
    elif case == "bad_header":
        text = (root / "index.csv").read_text().replace("image,split", "img,split", 1)
        (root / "index.csv").write_text(text)
    elif case == "missing_image":
        rel = _rows(root / "index.csv")[3]["image"]
        (root / "images" / rel).unlink()
        expect = rel
    elif case == "missing_mask":
        expect = _first_mask(root, "part")
        (root / "images" / expect).unlink()
    elif case == "mask_size":
        expect = _first_mask(root)
        p = root / "images" / expect
        Image.open(p).resize((SIZE // 2 + 1, SIZE // 2), Image.NEAREST).save(p)
    elif case == "missing_cfile":
        (root / "c_material.csv").unlink()
        expect = "c_material.csv"
    elif case == "bad_label_header":
        text = (root / "label.csv").read_text().replace("coverage", "cov", 1)
        (root / "label.csv").write_text(text)
        expect = "label.csv"
    with pytest.raises(BrodenError, match=expect.replace(".", r"\.")) as info:
        ds = BrodenDataset(root)
        if case == "mask_size":  # sizes are checked on access (or up front with validate=True)
            for i in range(len(ds)):
                ds[i]
    assert isinstance(info.value, ValueError)
    if case == "mask_size":
        with pytest.raises(BrodenError, match=expect.replace(".", r"\.")):
            BrodenDataset(root, validate=True)


def test_cached_synthbroden_is_written_once(tmp_path):
    from featurelens.data.synthbroden import cached_synthbroden

    root = cached_synthbroden(tmp_path, n_images=6, size=16, seed=1, image_format="png")
    stamp = (root / "index.csv").stat().st_mtime_ns
    assert cached_synthbroden(tmp_path, n_images=6, size=16, seed=1, image_format="png") == root
    assert (root / "index.csv").stat().st_mtime_ns == stamp  # reused, not rewritten
    assert not list((tmp_path / "synthbroden").glob(".tmp_*"))  # no half-written folder left behind
    assert cached_synthbroden(tmp_path, n_images=6, size=16, seed=2, image_format="png") != root
