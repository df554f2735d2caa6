"""Oracles for ``featurelens.analysis.chirality`` (spec ``/work/shared/spec/chirality.md`` §5).

No downloads: every torchvision model is built with ``weights=None``.  The big constructors (AlexNet,
VGG-16, ResNet-50) are built once per module; tests that need other weights either reset the conv weights
(init sweep) or work on a copy.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torchvision
from torch import nn

from featurelens.analysis import chirality as ch

torch.set_num_threads(2)

TOL = 1e-12


def _k(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def _convs(model: nn.Module) -> list[nn.Conv2d]:
    return [m for m in model.modules() if isinstance(m, nn.Conv2d)]


def _sd_c(kh: int, kw: int) -> float:
    """Exact sd of per-slice c under a Gaussian init: E[c^2] = floor(kw/2)/kw (spec §5.3)."""
    return math.sqrt((kw // 2) / kw - ch.c0_gaussian(kh, kw) ** 2)


# --------------------------------------------------------------------------------------------------------
# Module-scoped models (constructing VGG-16 takes ~2 s on 2 cores)
# --------------------------------------------------------------------------------------------------------
class _Zoo:
    """Lazily built models plus a copy of their default (torchvision) conv weights."""

    def __init__(self) -> None:
        self._models: dict[str, nn.Module] = {}
        self._defaults: dict[str, list[torch.Tensor]] = {}

    def get(self, name: str) -> nn.Module:
        if name not in self._models:
            torch.manual_seed(0)
            model = getattr(torchvision.models, name)(weights=None, num_classes=10)
            self._models[name] = model
            self._defaults[name] = [c.weight.detach().clone() for c in _convs(model)]
        return self._models[name]

    @torch.no_grad()
    def with_init(self, name: str, init) -> nn.Module:
        """The model with its conv weights reset to torchvision's default or re-drawn with ``init``."""
        model = self.get(name)
        for conv, w0 in zip(_convs(model), self._defaults[name], strict=True):
            if init is None:
                conv.weight.copy_(w0)
            else:
                init(conv.weight)
        return model


@pytest.fixture(scope="module")
def zoo() -> _Zoo:
    return _Zoo()


# --------------------------------------------------------------------------------------------------------
# Mirrors
# --------------------------------------------------------------------------------------------------------
def test_mirror_index_formulas():
    k = 4
    w = torch.arange(k * k, dtype=torch.float64).reshape(k, k)
    expected = {
        "h": lambda r, j: w[r, k - 1 - j],
        "v": lambda r, j: w[k - 1 - r, j],
        "d": lambda r, j: w[j, r],
        "a": lambda r, j: w[k - 1 - j, k - 1 - r],
    }
    for flip in ch.FLIPS:
        m = ch.mirror(w, flip)
        for r in range(k):
            for j in range(k):
                assert m[r, j] == expected[flip](r, j), (flip, r, j)
        assert torch.equal(ch.mirror(m, flip), w)  # involution
    batch = torch.randn(2, 3, 5, 5)
    assert torch.equal(ch.mirror(batch, "a")[1, 2], ch.mirror(batch[1, 2], "a"))
    for flip in ("d", "a"):
        with pytest.raises(ValueError):
            ch.mirror(torch.zeros(3, 5), flip)
    with pytest.raises(ValueError):
        ch.mirror(w, "x")


# --------------------------------------------------------------------------------------------------------
# §5.1 hand-computed kernels
# --------------------------------------------------------------------------------------------------------
SOBEL_X = [[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]]
SOBEL_Y = [[-1, -2, -1], [0, 0, 0], [1, 2, 1]]

HAND_KERNELS = {
    "h_symmetric": ([[1, 2, 1], [0, 5, 0], [3, -1, 3]], {"rho": 1.0, "c": 0.0}),
    "sobel_x": (SOBEL_X, {"rho": -1.0, "c": 1.0, "c_v": 0.0, "c_d4": 0.0}),
    "sobel_y": (SOBEL_Y, {"c": 0.0, "c_v": 1.0}),
    "row_1x3": ([[1, 2, 3]], {"rho": 5 / 7, "c": 1 / math.sqrt(7)}),
    "corner_impulse": (
        [[1, 0, 0], [0, 0, 0], [0, 0, 0]],
        {"c": 1 / math.sqrt(2), "c_v": 1 / math.sqrt(2), "c_d4": 0.0},
    ),
    "centre_column": ([[0, 1, 0], [0, -2, 0], [0, 3, 0]], {"c": 0.0}),
}


@pytest.mark.parametrize("name", list(HAND_KERNELS))
def test_hand_computed_kernels(name):
    rows, expected = HAND_KERNELS[name]
    w = _k(rows)
    rho, n_skipped = ch.slice_rho(w)
    assert rho.dtype == torch.float64 and rho.shape == (1,) and int(n_skipped) == 0
    stats = ch.layer_stats(w[None, None])
    assert stats["n_slices"] == 1 and stats["n_skipped"] == 0
    if "rho" in expected:
        assert abs(float(rho[0]) - expected["rho"]) <= TOL
        assert abs(stats["rho_mean"] - expected["rho"]) <= TOL
    assert abs(float(ch.slice_c(rho)[0]) - expected["c"]) <= TOL
    for key, value in expected.items():
        if key != "rho":
            assert abs(stats[key] - value) <= TOL, (key, stats[key], value)
    assert abs(stats["c_pooled"] - expected["c"]) <= TOL  # one slice: pooled == slice value


def test_row_kernel_value():
    assert f"{ch.layer_stats(_k([[1, 2, 3]])[None, None])['c']:.6f}" == "0.377964"


def test_zero_slices_are_skipped_and_counted():
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    w[0, 1] = 0.0
    w[2, 2] = 1e-14
    rho, n_skipped = ch.slice_rho(w)
    assert int(n_skipped) == 2 and rho.numel() == 10
    stats = ch.layer_stats(w)
    assert stats["n_skipped"] == 2 and stats["n_slices"] == 10
    assert int(stats["hist"].sum()) == 10 and stats["hist"].numel() == 40
    empty = ch.layer_stats(torch.zeros(2, 2, 3, 3))
    assert empty["n_skipped"] == 4 and math.isnan(empty["c"])


# --------------------------------------------------------------------------------------------------------
# §5.2 invariances
# --------------------------------------------------------------------------------------------------------
@pytest.fixture
def rand_w() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(16, 8, 3, 3, generator=g, dtype=torch.float64)


_KEYS = ("c", "c_pooled", "rho_mean", "frac_sym", "frac_anti", "c_v", "c_d4")


@pytest.mark.parametrize("alpha", [2.5, -1.0, -0.3, 1e-3, 1e6])
def test_scale_invariance(rand_w, alpha):
    c = ch.slice_c(ch.slice_rho(rand_w)[0])
    c_scaled = ch.slice_c(ch.slice_rho(alpha * rand_w)[0])
    assert torch.allclose(c, c_scaled, rtol=0, atol=TOL)
    a, b = ch.layer_stats(rand_w), ch.layer_stats(alpha * rand_w)
    for key in _KEYS:
        assert abs(a[key] - b[key]) <= TOL, key


def test_mirror_invariance_and_identity(rand_w):
    rho, _ = ch.slice_rho(rand_w)
    c = ch.slice_c(rho)
    c_t = ch.slice_c(ch.slice_rho(ch.mirror(rand_w, "h"))[0])
    assert torch.allclose(c, c_t, rtol=0, atol=TOL)
    assert torch.allclose(c**2 + (1 + rho) / 2, torch.ones_like(c), rtol=0, atol=TOL)
    diff = (rand_w - ch.mirror(rand_w, "h")).flatten(-2).norm(dim=-1)
    direct = diff / (2 * rand_w.flatten(-2).norm(dim=-1))
    assert torch.allclose(c, direct.flatten(), rtol=0, atol=1e-10)


def test_permutation_invariance(rand_w):
    a = ch.layer_stats(rand_w)
    perm = rand_w[torch.randperm(16)][:, torch.randperm(8)]
    shuffled = rand_w.reshape(-1, 3, 3)[torch.randperm(16 * 8)].reshape(8, 16, 3, 3)
    for other in (perm, shuffled):
        b = ch.layer_stats(other)
        for key in _KEYS:
            assert abs(a[key] - b[key]) <= TOL, key
        assert torch.equal(a["hist"], b["hist"])


def test_pooled_formula(rand_w):
    scaled = rand_w * torch.rand(16, 8, 1, 1, dtype=torch.float64) * 10  # unequal slice norms
    stats = ch.layer_stats(scaled)
    rho, _ = ch.slice_rho(scaled)
    n2 = scaled.reshape(-1, 9).pow(2).sum(1)
    expected = float((n2 * rho).sum() / n2.sum())
    assert abs(stats["rho_pooled"] - expected) <= TOL
    whole = float((scaled * ch.mirror(scaled, "h")).sum() / scaled.pow(2).sum())
    assert abs(stats["rho_pooled"] - whole) <= TOL
    assert abs(stats["c_pooled"] - math.sqrt((1 - expected) / 2)) <= TOL
    assert abs(stats["c_pooled_norm"] - stats["c_pooled"] / ch.c0_pooled(3, 3)) <= TOL
    assert abs(stats["c_norm"] - stats["c"] / ch.c0_gaussian(3, 3)) <= TOL


def test_per_channel_rescale(rand_w):
    base = ch.layer_stats(rand_w)
    s_out = torch.linspace(-3.0, 5.0, 16, dtype=torch.float64).reshape(-1, 1, 1, 1)
    s_out[s_out == 0] = 0.5
    s_in = torch.linspace(0.1, 2.0, 8, dtype=torch.float64).reshape(1, -1, 1, 1)
    rescaled = ch.layer_stats(rand_w * s_out * s_in)  # e.g. BN folding
    assert abs(rescaled["c"] - base["c"]) <= TOL
    assert abs(rescaled["c_pooled"] - base["c_pooled"]) > 1e-6  # pooled is not per-channel invariant
    uniform = ch.layer_stats(rand_w * -7.0)
    assert abs(uniform["c_pooled"] - base["c_pooled"]) <= TOL


def test_symmetrise_and_antisymmetrise(zoo):
    model = copy.deepcopy(zoo.get("resnet18"))
    ch.symmetrize_(model)
    res = ch.model_chirality(model)
    assert len(res["layers"]) == 17
    for name, s in res["layers"].items():
        assert s["c"] <= TOL and s["c_pooled"] <= TOL and s["frac_sym"] == 1.0, name
        assert s["c_d4"] <= TOL
    assert res["scalars"]["model"] <= TOL
    ch.symmetrize_(model, anti=True)  # (W - TW)/2 of a symmetric W is 0: every slice is skipped
    zeroed = ch.model_chirality(model)
    assert all(s["n_slices"] == 0 and s["n_skipped"] > 0 for s in zeroed["layers"].values())
    assert "model" not in zeroed["scalars"]
    model = copy.deepcopy(zoo.get("resnet18"))
    ch.symmetrize_(model, anti=True)
    res = ch.model_chirality(model)
    for name, s in res["layers"].items():
        assert abs(s["c"] - 1) <= TOL and abs(s["c_pooled"] - 1) <= TOL and s["frac_anti"] == 1.0, name
    assert abs(res["scalars"]["model"] - 1) <= TOL


def test_only_1x1_network_has_no_eligible_layer():
    net = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 4, 1))
    for flip in ("h", "v", "d", "a"):
        assert ch.eligible_convs(net, flip) == []
    with pytest.warns(UserWarning, match="no eligible"):
        assert ch.model_chirality(net) == {"scalars": {}, "layers": {}}


def test_mlp_warns_once_and_returns_empty():
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 2))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = ch.model_chirality(mlp, include_fc_as_conv=True)
    assert out == {"scalars": {}, "layers": {}}
    assert len(caught) == 1 and issubclass(caught[0].category, UserWarning)


def test_non_square_and_vertical_only_layers():
    net = nn.Sequential(nn.Conv2d(3, 4, (1, 3)), nn.Conv2d(4, 4, (3, 1)), nn.Conv2d(4, 4, (3, 5)))
    assert [n for n, _ in ch.eligible_convs(net, "h")] == ["0", "2"]
    assert [n for n, _ in ch.eligible_convs(net, "v")] == ["1", "2"]
    assert ch.eligible_convs(net, "d") == []
    res = ch.model_chirality(net)
    assert set(res["layers"]) == {"0", "1", "2"}
    assert "c" not in res["layers"]["1"] and "c_v" in res["layers"]["1"]
    assert "c_v" not in res["layers"]["0"] and res["layers"]["0"]["c_d4"] == 0.0  # V is the identity on 1xk
    assert abs(res["scalars"]["model"] - (res["layers"]["0"]["c"] + res["layers"]["2"]["c"]) / 2) <= TOL
    assert abs(res["scalars"]["model_v"] - (res["layers"]["1"]["c_v"] + res["layers"]["2"]["c_v"]) / 2) <= TOL
    assert "layer/1/c_v" in res["scalars"] and "layer/1/c" not in res["scalars"]


# --------------------------------------------------------------------------------------------------------
# §5.3 random-init baselines
# --------------------------------------------------------------------------------------------------------
C0_TABLE = {
    (3, 3): (0.5469, 0.5774),
    (5, 5): (0.6231, 0.6325),
    (7, 7): (0.6502, 0.6547),
    (11, 11): (0.6725, 0.6742),
    (1, 3): (0.5000, 0.5774),
    (1, 7): (0.6250, 0.6547),
    (2, 2): (0.6667, 0.7071),
    (4, 4): (0.6962, 0.7071),
}


@pytest.mark.parametrize("shape", list(C0_TABLE))
def test_c0_table(shape):
    c0, c0p = C0_TABLE[shape]
    assert abs(ch.c0_gaussian(*shape) - c0) <= 5e-5
    assert abs(ch.c0_pooled(*shape) - c0p) <= 5e-5


def test_c0_degenerate():
    assert ch.c0_gaussian(5, 1) == 0.0 and ch.c0_pooled(5, 1) == 0.0


@pytest.mark.parametrize("shape", [(3, 3), (1, 3), (2, 2), (4, 4), (3, 5), (7, 7)])
def test_c0_monte_carlo(shape):
    kh, kw = shape
    n = 200_000
    g = torch.Generator().manual_seed(kh * 100 + kw)
    w = torch.randn(n, kh, kw, generator=g, dtype=torch.float64)
    rho, _ = ch.slice_rho(w)
    c = ch.slice_c(rho)
    sd = _sd_c(kh, kw)
    assert abs(float(c.mean()) - ch.c0_gaussian(kh, kw)) <= 4 * sd / math.sqrt(n)
    assert abs(float(c.std()) - sd) <= 0.01 * sd + 1e-3
    assert abs(float((c**2).mean()) - (kw // 2) / kw) <= 4 * 0.3 / math.sqrt(n)
    e_rho = 1 / kw if kw % 2 else 0.0
    assert abs(float(rho.mean()) - e_rho) <= 4 * float(rho.std()) / math.sqrt(n)


INITS = {
    "default": None,
    "normal_0.01": lambda w: nn.init.normal_(w, 0.0, 0.01),
    "uniform_0.05": lambda w: nn.init.uniform_(w, -0.05, 0.05),
    "xavier_normal": nn.init.xavier_normal_,
    "xavier_uniform": nn.init.xavier_uniform_,
    "kaiming_normal": lambda w: nn.init.kaiming_normal_(w, mode="fan_out", nonlinearity="relu"),
    "kaiming_uniform": lambda w: nn.init.kaiming_uniform_(w, mode="fan_in", nonlinearity="relu"),
    "orthogonal": nn.init.orthogonal_,
}

# C_model / C~_model / C_model^param at init (spec §5.3)
MODEL_AT_INIT = {
    "alexnet": (0.5873, 0.6078, 0.557),
    "resnet18": (0.5530, 0.5819, 0.547),
    "resnet50": (0.5530, 0.5819, 0.547),
    "vgg16": (0.5469, 0.5774, 0.547),
}


def _check_init_baselines(res: dict) -> None:
    for name, s in res["layers"].items():
        kh, kw = s["kh"], s["kw"]
        tol = 4 * _sd_c(kh, kw) / math.sqrt(s["n_slices"]) + 0.005
        assert abs(s["c"] - ch.c0_gaussian(kh, kw)) <= tol, (name, s["c"], ch.c0_gaussian(kh, kw), tol)
        assert s["n_skipped"] == 0


@pytest.mark.parametrize("init", list(INITS))
@pytest.mark.parametrize("arch", ["resnet18", "alexnet"])
def test_random_init_baselines(zoo, arch, init):
    torch.manual_seed(123)
    model = zoo.with_init(arch, INITS[init])
    res = ch.model_chirality(model, flips=("h",))
    _check_init_baselines(res)
    c_model, c_pooled, c_param = MODEL_AT_INIT[arch]
    sc = res["scalars"]
    assert abs(sc["model"] - c_model) <= 0.01
    assert abs(sc["model_pooled"] - c_pooled) <= 0.01
    assert abs(sc["model_paramw"] - c_param) <= 0.01
    assert abs(sc["model_norm"] - 1.0) <= 0.02


@pytest.mark.parametrize("arch", ["vgg16", "resnet50"])
def test_default_init_big_models(zoo, arch):
    res = ch.model_chirality(zoo.with_init(arch, None))
    _check_init_baselines(res)
    c_model, c_pooled, c_param = MODEL_AT_INIT[arch]
    sc = res["scalars"]
    assert abs(sc["model"] - c_model) <= 0.01
    assert abs(sc["model_pooled"] - c_pooled) <= 0.01
    assert abs(sc["model_paramw"] - c_param) <= 0.01


def test_scalar_names(zoo):
    res = ch.model_chirality(zoo.with_init("resnet18", None))
    sc = res["scalars"]
    for key in ("model", "model_pooled", "model_paramw", "model_norm", "model_v", "model_d4"):
        assert isinstance(sc[key], float)
    for key in ("c", "c_pooled", "c_norm", "rho_mean", "frac_sym", "frac_anti", "c_v", "c_d4", "n_skipped"):
        assert f"layer/layer1.0.conv1/{key}" in sc
    assert not any(k.startswith("chirality/") for k in sc)
    conv1 = res["layers"]["conv1"]
    assert conv1["rho"].dtype == torch.float64 and conv1["rho"].numel() == 64 * 3
    assert conv1["hist"].numel() == 40 and int(conv1["hist"].sum()) == 192
    assert conv1["params"] == 64 * 3 * 49 and (conv1["kh"], conv1["kw"]) == (7, 7)
    assert conv1["rho_filter"].shape == (64,)
    only_h = ch.model_chirality(zoo.get("resnet18"), flips=("h",))["scalars"]
    assert "model_v" not in only_h and "model_d4" not in only_h and "layer/conv1/c_v" not in only_h


@pytest.mark.parametrize(
    ("arch", "count", "n_1x1"),
    [("alexnet", 5, 0), ("vgg16", 13, 0), ("resnet18", 17, 3), ("resnet50", 17, 36)],
)
def test_eligible_layer_counts(zoo, arch, count, n_1x1):
    model = zoo.get(arch)
    eligible = ch.eligible_convs(model)
    assert len(eligible) == count
    assert sum(c.kernel_size == (1, 1) for c in _convs(model)) == n_1x1
    for flip in ("v", "d", "a"):
        assert len(ch.eligible_convs(model, flip)) == count
    if arch == "alexnet":
        assert [w.shape[-1] for _, w in eligible] == [11, 5, 3, 3, 3]
    assert all(not w.requires_grad for _, w in eligible)


@pytest.mark.parametrize(
    ("arch", "fc", "shape"),
    [("alexnet", "classifier.1", (4096, 256, 6, 6)), ("vgg16", "classifier.0", (4096, 512, 7, 7))],
)
def test_include_fc_as_conv(zoo, arch, fc, shape):
    model = zoo.get(arch)
    eligible = ch.eligible_convs(model, include_fc_as_conv=True)
    name, w = eligible[-1]
    assert name == f"{fc}(as_conv)" and tuple(w.shape) == shape
    linear = model.get_submodule(fc)
    o, c, h, j = 7, 5, 2, 3  # PyTorch (C, H, W) flatten order
    assert w[o, c, h, j] == linear.weight[o, c * shape[2] * shape[3] + h * shape[3] + j]
    if arch == "alexnet":
        res = ch.model_chirality(model, flips=("h",), include_fc_as_conv=True)
        assert len(res["layers"]) == 6 and f"layer/{fc}(as_conv)/c" in res["scalars"]
        assert res["layers"][f"{fc}(as_conv)"]["params"] == 4096 * 9216


def test_include_fc_as_conv_resnet_adds_nothing(zoo):
    assert len(ch.eligible_convs(zoo.get("resnet18"), include_fc_as_conv=True)) == 17


# --------------------------------------------------------------------------------------------------------
# §5.4 feature-map oracle and stride compatibility
# --------------------------------------------------------------------------------------------------------
@torch.no_grad()
def _randomise_bn(model: nn.Module) -> None:
    """Non-trivial eval-mode BN (per-channel affine maps commute with the mirror)."""
    g = torch.Generator().manual_seed(3)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)


@pytest.fixture(scope="module")
def sym_resnet18() -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    _randomise_bn(model)
    return ch.symmetrize_(model).double()


def _probe(width: int, n: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(width)
    return torch.randn(n, 3, width, width, generator=g, dtype=torch.float64)


def test_default_stages(zoo):
    assert list(ch.default_stages(zoo.get("resnet18"))) == ["relu", "maxpool", "layer1", "layer2", "layer3",
                                                            "layer4"]
    assert list(ch.default_stages(zoo.get("alexnet"))) == ["features.2", "features.5", "features.12"]
    assert list(ch.default_stages(zoo.get("vgg16"))) == [f"features.{i}" for i in (4, 9, 16, 23, 30)]
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    assert list(ch.default_stages(net)) == ["0", "1"]


def test_fmap_resnet18_compatible_width(sym_resnet18):
    model = sym_resnet18
    model.train()
    out = ch.fmap_chirality(model, _probe(33), batch_size=1)
    stages = ["relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "logits"]
    for s in stages:
        assert out[f"fmap/{s}"] <= TOL, (s, out[f"fmap/{s}"])
        assert abs(out[f"fmap_gap/{s}"]) <= TOL
    assert out["flip_consistency"] == 1.0
    # modes restored and hooks removed
    assert model.training and all(m.training for m in model.modules())
    assert all(not m._forward_hooks for m in model.modules())


def test_fmap_resnet18_incompatible_width(sym_resnet18):
    out = ch.fmap_chirality(sym_resnet18.eval(), _probe(32))
    assert out["fmap/relu"] > 0.1
    assert all(0.0 <= v <= 1.0 + TOL for k, v in out.items() if k.startswith("fmap/"))


def test_fmap_unsymmetrised_kernels_are_chiral(zoo):
    model = copy.deepcopy(zoo.with_init("resnet18", None)).double()
    out = ch.fmap_chirality(model, _probe(33))
    assert out["fmap/relu"] > 0.1


def test_fmap_alexnet_63(zoo):
    model = ch.symmetrize_(copy.deepcopy(zoo.get("alexnet"))).double()
    out = ch.fmap_chirality(model, _probe(63))
    for s in ("features.2", "features.5", "features.12"):
        assert out[f"fmap/{s}"] <= TOL, (s, out)
    assert ch.fmap_chirality(model, _probe(64))["fmap/features.2"] > 0.05


def test_fmap_vgg16_32(zoo):
    vgg = zoo.get("vgg16")
    classifier = vgg.classifier
    vgg.classifier = nn.Identity()  # avoid copying (and casting to float64) the 100M-parameter classifier
    try:
        model = copy.deepcopy(vgg)
    finally:
        vgg.classifier = classifier
    model.classifier = nn.Linear(512 * 7 * 7, 10)
    model = ch.symmetrize_(model).double()
    out = ch.fmap_chirality(model, _probe(32))
    for i in (4, 9, 16, 23, 30):
        assert out[f"fmap/features.{i}"] <= TOL, (i, out)
    # the 1x1 map entering the classifier is spatially constant, so the logits are flip-invariant here
    assert out["fmap/logits"] <= TOL and out["flip_consistency"] == 1.0
    assert ch.fmap_chirality(model, _probe(33))["fmap/features.4"] > 0.05


def test_fmap_custom_stages_and_non_4d(sym_resnet18):
    model = sym_resnet18.eval()
    out = ch.fmap_chirality(model, _probe(33), stages={"pool": model.avgpool, "fc": model.fc})
    assert set(out) == {"fmap/pool", "fmap_gap/pool", "fmap/fc", "fmap_gap/fc", "fmap/logits",
                        "fmap_gap/logits", "flip_consistency"}
    assert out["fmap/fc"] <= TOL


@pytest.mark.parametrize(
    ("arch", "good", "bad"),
    [
        ("resnet18", [33, 65, 225], [32, 224]),
        ("alexnet", [63, 223, 255], [64, 224, 225, 227, 31]),  # 31 is too small for AlexNet
        ("vgg16", [32, 224], [33, 225]),
    ],
)
def test_stride_compatible_table(zoo, arch, good, bad):
    model = zoo.get(arch)
    for w in good:
        assert ch.stride_compatible(model, w), w
    for w in bad:
        assert not ch.stride_compatible(model, w), w


@pytest.mark.parametrize(
    ("arch", "n", "expected"),
    [
        ("resnet18", 224, 225),
        ("resnet18", 32, 33),
        ("alexnet", 224, 223),
        ("vgg16", 224, 224),
        ("vgg16", 33, 32),
    ],
)
def test_compatible_width(zoo, arch, n, expected):
    assert ch.compatible_width(zoo.get(arch), n) == expected


def test_stride_compatible_restores_mode_and_handles_dtype(sym_resnet18):
    model = sym_resnet18  # float64 model
    model.train()
    model.layer1.eval()  # mixed modes are restored module by module
    assert ch.stride_compatible(model, 33) and not ch.stride_compatible(model, 32)
    assert model.training and not model.layer1.training and model.layer2.training
    assert all(not m._forward_pre_hooks for m in model.modules())
    assert not ch.stride_compatible(model, 2)  # too small -> exception -> False
    model.eval()


def test_stride_rule_on_custom_ops():
    net = nn.Sequential(nn.Conv2d(1, 2, (3, 5), stride=(1, 3), padding=(0, 1)), nn.AdaptiveAvgPool2d(2))
    # (n + 2 - 4 - 1) % 3 == 0  <=>  n % 3 == 0
    assert [w for w in range(10, 20) if ch.stride_compatible(net, w, in_channels=1, height=4)] == [12, 15, 18]
    assert ch.compatible_width(net, 13, in_channels=1) == 12


# --------------------------------------------------------------------------------------------------------
# Set-level value
# --------------------------------------------------------------------------------------------------------
def test_set_level_conv1():
    g = torch.Generator().manual_seed(5)
    w = torch.randn(16, 3, 7, 7, generator=g, dtype=torch.float64)
    assert ch.set_level_conv1(w) > 0.3
    assert ch.set_level_conv1(torch.cat([w, ch.mirror(w, "h")])) <= TOL  # closed under mirroring
    assert ch.set_level_conv1(w + ch.mirror(w, "h")) <= TOL  # every filter achiral
    # j = i term: a single filter scores its whole-filter c
    single = w[:1]
    c_whole = float((single - ch.mirror(single, "h")).norm() / (2 * single.norm()))
    assert abs(ch.set_level_conv1(single) - c_whole) <= TOL
