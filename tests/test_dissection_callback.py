"""The dissection callback in training and in analyze.py (spec dissection.md §3.2, §5)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY, wandb_media

from featurelens.analysis.dissection import DissectionConfig
from featurelens.analyze import analyze
from featurelens.data.synthbroden import write_synthbroden
from featurelens.errors import ConfigError
from featurelens.results import read_results
from featurelens.train import train

DISSECT = ["analysis=[dissection]", "analysis.dissection.synthbroden.n_images=40",
           "analysis.dissection.batch_size=16", "analysis.dissection.quantile.q=0.02"]
CATS = ("object", "part", "scene", "material", "texture", "color")


def test_training_run_dissects_every_epoch(cfg_factory):
    base = [o for o in TINY if not o.startswith("analysis.")]
    cfg = cfg_factory(*DISSECT, name="train", base=base)
    train(cfg)
    run = Path(cfg.paths.output_dir)
    out = run / "analysis/dissection"
    records = read_results(out / "results.jsonl")
    assert [r["epoch"] for r in records] == [0, 1, 2]
    layer = "features.5"  # the small CNN [4, 8]: last ReLU of `features`
    for r in records:
        p = "dissection/"
        assert r[p + "unique_detectors_percat"] >= r[p + "unique_detectors"] >= 0
        assert r[p + "detectors"] <= 8
        assert sum(r[f"{p}unique/{c}"] for c in CATS) == r[p + "unique_detectors_percat"]
        assert r[p + "unique_detectors"] == r[f"{p}{layer}/unique_detectors"]
        assert 0 < r[p + "frac_active"] < 0.2 and 0 <= r[p + "median_score"] <= r[p + "mean_score"] * 10
        assert 0 < r[p + "frac_active_raw"] <= 0.021  # q = 0.02 (+ one value); fewer where ReLU zeros tie at T_k
        assert r[f"{p}{layer}/quantile_method"] == "exact_topk"
    files = out / layer
    thresholds, ious = np.load(files / "thresholds.npy"), np.load(files / "iou.npy")
    assert thresholds.shape == (8,) and ious.dtype == np.float32 and ious.shape[0] == 8
    tally = (files / "tally.csv").read_text().splitlines()
    assert tally[0].startswith("unit,category,label,score,object-label,object-truth") and len(tally) == 9
    counts = json.loads((files / "counts.json").read_text())
    assert counts["epoch"] == 2 and counts["unique_A"] == records[-1]["dissection/unique_detectors"]
    assert set(counts["unique_B_percat"]) == set(CATS) and counts["header"].endswith("with IoU > 0.04")
    assert (files / "detectors_per_label.png").exists() and (files / "score_hist.png").exists()
    strips = sorted((files / "topimages").glob("unit_*.jpg"))
    assert 1 <= len(strips) <= 8
    from PIL import Image

    caption = np.asarray(Image.open(strips[0]).convert("L"))[:16]  # the band above the images holds the text
    assert (caption < 100).sum() > 20 and (caption > 200).mean() > 0.5
    # every figure is kept per epoch beside the latest copy
    assert {"detectors_per_label_epoch0.png", "detectors_per_label_epoch2.png"} <= {p.name for p in files.iterdir()}
    assert (out / "unique_vs_epoch.png").exists()
    # the procedural set was written once, under the data dir, at the model's input size
    assert len(list((Path(cfg.paths.data_dir) / "synthbroden").glob("n40_s16_*"))) == 1

    # analyze.py on the last checkpoint with the same concept set reproduces the last epoch exactly,
    # and adds the baselines (alpha = 0 is the unrotated result)
    acfg = cfg_factory("logger=none", *DISSECT, f"ckpt_path={run}/checkpoints/last.ckpt",
                       "analysis.dissection.rotation.enabled=true", "analysis.dissection.rotation.seeds=2",
                       "analysis.dissection.rotation.alphas=[0.0,1.0]", "analysis.dissection.random_init.enabled=true",
                       name="analyze", config_name="analyze")
    rec = analyze(acfg)["dissection"]
    for key in ("unique_detectors", "unique_detectors_percat", "detectors", "mean_score", "threshold_mean"):
        assert rec[f"dissection/{key}"] == records[-1][f"dissection/{key}"], key
    assert rec["dissection/rotation/alpha_0/unique_detectors"] == rec["dissection/unique_detectors"]
    assert "dissection/rotation/alpha_1/unique_detectors" in rec
    assert "dissection/random_init/unique_detectors" in rec
    aout = Path(acfg.paths.output_dir) / "analysis/dissection"
    assert (aout / "rotation.csv").exists() and (aout / "unique_vs_alpha.png").exists()


def test_analyze_reads_a_broden_directory(cfg_factory, tmp_path):
    root = write_synthbroden(tmp_path / "broden", n_images=24, size=32, seed=3)
    cfg = cfg_factory("logger=none", "model=small_cnn", "model.channels=[4,8]", "data=shapes", "data.n_train=64",
                      "data.n_val=32", "data.n_test=32", "analysis=dissection",
                      f"analysis.dissection.broden_dir={root}",
                      "analysis.dissection.layers=[features.2,features.5]", "analysis.dissection.denominator=lite",
                      name="broden", config_name="analyze")
    rec = analyze(cfg)["dissection"]
    out = Path(cfg.paths.output_dir) / "analysis/dissection"
    for layer, units in (("features.2", 4), ("features.5", 8)):
        assert np.load(out / layer / "thresholds.npy").shape == (units,)
        assert f"dissection/{layer}/unique_detectors" in rec
    assert rec["dissection/unique_detectors"] == rec["dissection/features.2/unique_detectors"]  # first = primary
    assert json.loads((out / "features.5/counts.json").read_text())["denominator"] == "lite"


@pytest.mark.parametrize("kwargs", [
    {"denominator": "median"}, {"upsample": "receptive_field"}, {"quantile": {"method": "kll"}},
    {"quantile": {"q": 1.5}}, {"categories": ["object", "smell"]}, {"synthbroden": {"size": 5}},
    {"rotation": {"alphas": [0.0, 2.0]}}, {"layers": "layer4"}, {"split": "test"}, {"batch_size": 0},
])
def test_bad_values_name_the_key(kwargs):
    with pytest.raises(ConfigError) as err:
        DissectionConfig(**kwargs)
    assert str(err.value).startswith("analysis.dissection: ")
    assert next(iter(kwargs)) in str(err.value)


def test_missing_broden_dir_and_unknown_layer_are_config_errors(cfg_factory, tmp_path):
    cfg = cfg_factory("logger=none", "model=small_cnn", "model.channels=[4,8]", "data=shapes", "data.n_train=64",
                      "data.n_val=32", "data.n_test=32", "analysis=dissection",
                      f"analysis.dissection.broden_dir={tmp_path}/nowhere", name="missing", config_name="analyze")
    with pytest.raises(ConfigError, match="broden_dir=.*does not exist"):
        analyze(cfg)
    cfg = cfg_factory("logger=none", "model=small_cnn", "model.channels=[4,8]", "data=shapes", "data.n_train=64",
                      "data.n_val=32", "data.n_test=32", *DISSECT[1:], "analysis=dissection",
                      "analysis.dissection.layers=[features.99]", name="layer", config_name="analyze")
    with pytest.raises(ConfigError, match="features.99"):
        analyze(cfg)


def test_default_layers():
    from featurelens.analysis.dissection import default_layer
    from featurelens.models import build_model

    assert default_layer(build_model("resnet18", 10)) == "layer4"
    assert default_layer(build_model("vgg16", 10)) == "features.29"  # conv5_3 + ReLU
    assert default_layer(build_model("alexnet", 10)) == "features.11"  # conv5 + ReLU
    assert default_layer(build_model("small_cnn", 10, channels=[4, 8])) == "features.5"
    # an MLP's hidden units are dissected as 1x1 maps (each unit is on or off for the whole image)
    assert default_layer(build_model("mlp", 10, 3, image_size=8, hidden=[16])) == "features.2"
    with pytest.raises(ValueError, match="no conv layer"):
        default_layer(torch.nn.Sequential(torch.nn.Linear(3, 3)))


def test_tables_and_figures_reach_an_offline_wandb_run(cfg_factory, offline_wandb):
    base = [o for o in TINY if not o.startswith(("analysis.", "logger"))]
    media = wandb_media(offline_wandb(cfg_factory(*DISSECT, "logger=wandb", "trainer.max_epochs=1", name="wb",
                                                  base=base)))
    # tally.csv as a table; the bar chart, score histogram, unique-vs-epoch figure and the top-image strips
    assert {"tally", "detectors", "score", "unique", "topimages"} <= media, media
