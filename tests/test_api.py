"""featurelens as a library: a registered analysis on a plain nn.Module and plain batches, without Hydra or
Lightning; the README's example runs as written."""

from __future__ import annotations

import dataclasses
import re
import typing

import pytest
import torch
from conftest import ROOT
from torch import nn

import featurelens
import featurelens.analysis.chirality
from featurelens.analysis.base import Analysis, Loaders, Result
from featurelens.analysis.chirality import ChiralityResult
from featurelens.analysis.class_filters import ClassFiltersResult
from featurelens.analysis.dissection import DissectionResult
from featurelens.analysis.specialization import SpecializationResult
from featurelens.api import REGISTRY
from featurelens.data import ImageDataModule
from featurelens.data.synthbroden import write_synthbroden
from featurelens.errors import ConfigError
from featurelens.models import build_model

C, D = 4, 8


def _planted(n_per_class: int = 6, seed: int = 0):
    """Features a (B, D) where class c carries its mass on features 2c and 2c+1, and a head that reads exactly
    those: every S_c at k = 2 is {2c, 2c+1}, and the full and decomposed heads are right on every image."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(C).repeat(n_per_class)
    a = 0.05 * torch.rand(len(y), D, generator=gen)
    a[torch.arange(len(y)), 2 * y] += 1.0
    a[torch.arange(len(y)), 2 * y + 1] += 0.5 + 0.1 * torch.rand(len(y), generator=gen)
    head = nn.Linear(D, C)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.weight[torch.arange(C), 2 * torch.arange(C)] = 1.0
        head.weight[torch.arange(C), 2 * torch.arange(C) + 1] = 1.0
    model = nn.Sequential(nn.Identity(), head)
    return model, [(a[i:i + 5], y[i:i + 5]) for i in range(0, len(y), 5)]


def test_class_filters_on_a_plain_module_finds_the_planted_sets(tmp_path):
    model, batches = _planted()
    model.train()
    rng = torch.get_rng_state()
    result = featurelens.run("class_filters", model, train=batches, k=2, k_grid=[1, 2], out_dir=tmp_path)
    assert isinstance(result, ClassFiltersResult)
    assert result.sets == [[2 * c, 2 * c + 1] for c in range(C)]
    assert result.mask.sum().item() == 2 * C
    v = result.values
    assert v["acc_full"] == v["acc_decomposed"] == v[f"k{D}/acc_decomposed"] == 1.0
    assert v["noise/acc_at_S"] < 1.0  # the sets are what the head needs
    assert v["selection_images"] == 24 and v["n_images"] == [6] * C
    assert model.training and torch.equal(torch.get_rng_state(), rng)  # the model and the RNG as they were
    frame = result.to_frame()
    assert list(frame["class"]) == list(range(C)) and list(frame["S_c"]) == ["0 1", "2 3", "4 5", "6 7"]
    assert (tmp_path / "table_epoch0.csv").is_file() and (tmp_path / "selection_mask.png").is_file()


@pytest.mark.parametrize("anti", [False, True])
def test_chirality_of_mirror_symmetric_and_antisymmetric_kernels(tmp_path, anti):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, C))
    with torch.no_grad():
        featurelens.analysis.chirality.symmetrize_(model, anti=anti)
    images = [(torch.randn(10, 3, 12, 12), torch.arange(10) % C) for _ in range(2)]
    result = featurelens.run("chirality", model, train=images, fmap={"n_probe": 12}, out_dir=tmp_path)
    assert isinstance(result, ChiralityResult) and result.layers == ["0", "2"]
    assert result.values["model"] == pytest.approx(1.0 if anti else 0.0, abs=1e-12)  # spec: C = 0 / 1 exactly
    if not anti:  # a mirror-symmetric net maps a mirrored input to a mirrored output
        assert result.values["flip_consistency"] == pytest.approx(1.0, abs=1e-6)
    assert list(result.to_frame()["layer"]) == ["0", "2"]
    for name in ("table_epoch0.csv", "chirality_vs_epoch.png", "conv1_by_rho.png"):
        assert (tmp_path / name).is_file(), name


def test_dissection_of_a_broden_directory_finds_the_planted_colour_units(tmp_path):
    """Spec §6 oracle through the API: a unit per foreground colour, firing within a tolerance of it."""
    from featurelens.data.shapes import COLORS, FOREGROUND_COLORS

    root = write_synthbroden(tmp_path / "broden", n_images=16, size=64, seed=0)
    colours = torch.tensor([COLORS[c] for c in FOREGROUND_COLORS], dtype=torch.float32) / 255

    class ColourUnits(nn.Module):
        def forward(self, x):  # unit j = relu(tol^2 - |x - c_j|^2), tol = 0.15, on the raw [0, 1] image
            return torch.relu(0.15**2 - ((x[:, None] - colours[None, :, :, None, None]) ** 2).sum(dim=2))

    model = nn.Sequential(ColourUnits())
    result = featurelens.run("dissection", model, broden=root, layers=["0"], mean=[0, 0, 0], std=[1, 1, 1],
                             quantile={"q": 0.02}, batch_size=8, out_dir=tmp_path / "out")
    assert isinstance(result, DissectionResult) and list(result.layers) == ["0"]
    labels, names = result.layers["0"]["labels"], result.label_names
    k = result.layers["0"]["counts_json"]["categories"].index("color")
    assert [names[int(c)] for c in labels["label_percat"][:, k]] == [f"{c}-c" for c in FOREGROUND_COLORS]
    assert len(result.to_frame()) == len(FOREGROUND_COLORS)
    for name in ("0/tally.csv", "0/counts.json", "0/score_hist.png", "unique_vs_epoch.png"):
        assert (tmp_path / "out" / name).is_file(), name


def test_specialization_of_two_disconnected_halves_finds_them():
    """The weight graph of an MLP made of two disconnected halves: k = 2 clusters are the halves, n-cut 0."""
    from featurelens.models.builders import MLP

    torch.manual_seed(0)
    model = MLP(8, [8, 8], num_classes=4)
    with torch.no_grad():
        for layer in (model.features[1], model.features[3], model.classifier):
            out_half, in_half = layer.out_features // 2, layer.in_features // 2
            layer.weight[:out_half, in_half:] = 0
            layer.weight[out_half:, :in_half] = 0
    result = featurelens.run("specialization", model, train=[], parts=["weights"], k=2, n_shuffles=3)
    assert isinstance(result, SpecializationResult)
    assert result.values["weights/ncut"] == pytest.approx(0.0, abs=1e-9)
    labels = result.details["labels"]["weights"]  # only the cut between the halves costs nothing
    assert set(labels.tolist()) == {0, 1} and result.values["weights/n_isolated"] == 0
    with pytest.raises(ConfigError, match="give data= a featurelens ImageDataModule"):
        featurelens.run("specialization", model, train=[], parts=["weights", "activations"], k=2)


def test_n_per_class_keeps_the_first_images_of_each_class():
    model, batches = _planted(n_per_class=6)
    result = featurelens.run("class_filters", model, train=batches, val=batches, n_per_class=2, k=2)
    assert result.values["n_images"] == [2] * C and result.values["selection_images"] == 2 * C
    assert result.values["acc_full"] == 1.0  # scored on every image of val


def test_a_data_module_and_its_plain_loaders_give_the_same_result():
    dm = ImageDataModule("shapes", n_train=60, n_val=30, n_test=10, image_size=16, batch_size=16)
    dm.prepare_data()
    dm.setup("fit")
    torch.manual_seed(0)
    model = build_model("small_cnn", 10, 3, channels=[4, 8])
    params = {"k": 3, "k_grid": [1, 3], "n_per_class": None}
    direct = featurelens.run("class_filters", model, data=dm, **params)
    plain = featurelens.run("class_filters", model, train=dm.batches("train"), val=dm.batches("val"), **params)
    for key, value in direct.values.items():
        assert plain.values[key] == value, key


def test_api_errors_name_the_problem():
    model, batches = _planted()
    with pytest.raises(ConfigError, match=r"not registered; valid: \['chirality', .*'specialization'\]"):
        featurelens.run("nope", model, train=batches)
    with pytest.raises(ConfigError, match="give train="):
        featurelens.run("class_filters", model)
    with pytest.raises(ConfigError, match="give data= a featurelens ImageDataModule"):
        featurelens.run("linking", model, train=batches)  # its generator is found (or trained) for the data config
    with pytest.raises(ConfigError, match="n_per_class=0"):
        featurelens.run("class_filters", model, train=batches, n_per_class=0)
    with pytest.raises(ValueError, match="split='test'"):
        next(iter(Loaders(batches).batches("test")))


def test_the_readme_example_runs(tmp_path, monkeypatch):
    text = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- api-example -->\n```python\n(.*?)```", text, re.S)
    assert block, "README: the Python API example (after <!-- api-example -->) is missing"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block.group(1), "README.md", "exec"), namespace)
    assert isinstance(namespace["result"], ClassFiltersResult) and isinstance(namespace["chirality"], ChiralityResult)
    assert (tmp_path / "cf_out" / "acc_vs_k.png").is_file()


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_registered_analysis_is_complete(name):
    """What CONTRIBUTING.md asks of an analysis: a config with defaults, its own report and sweep tables, a
    typed result of its name, and a README section listing its config keys."""
    cls = REGISTRY[name]
    assert dataclasses.is_dataclass(cls.Config)
    config = cls.Config()  # every field has a default
    assert cls(config).config is config
    assert cls.report is not Analysis.report and cls.run is not Analysis.run and cls.tables is not Analysis.tables
    result_type = typing.get_type_hints(cls.run)["return"]
    assert issubclass(result_type, Result) and result_type.name == name
    assert set(cls.headline) and all(isinstance(k, str) for k in cls.headline)
    assert f"`analysis.{name}.*`" in (ROOT / "README.md").read_text()
