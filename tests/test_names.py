"""Layer and class names as papers and datasets write them, in the figures and tables (issue 14 item 4)."""

from __future__ import annotations

import torch
import torchvision
from torch import nn

import featurelens
from featurelens.analysis.base import Loaders
from featurelens.data import ImageDataModule
from featurelens.data.shapes import SHAPE_CLASSES
from featurelens.models import display_name, paper_layer_names


def test_vgg_and_alexnet_layers_are_numbered_as_their_papers_do_and_resnet_paths_are_kept():
    vgg = paper_layer_names(torchvision.models.vgg16())  # 13 convs, then 3 fully connected: 16 weight layers
    convs = [p for p, m in torchvision.models.vgg16().named_modules() if isinstance(m, nn.Conv2d)]
    assert [vgg[p] for p in convs] == [f"conv{i}" for i in range(1, 14)]
    assert (vgg["classifier.0"], vgg["classifier.3"], vgg["classifier.6"]) == ("fc14", "fc15", "fc16")
    assert vgg["features.29"] == "conv13" and vgg["features.30"] == "pool5"  # conv13's ReLU, the last pool
    assert display_name("features.28", vgg) == "conv13 (features.28)"
    alex = paper_layer_names(torchvision.models.alexnet())
    assert [alex[p] for p in ("features.0", "features.10", "classifier.1", "classifier.4", "classifier.6")] == [
        "conv1", "conv5", "fc6", "fc7", "fc8"]
    resnet = paper_layer_names(torchvision.models.resnet18())
    assert all(name == path for path, name in resnet.items())
    assert display_name("layer1.0.conv1", resnet) == "layer1.0.conv1"


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                      nn.Flatten())
        self.classifier = nn.Linear(6, 3)

    def forward(self, x):
        return self.classifier(self.features(x))


def test_chirality_tables_and_figures_name_layers_as_papers_do(tmp_path):
    torch.manual_seed(0)
    images = [(torch.randn(6, 3, 8, 8), torch.arange(6) % 3)]
    result = featurelens.run("chirality", _Net(), train=images, fmap={"n_probe": 6}, out_dir=tmp_path)
    assert result.layers == ["features.0", "features.3"]  # the results keep module paths
    frame = result.to_frame()
    assert list(frame["name"]) == ["conv1 (features.0)", "conv2 (features.3)"]
    assert list(frame["layer"]) == ["features.0", "features.3"]


def test_class_names_come_from_the_data_and_reach_the_class_filter_table(tmp_path):
    dm = ImageDataModule("shapes", root=str(tmp_path / "data"), image_size=16, n_train=40, n_val=20, n_test=20)
    assert dm.class_names == list(SHAPE_CLASSES)
    assert ImageDataModule("digits", num_classes=10).class_names == [str(i) for i in range(10)]
    torch.manual_seed(0)
    features = torch.randn(30, 4)
    labels = torch.arange(30) % 3
    model = nn.Sequential(nn.Identity(), nn.Linear(4, 3))
    data = Loaders([(features, labels)], class_names=["cat", "dog", "owl"])
    result = featurelens.run("class_filters", model, data, k=2, k_grid=[1, 2], out_dir=tmp_path / "cf")
    assert list(result.to_frame()["class_name"]) == ["cat", "dog", "owl"]
    without = featurelens.run("class_filters", model, train=[(features, labels)], k=2, k_grid=[1, 2])
    assert list(without.to_frame()["class_name"]) == ["0", "1", "2"]
