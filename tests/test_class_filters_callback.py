"""The class-filters callback inside training and analyze.py: wiring, exact controls, fine-tuning, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from featurelens.analysis.base import Loaders
from featurelens.analysis.class_filters import ClassFilters, MaskedLinear
from featurelens.analyze import analyze
from featurelens.errors import ConfigError
from featurelens.results import read_results
from featurelens.train import train

# TINY's small CNN has a head over D = 8 features; k = D (the exact control) is scored without being in k_grid
CF = ["analysis=[chirality,class_filters]", "analysis.class_filters.k=3", "analysis.class_filters.k_grid=[1,3]",
      "analysis.class_filters.n_per_class=8", "analysis.class_filters.fractions=[0.5,0.7]"]


def _records(run: Path) -> list[dict]:
    return read_results(run / "analysis/class_filters/results.jsonl")


@pytest.fixture
def trained(cfg_factory) -> Path:
    cfg = cfg_factory(*CF, name="train")
    train(cfg)
    return Path(cfg.paths.output_dir)


def test_training_run_logs_every_epoch_with_exact_controls(trained):
    records = _records(trained)
    assert [r["epoch"] for r in records] == [0, 1, 2]
    p = "class_filters/"
    for r in records:
        assert r[p + "head"] == "classifier" and r[p + "dim"] == 8
        # k = D keeps every feature: the decomposed head is the full head
        assert r[p + "k8/acc_decomposed"] == r[p + "acc_full"]
        assert r[p + "selection"] == "8 per class" and r[p + "selection_images"] == sum(r[p + "n_images"]) == 80
        assert len(r[p + "sets"]) == 10 and all(len(s) == 3 == len(set(s)) for s in r[p + "sets"])
        assert r[p + "mac_reduction"] == pytest.approx(8 / 3)
        assert 0 <= r[p + "mi_excl_self"] <= r[p + "mi_incl_self"] + 1e-12
        assert r[p + "union"] <= 8
        assert r[p + "set_size_mean"] == r[p + "frac0.5/set_size_mean"]  # the fractional sets' mean size
    for r in records[1:]:
        # the callback scores the same weights on the same validation images as the module
        assert r[p + "acc_full"] == pytest.approx(r["val/acc"], abs=1e-6)
        assert 0 <= r[p + "stability"] <= 1
    out = trained / "analysis/class_filters"
    for name in ("table_epoch0.csv", "table_epoch2.csv", "sets_epoch2.json", "selection_mask.png",
                 "classes_per_feature.png", "acc_vs_k.png"):
        assert (out / name).is_file(), name
    assert json.loads((out / "sets_epoch2.json").read_text()) == records[-1][p + "sets"]


def test_analyze_checkpoint_reproduces_the_sets_and_fine_tunes(trained, cfg_factory):
    cfg = cfg_factory(f"ckpt_path={trained}/checkpoints/last.ckpt", "logger=none", "analysis=class_filters",
                      *CF[1:], "analysis.class_filters.finetune.enabled=true",
                      "analysis.class_filters.finetune.epochs=2",
                      name="an", config_name="analyze")
    record = analyze(cfg)["class_filters"]
    last = _records(trained)[-1]
    assert record["class_filters/sets"] == last["class_filters/sets"]
    assert record["class_filters/acc_decomposed"] == last["class_filters/acc_decomposed"]
    ft = json.loads((Path(cfg.paths.output_dir) / "analysis/class_filters/finetune.json").read_text())
    assert len(ft["val_acc_per_epoch"]) == 2 and all(0 <= a <= 1 for a in ft["val_acc_per_epoch"])


def test_recomputed_fractional_pass_equals_the_cached_one(trained, cfg_factory):
    cfg = cfg_factory(f"ckpt_path={trained}/checkpoints/last.ckpt", "logger=none", "analysis=class_filters",
                      *CF[1:], "analysis.class_filters.cache_mb=0", name="nocache", config_name="analyze")
    record = analyze(cfg)["class_filters"]
    last = _records(trained)[-1]
    for key in ("class_filters/frac0.5/acc_decomposed", "class_filters/frac0.7/set_size_mean",
                "class_filters/sets", "class_filters/acc_full"):
        assert record[key] == last[key], key


def test_model_without_a_linear_head_is_a_clear_error():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with pytest.raises(ConfigError, match="Sequential"):
        ClassFilters().run(net, Loaders([]))


def test_masked_head_keeps_unselected_weights_out(tmp_path):
    head = nn.Linear(4, 2)
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 0]], dtype=torch.bool)
    masked = MaskedLinear(head, mask)
    x = torch.randn(5, 4)
    expected = torch.nn.functional.linear(x, head.weight * mask, head.bias)
    assert torch.allclose(masked(x), expected)
    masked(x).sum().backward()
    assert (masked.weight.grad[~mask] == 0).all()  # unselected weights never receive a gradient


@pytest.mark.parametrize("override", ["analysis.class_filters.k=0", "analysis.class_filters.fractions=[1.5]",
                                      "analysis.class_filters.n_per_class=0"])
def test_bad_class_filter_values_are_rejected(cfg_factory, override):
    from featurelens.runtime import instantiate_all

    cfg = cfg_factory("analysis=class_filters", override, base=[])
    with pytest.raises(ConfigError, match=override.split("=")[0].split(".")[-1]):
        instantiate_all(cfg.analysis)
