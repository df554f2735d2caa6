"""Tests for the procedural shapes renderer and dataset (featurelens.data.shapes)."""

from __future__ import annotations

import numpy as np
import pytest

from featurelens.data import shapes
from featurelens.data.shapes import (
    BACKGROUND_COLORS,
    COLORS,
    FOREGROUND_COLORS,
    GENERATOR_VERSION,
    MATERIALS,
    SCENES,
    SHAPE_CLASSES,
    TEXTURES,
    Scene,
    load_or_make_shapes,
    make_shapes,
    render_scene,
)

COLOR_NAMES = list(COLORS)


def _scenes(n: int, size: int = 32, seed: int = 0, **kwargs) -> list[Scene]:
    rng = np.random.default_rng(seed)
    return [render_scene(rng, size, **kwargs) for _ in range(n)]


# --- constants -----------------------------------------------------------------------------------------
def test_vocabularies_match_the_spec():
    assert len(SHAPE_CLASSES) == len(set(SHAPE_CLASSES)) == 10
    assert SHAPE_CLASSES[:5] == ("circle", "square", "triangle", "ring", "star")
    assert COLORS["brown"] == (139, 69, 19) and COLORS["pink"] == (255, 192, 203)
    assert COLORS["green"] == (0, 128, 0) and COLORS["purple"] == (128, 0, 128)
    assert len(COLORS) == 11
    assert sorted(BACKGROUND_COLORS + FOREGROUND_COLORS) == sorted(COLORS)
    assert MATERIALS == ("flat", "noisy", "gradient", "striped")
    assert set(TEXTURES) == {"striped", "dotted", "chequered", "zigzagged", "banded", "grid", "spotted",
                             "crosshatched"}
    assert len(SCENES) == 16
    assert len({name for name, _, _ in SCENES}) == 16
    assert len({(top, bottom) for _, top, bottom in SCENES}) == 16
    for _, top, bottom in SCENES:
        assert top != bottom and top in BACKGROUND_COLORS and bottom in BACKGROUND_COLORS


# --- make_shapes ---------------------------------------------------------------------------------------
def test_make_shapes_shapes_dtypes_and_balance():
    images, labels = make_shapes(53, 32, seed=1)
    assert images.shape == (53, 32, 32, 3) and images.dtype == np.uint8
    assert labels.shape == (53,) and labels.dtype == np.int64
    counts = np.bincount(labels, minlength=10)
    assert counts.max() - counts.min() <= 1 and counts.sum() == 53
    assert not np.array_equal(labels, np.arange(53) % 10)  # shuffled
    assert images.std() > 20  # not blank


def test_make_shapes_is_deterministic_and_seed_dependent():
    a_img, a_lab = make_shapes(30, 32, seed=7)
    b_img, b_lab = make_shapes(30, 32, seed=7)
    assert a_img.tobytes() == b_img.tobytes() and np.array_equal(a_lab, b_lab)
    c_img, c_lab = make_shapes(30, 32, seed=8)
    assert not np.array_equal(a_img, c_img)
    assert not np.array_equal(a_lab, c_lab)


def test_make_shapes_leaves_global_rngs_alone():
    np.random.seed(123)
    expected = np.random.random()
    np.random.seed(123)
    make_shapes(5, 32, seed=0)
    assert np.random.random() == expected


@pytest.mark.parametrize("size", [64, 224])
def test_other_sizes_render(size):
    images, labels = make_shapes(2, size, seed=0)
    assert images.shape == (2, size, size, 3)
    scene = render_scene(np.random.default_rng(3), size)
    assert scene.image.shape == (size, size, 3) and scene.shape_mask.shape == (size, size)
    assert scene.shapes[0]["area"] > 0.005 * size**2


# --- render_scene: label maps --------------------------------------------------------------------------
def test_render_scene_is_deterministic():
    a, b = _scenes(3, 48, seed=11), _scenes(3, 48, seed=11)
    for x, y in zip(a, b, strict=True):
        for field in ("image", "shape_mask", "top_half", "rim", "color_map", "material_map"):
            assert np.array_equal(getattr(x, field), getattr(y, field)), field
        assert x.shapes == y.shapes and x.scene == y.scene and x.textures == y.textures


def test_map_dtypes_and_invariants():
    scenes = _scenes(40, 32, seed=2, texture_p=0.3)
    assert any(len(scene.shapes) == 3 for scene in scenes) and any(len(scene.shapes) == 1 for scene in scenes)
    for scene in scenes:
        s = scene.image.shape[0]
        assert scene.shape_mask.dtype == np.int16 and scene.material_map.dtype == np.int8
        assert scene.color_map.dtype == np.uint8 and scene.top_half.dtype == bool and scene.rim.dtype == bool
        for m in (scene.shape_mask, scene.top_half, scene.rim, scene.color_map, scene.material_map):
            assert m.shape == (s, s)
        on_shape = scene.shape_mask > 0
        assert np.array_equal(on_shape, scene.material_map >= 0)
        assert not (scene.rim & ~on_shape).any() and not (scene.top_half & ~on_shape).any()
        assert scene.shape_mask.max() <= len(scene.shapes) <= 3

        main = scene.shapes[0]
        assert main["class"] == SHAPE_CLASSES[scene.label] and main["label"] == scene.label
        assert 0.25 * s <= main["size"] <= 0.70 * s
        for k, shape in enumerate(scene.shapes):
            pixels = scene.shape_mask == k + 1
            assert shape["area"] == pixels.sum()
            assert shape["color"] in FOREGROUND_COLORS and shape["material"] in MATERIALS
            assert (scene.color_map[pixels] == COLOR_NAMES.index(shape["color"])).all()
            assert (scene.material_map[pixels] == MATERIALS.index(shape["material"])).all()
            if k > 0:  # distractors: other classes, smaller than the main shape
                assert shape["class"] != main["class"] and shape["size"] < main["size"]

        # Background pixels carry the scene's nominal colours: top colour in row 0, bottom in the last row.
        _, top, bottom = next(sc for sc in SCENES if sc[0] == scene.scene)
        bg = ~on_shape
        assert set(np.unique(scene.color_map[bg])) <= {COLOR_NAMES.index(top), COLOR_NAMES.index(bottom)}
        assert (scene.color_map[0][bg[0]] == COLOR_NAMES.index(top)).all()
        assert (scene.color_map[-1][bg[-1]] == COLOR_NAMES.index(bottom)).all()

        assert len(scene.textures) <= 2 and len(set(scene.textures)) == len(scene.textures)
        assert set(scene.textures) <= set(TEXTURES)


def test_parts_are_proper_parts():
    """Without distractors, the rim and top half are real, non-trivial parts of the main shape."""
    for scene in _scenes(20, 64, seed=4, distractors=False):
        shape = scene.shape_mask == 1
        area = shape.sum()
        assert 0.2 * area < scene.top_half.sum() < 0.8 * area
        assert 0 < scene.rim.sum() < area
        # The top half lies above the bottom half.
        assert np.where(scene.top_half)[0].mean() < np.where(shape & ~scene.top_half)[0].mean()
        # The rim includes the shape's outermost pixels (its bounding-box extremes).
        ys, xs = np.nonzero(shape)
        assert scene.rim[ys.min(), xs[ys == ys.min()]].all()


def test_ring_rim_is_the_outer_band():
    ring = SHAPE_CLASSES.index("ring")
    scene = render_scene(np.random.default_rng(0), 64, label=ring, distractors=False, size_range=(0.6, 0.7))
    (cx, cy), r = scene.shapes[0]["center"], scene.shapes[0]["size"] / 2
    ys, xs = np.nonzero(scene.shape_mask == 1)
    dist = np.hypot(xs + 0.5 - cx, ys + 0.5 - cy) / r
    assert dist.min() > 0.5  # the hole is empty
    assert scene.rim[ys, xs][dist > 0.95].all()  # the outer edge is rim ...
    assert not scene.rim[ys, xs][dist < 0.7].any()  # ... the inner edge is not


def test_nominal_colours_do_not_depend_on_noise_or_textures():
    a = render_scene(np.random.default_rng(5), 32, noise=0.0)
    b = render_scene(np.random.default_rng(5), 32, noise=25.0)
    for field in ("shape_mask", "top_half", "rim", "color_map", "material_map"):
        assert np.array_equal(getattr(a, field), getattr(b, field)), field
    assert not np.array_equal(a.image, b.image)

    # Without noise, untextured background and flat shapes show exactly their nominal colour.
    palette = np.array(list(COLORS.values()), dtype=np.uint8)
    checked = 0
    for scene in _scenes(30, 32, seed=6, noise=0.0):
        flat = np.isin(scene.material_map, [-1, MATERIALS.index("flat")])
        if scene.textures:
            flat &= scene.material_map >= 0
        assert np.array_equal(scene.image[flat], palette[scene.color_map[flat]])
        checked += flat.sum()
    assert checked > 0


def test_textures_are_painted_on_the_background_only():
    palette = np.array(list(COLORS.values()), dtype=np.uint8)
    textured = [s for s in _scenes(40, 32, seed=8, noise=0.0, texture_p=0.3) if s.textures]
    assert textured
    for scene in textured:
        changed = (scene.image != palette[scene.color_map]).any(axis=-1)
        assert changed[scene.shape_mask == 0].any()  # the overlay is visible on the background ...
        assert not changed[scene.material_map == MATERIALS.index("flat")].any()  # ... not on flat shapes


def test_texture_frequency():
    counts = np.zeros(len(TEXTURES))
    scenes = _scenes(400, 8, seed=9, distractors=False, noise=0.0)
    for scene in scenes:
        for name in scene.textures:
            counts[TEXTURES.index(name)] += 1
    rate = counts / len(scenes)
    assert 0.02 < rate.min() and rate.max() < 0.12  # p = 0.06 each
    assert any(len(s.textures) == 2 for s in scenes) and any(not s.textures for s in scenes)


def test_restricted_classes_for_the_broden_writer():
    objects = SHAPE_CLASSES[:5]
    for scene in _scenes(30, 32, seed=3, classes=objects):
        assert all(shape["class"] in objects for shape in scene.shapes)
    with pytest.raises(ValueError):
        render_scene(np.random.default_rng(0), 32, classes=["hexagram"])
    with pytest.raises(ValueError):  # the main class must be allowed
        render_scene(np.random.default_rng(0), 32, classes=objects, label=SHAPE_CLASSES.index("arrow"))


# --- classes -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("label", range(len(SHAPE_CLASSES)))
def test_every_class_renders_at_32px(label):
    rng = np.random.default_rng(label)
    for _ in range(5):
        scene = render_scene(rng, 32, label=label, distractors=False)
        assert scene.label == label
        assert scene.shapes[0]["area"] >= 12  # a visible shape, even at the smallest size


def _unit_mask(name: str, angle: float, n: int = 64) -> np.ndarray:
    c = (np.arange(n) + 0.5) / n * 2.2 - 1.1
    x, y = np.meshgrid(c, c)
    u, v = np.cos(angle) * x + np.sin(angle) * y, np.cos(angle) * y - np.sin(angle) * x
    return shapes._shape_sdf(name, u, v)[0] <= 0


def test_classes_are_distinct_under_rotation():
    """No class can be rotated onto another: best IoU over rotations stays well below 1."""
    angles = np.deg2rad(np.arange(0, 360, 7.5))
    masks = {name: [_unit_mask(name, a) for a in angles] for name in SHAPE_CLASSES}
    for i, a in enumerate(SHAPE_CLASSES):
        ref = masks[a][0]
        assert ref.sum() > 0.15 * ref.size
        for b in SHAPE_CLASSES[i + 1:]:
            best = max((ref & m).sum() / (ref | m).sum() for m in masks[b])
            assert best < 0.85, (a, b, best)


def _mask_features(mask: np.ndarray) -> np.ndarray:
    """Translation/rotation/scale-invariant descriptors of a binary mask."""
    ys, xs = np.nonzero(mask)
    cy, cx = ys.mean(), xs.mean()
    d = np.hypot(ys - cy, xs - cx)
    radius = d.max() + 0.5
    hist = np.histogram(d / radius, bins=8, range=(0, 1))[0] / len(d)
    cov = np.cov(np.stack([ys, xs])) + 1e-6 * np.eye(2)
    lo, hi = np.linalg.eigvalsh(cov)
    return np.concatenate([hist, [len(d) / (np.pi * radius**2), np.sqrt(1 - lo / hi), d.std() / radius]])


def test_rendered_classes_are_separable():
    """A nearest-centroid classifier on simple mask descriptors of the main shape beats chance by far."""
    from sklearn.neighbors import NearestCentroid
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    def data(seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(seed)
        scenes = [render_scene(rng, 48, label=i % 10) for i in range(n)]
        features = np.stack([_mask_features(s.shape_mask == 1) for s in scenes])
        return features, np.array([s.label for s in scenes])

    clf = make_pipeline(StandardScaler(), NearestCentroid()).fit(*data(0, 300))
    x_test, y_test = data(1, 200)
    assert clf.score(x_test, y_test) > 0.5  # chance is 0.1


def test_images_carry_the_class():
    """Image pixels alone (no label maps) separate the classes well above chance.

    The foreground is found as the pixels closest to a foreground nominal colour; the shape descriptors of
    its largest connected blob feed a nearest-centroid classifier.
    """
    from scipy import ndimage
    from sklearn.neighbors import NearestCentroid
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    palette = np.array(list(COLORS.values()), dtype=np.float32)
    fg = np.array([c in FOREGROUND_COLORS for c in COLORS])

    def features(images: np.ndarray) -> np.ndarray:
        d = ((images[..., None, :].astype(np.float32) - palette) ** 2).sum(-1)
        masks = fg[d.argmin(-1)]
        out = []
        for m in masks:
            blobs, n = ndimage.label(m)
            if n == 0:
                out.append(np.zeros(11))
                continue
            biggest = np.bincount(blobs.ravel())[1:].argmax() + 1
            out.append(_mask_features(blobs == biggest))
        return np.stack(out)

    x_train, y_train = make_shapes(400, 32, seed=0)
    x_test, y_test = make_shapes(200, 32, seed=1)
    clf = make_pipeline(StandardScaler(), NearestCentroid()).fit(features(x_train), y_train)
    assert clf.score(features(x_test), y_test) > 0.2  # chance is 0.1


# --- cache ---------------------------------------------------------------------------------------------
def test_cache_round_trip(tmp_path, monkeypatch):
    images, labels = load_or_make_shapes(tmp_path, "train", 20, 32, seed=3)
    path = tmp_path / "shapes" / f"train_32px_n20_seed3_v{GENERATOR_VERSION}.npz"
    assert path.is_file()
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temporary files left
    expected = make_shapes(20, 32, shapes._split_seed(3, "train"))
    assert np.array_equal(images, expected[0]) and np.array_equal(labels, expected[1])

    def fail(*args, **kwargs):
        raise AssertionError("regenerated instead of loading the cache")

    monkeypatch.setattr(shapes, "make_shapes", fail)
    again = load_or_make_shapes(tmp_path, "train", 20, 32, seed=3)
    assert np.array_equal(again[0], images) and np.array_equal(again[1], labels)
    assert again[0].dtype == np.uint8 and again[1].dtype == np.int64


def test_cache_write_is_atomic(tmp_path, monkeypatch):
    def broken_savez(file, **arrays):
        file.write(b"PK\x03\x04 partial")
        raise KeyboardInterrupt  # e.g. the job is killed mid-write

    monkeypatch.setattr(np, "savez", broken_savez)
    with pytest.raises(KeyboardInterrupt):
        load_or_make_shapes(tmp_path, "train", 10, 32, seed=0)
    assert list((tmp_path / "shapes").iterdir()) == []  # neither a partial cache nor a temporary file


def test_corrupt_cache_is_regenerated(tmp_path):
    path = tmp_path / "shapes" / f"val_32px_n10_seed0_v{GENERATOR_VERSION}.npz"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not an npz file")
    images, labels = load_or_make_shapes(tmp_path, "val", 10, 32, seed=0)
    assert images.shape == (10, 32, 32, 3)
    with np.load(path) as data:  # replaced by a valid file
        assert np.array_equal(data["images"], images) and np.array_equal(data["labels"], labels)


def test_splits_differ(tmp_path):
    train = load_or_make_shapes(tmp_path, "train", 20, 32, seed=0)[0]
    val = load_or_make_shapes(tmp_path, "val", 20, 32, seed=0)[0]
    test = load_or_make_shapes(tmp_path, "test", 20, 32, seed=0)[0]
    other_seed = load_or_make_shapes(tmp_path, "train", 20, 32, seed=1)[0]
    for a, b in [(train, val), (train, test), (val, test), (train, other_seed)]:
        assert not np.array_equal(a, b)
    assert len(list((tmp_path / "shapes").glob("*.npz"))) == 4
    with pytest.raises(ValueError):
        load_or_make_shapes(tmp_path, "../evil", 2, 32)
