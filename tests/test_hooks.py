"""Recorded activations never alias a tensor a later in-place module rewrites (issue 11, item 1).

Each analysis that records activations runs on a model with ``nn.ReLU(inplace=True)`` right after the recorded
layer and on its twin with out-of-place ReLUs: the results must be identical, and they must be the pre-ReLU
values (negative entries present).
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from featurelens.analysis import chirality, dissection
from featurelens.analysis import specialization as spec
from featurelens.analysis.class_filters import ClassFilters
from featurelens.analysis.hooks import (
    eval_mode,
    onednn_forward,
    outputs_of,
    record_outputs,
    recorded,
    run_forward,
)
from featurelens.models.builders import MLP, SmallCNN


def _out_of_place_twin(model: nn.Module) -> nn.Module:
    twin = copy.deepcopy(model)
    for m in twin.modules():
        if getattr(m, "inplace", False):
            m.inplace = False
    return twin


def _has_inplace_relu(model: nn.Module) -> bool:
    return any(isinstance(m, nn.ReLU) and m.inplace for m in model.modules())


def test_recorded_copies_only_what_would_alias():
    t = torch.randn(4, 3, 2, 2)
    same = recorded(t)
    assert torch.equal(same, t) and same.data_ptr() != t.data_ptr()
    assert recorded((t, "extra"), lambda z: z.float()).data_ptr() != t.data_ptr()  # .float() is a no-op here
    mean = recorded(t, lambda z: z.mean((2, 3)))
    assert torch.allclose(mean, t.mean((2, 3)))
    with record_outputs({"lin": (lin := nn.Linear(3, 5))}) as out:
        y = nn.Sequential(lin, nn.ReLU(inplace=True))(torch.randn(8, 3))
    assert (out["lin"] < 0).any() and (y >= 0).all()
    assert not lin._forward_hooks  # removed on exit


def test_activation_graph_of_an_mlp_with_inplace_relu_holds_pre_relu_values():
    torch.manual_seed(0)
    mlp = MLP(20, [16, 16], num_classes=4).eval()
    assert _has_inplace_relu(mlp)
    data = [torch.randn(64, 20) for _ in range(2)]
    got = spec.activation_graph(mlp, data, max_samples=128)
    want = spec.activation_graph(_out_of_place_twin(mlp), data, max_samples=128)
    assert (got.samples < 0).mean() > 0.2  # pre-ReLU: about half negative, none clipped to 0
    np.testing.assert_array_equal(got.samples, want.samples)
    np.testing.assert_array_equal(got.adjacency, want.adjacency)
    with torch.no_grad():
        np.testing.assert_allclose(got.samples[:64, :16], mlp.features[1](data[0]).numpy(), rtol=1e-6)


def test_dissection_of_a_conv_followed_by_inplace_relu_thresholds_the_raw_maps():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(4, 2, 1)).eval()
    images = torch.randn(6, 3, 8, 8)
    raw = net[0](images).detach()
    for model in (net, _out_of_place_twin(net)):
        masks = dissection.unit_masks(model, model[0], images, unit=1, threshold=0.0, mask_size=(8, 8))
        assert torch.equal(masks, raw[:, 1] > 0)
    # threshold below 0 keeps the negative pre-ReLU values apart from the zeros a rewritten record would hold
    t = float(raw[:, 1].quantile(0.25))
    assert t < 0
    masks = dissection.unit_masks(net, net[0], images, unit=1, threshold=t, mask_size=(8, 8))
    assert torch.equal(masks, raw[:, 1] > t)


def test_class_filter_layer_features_are_pre_relu_means():
    torch.manual_seed(0)
    net = SmallCNN(3, [4, 6], num_classes=3, batch_norm=False).eval()
    batches = [(torch.randn(5, 3, 8, 8), torch.tensor([0, 1, 2, 0, 1]))]
    analysis = ClassFilters(psi_layers=["features.0"])
    results = []
    for model in (net, _out_of_place_twin(net)):
        modules = {"__head__": model.classifier, "features.0": model.features[0]}
        with torch.no_grad():
            results.append([p["features.0"] for _, p, _ in analysis._batches(model, batches, modules, "cpu")])
    with torch.no_grad():
        want = net.features[0](batches[0][0]).mean((2, 3))
    assert (want < 0).any()
    torch.testing.assert_close(results[0][0], want)
    torch.testing.assert_close(results[1][0], want)


def test_feature_map_chirality_is_unchanged_by_an_inplace_relu_after_a_stage():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(inplace=True), nn.Flatten(), nn.LazyLinear(3))
    x = torch.randn(8, 3, 6, 6)
    net(x)
    twin = _out_of_place_twin(net)
    got = chirality.fmap_chirality(net, x, stages={"conv": net[0]})
    want = chirality.fmap_chirality(twin, x, stages={"conv": twin[0]})
    assert got.keys() == want.keys() and "fmap/conv" in got
    for k in got:
        assert got[k] == want[k], k


def _mixed_mode_cnn() -> nn.Module:
    """A training model whose first BN the user froze in eval mode."""
    torch.manual_seed(0)
    net = SmallCNN(3, [4, 6], num_classes=3).train()
    net.features[1].eval()
    return net


def _flags(model: nn.Module) -> list[bool]:
    return [m.training for m in model.modules()]


def test_eval_mode_restores_every_modules_own_flag_also_on_error():
    net = _mixed_mode_cnn()
    before = _flags(net)
    assert True in before and False in before
    try:
        with eval_mode(net):
            assert not any(_flags(net))
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert _flags(net) == before


def test_every_analysis_leaves_a_frozen_bn_frozen():
    from featurelens.analysis import importance, linking

    x, y = torch.randn(6, 3, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2])
    runs = {
        "activation_graph": lambda m: spec.activation_graph(m, [(x, y)], max_samples=6),
        "lesion_test": lambda m: importance.lesion_test(m, [(x, y)], "features.1", [torch.tensor([0, 1])], 3),
        "lesion_test_naive": lambda m: importance.lesion_test_naive(m, [(x, y)], "features.1", [torch.tensor([0])], 3),
        "linking_features": lambda m: linking.FeatureExtractor(m, "classifier")(x),
        "unit_masks": lambda m: dissection.unit_masks(m, m.features[0], x, 0, 0.0, (8, 8)),
        "fmap_chirality": lambda m: chirality.fmap_chirality(m, x),
    }
    for name, run in runs.items():
        net = _mixed_mode_cnn()
        before = _flags(net)
        run(net)
        assert _flags(net) == before, name


def test_a_stopping_recording_ends_the_forward_once_every_module_is_recorded():
    class Boom(nn.Module):
        def forward(self, x):
            raise AssertionError("the layers above the recorded ones must not run")

    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(inplace=True), nn.Linear(4, 2), Boom())
    x = torch.randn(5, 3)
    with record_outputs({"a": net[0], "b": net[2], "again": net[2]}, {"a": lambda z: z.sum(1)}, stop=True) as out:
        run_forward(net, x)
    with torch.no_grad():
        torch.testing.assert_close(out["a"], net[0](x).sum(1))  # reduced per name
        torch.testing.assert_close(out["b"], net[2](torch.relu(net[0](x))))
    assert torch.equal(out["again"], out["b"]) and not net[2]._forward_hooks


def test_onednn_forward_is_used_only_where_it_gives_the_plain_outputs():
    """A conv/BN/ReLU/pool stack (BN with trained-like statistics) on oneDNN tensors records bitwise the plain
    values (dense copies); torch's own oneDNN batch norm would not; a model with an op that has no oneDNN kernel
    (slicing) before the recorded layer, or in float64, keeps the plain forward; every BN gets its own forward
    back; ``record`` works from several threads at once, each getting its own outputs."""
    from concurrent.futures import ThreadPoolExecutor

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True), nn.MaxPool2d(2),
                        nn.Conv2d(8, 4, 3, padding=1), nn.ReLU(inplace=True)).eval()
    net[1].running_mean.uniform_(-1, 1)
    net[1].running_var.uniform_(0.5, 2)
    net[1].weight.data.uniform_(0.5, 1.5)
    x = torch.randn(8, 3, 16, 16)

    class Sliced(nn.Module):
        def forward(self, t):
            return net(t[:, :3])

    with outputs_of({"conv": net[4]}) as record:
        plain = record(net, x)["conv"]
        assert not torch.equal(record(net, x.to_mkldnn())["conv"], plain)  # torch's oneDNN batch norm
        with onednn_forward(net, record, x) as (exact, outputs):
            assert exact and "forward" in vars(net[1]) and torch.equal(outputs["conv"], plain)
            fast = record(net, x.to_mkldnn())["conv"]
            with ThreadPoolExecutor(4) as pool:
                outs = list(pool.map(lambda i: record(net, x[i:i + 1].to_mkldnn())["conv"], range(8)))
        assert "forward" not in vars(net[1])
        assert not fast.is_mkldnn and torch.equal(fast, plain)
        assert (fast < 0).any()  # pre-ReLU: a copy, not the tensor the in-place ReLU rewrote
        torch.testing.assert_close(torch.cat(outs), fast)
        with onednn_forward(net, record, x, concurrent=True) as (exact, outputs):  # both forwards at once
            assert exact and torch.equal(outputs["conv"], plain)
        with onednn_forward(Sliced(), record, x, concurrent=True) as (exact, outputs):
            assert not exact and torch.equal(outputs["conv"], plain)
        with onednn_forward(Sliced(), record, x) as (exact, outputs):
            assert not exact and torch.equal(outputs["conv"], plain)
    double = copy.deepcopy(net).double()
    with outputs_of({"conv": double[4]}) as record, onednn_forward(double, record, x.double()) as (exact, _):
        assert not exact
