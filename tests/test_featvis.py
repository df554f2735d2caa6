"""Feature visualisation (spec §2.7, §6 "Coherence" / "Fast = naive" oracles, §10 torch-lucent pitfall)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from featurelens.analysis.featvis import (
    COLOR_CORRELATION_NORMALIZED,
    FourierImage,
    RedirectedReLU,
    redirect_relus,
    vis_coherence,
    visualise,
)

torch.set_num_threads(2)


def _preprocess(x: torch.Tensor) -> torch.Tensor:
    return (x - 0.5) / 0.25


class TinyCNN(nn.Module):
    def __init__(self, c_in: int = 3, width: int = 8, n_classes: int = 5, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv1 = nn.Conv2d(c_in, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.conv2(x))
        return self.fc(self.pool(x).flatten(1))


@pytest.fixture(scope="module")
def model() -> TinyCNN:
    m = TinyCNN()
    with torch.no_grad():  # non-trivial BN statistics
        m.bn1.running_mean.uniform_(-0.2, 0.2)
        m.bn1.running_var.uniform_(0.5, 1.5)
    return m


def test_fourier_image_shape_range_and_colour() -> None:
    gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
    p = FourierImage(2, 3, 16, gens)
    x = p.images().detach()
    assert x.shape == (2, 3, 16, 16)
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    # Lucid matrix normalised by its largest column norm.
    assert np.isclose(np.linalg.norm(COLOR_CORRELATION_NORMALIZED, axis=0).max(), 1.0)
    p1 = FourierImage(1, 1, (12, 15), torch.Generator().manual_seed(0))
    assert p1.images().shape == (1, 1, 12, 15)
    # image i only depends on its own generator
    q = FourierImage(1, 3, 16, [torch.Generator().manual_seed(2)])
    assert torch.equal(q.images()[0], x[1])


def test_deterministic_shape_range_and_improves(model: TinyCNN) -> None:
    sets = [torch.tensor([0, 1, 2]), torch.tensor([3, 5, 7])]
    kw = dict(size=16, channels=3, preprocess=_preprocess, seed=3)
    imgs, j_fin, j_ini, ent = visualise(model, model.conv2, sets, steps=64, **kw)
    assert imgs.shape == (2, 3, 16, 16)
    assert float(imgs.min()) >= 0.0 and float(imgs.max()) <= 1.0
    assert j_fin.shape == j_ini.shape == ent.shape == (2,)
    assert bool((j_fin > j_ini).all())
    assert bool((ent >= 0).all()) and bool((ent <= np.log(5) + 1e-5).all())
    a = visualise(model, model.conv2, sets, steps=10, relu_redirect_steps=4, **kw)
    b = visualise(model, model.conv2, sets, steps=10, relu_redirect_steps=4, **kw)
    for u, v in zip(a, b, strict=True):
        assert torch.equal(u, v)
    assert torch.equal(a[2], j_ini)
    c = visualise(model, model.conv2, sets, **{**kw, "steps": 0, "seed": 4})
    assert not torch.equal(c[0], visualise(model, model.conv2, sets, **{**kw, "steps": 0})[0])


def test_batch_equals_single_runs(model: TinyCNN) -> None:
    sets = [torch.tensor([0, 1, 2]), torch.tensor([4, 6]), torch.tensor([1, 3, 5, 7])]
    seeds = [11, 12, 13]
    kw = dict(size=16, channels=3, preprocess=_preprocess, steps=12, relu_redirect_steps=4)
    batch = visualise(model, model.conv2, sets, seed=seeds, **kw)
    for i, (s, sd) in enumerate(zip(sets, seeds, strict=True)):
        single = visualise(model, model.conv2, [s], seed=[sd], **kw)
        for u, v in zip(batch, single, strict=True):
            torch.testing.assert_close(u[i:i + 1], v, atol=1e-5, rtol=1e-5)
    # an int seed: set i uses SeedSequence child i, which does not depend on the batch size
    b_int = visualise(model, model.conv2, sets[:2], seed=5, **{**kw, "steps": 4})
    s_int = visualise(model, model.conv2, sets[:1], seed=5, **{**kw, "steps": 4})
    torch.testing.assert_close(b_int[0][:1], s_int[0], atol=1e-5, rtol=1e-5)


def test_state_restored_and_inference_mode(model: TinyCNN) -> None:
    x = torch.rand(2, 3, 16, 16)
    model.train()
    model.fc.weight.requires_grad_(False)
    model.eval()
    with torch.no_grad():
        before = model(x).clone()
    model.train()
    kw = dict(size=16, channels=3, preprocess=_preprocess, steps=6, relu_redirect_steps=3, seed=0)
    out = visualise(model, model.conv2, [torch.tensor([0, 1])], **kw)
    assert model.training and all(m.training for m in model.modules())
    assert not model.fc.weight.requires_grad
    assert all(p.requires_grad for n, p in model.named_parameters() if n != "fc.weight")
    assert all(p.grad is None for p in model.parameters())
    for m in model.modules():
        if isinstance(m, nn.ReLU):
            assert "forward" not in m.__dict__
    model.eval()
    with torch.no_grad():
        after = model(x)
    assert torch.equal(before, after)
    with torch.inference_mode():
        out_inf = visualise(model, model.conv2, [torch.tensor([0, 1])], **kw)
    for u, v in zip(out, out_inf, strict=True):
        torch.testing.assert_close(u, v, atol=0, rtol=0)
    model.fc.weight.requires_grad_(True)
    model.train()


def test_patch_restored_on_error(model: TinyCNN) -> None:
    with pytest.raises(RuntimeError):
        with redirect_relus(model):
            assert "forward" in model.relu1.__dict__
            raise RuntimeError("boom")
    assert "forward" not in model.relu1.__dict__


def test_redirected_relu_backward_rule() -> None:
    # image 0: all inputs negative -> redirected; image 1: one positive input -> ordinary ReLU gradient
    x = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, 2.0, -3.0]], requires_grad=True)
    g = torch.tensor([[-1.0, 1.0, -2.0], [-1.0, 1.0, -2.0]])  # gradient of the minimised loss
    y = RedirectedReLU.apply(x)
    assert torch.equal(y, torch.relu(x))
    y.backward(g)
    # negative input with g > 0 (descent would push it lower) is dropped; the rest passes
    assert torch.equal(x.grad[0], torch.tensor([-1.0, 0.0, -2.0]))
    assert torch.equal(x.grad[1], torch.tensor([0.0, 1.0, 0.0]))


def test_redirection_moves_dead_unit() -> None:
    m = TinyCNN(seed=1)
    with torch.no_grad():
        m.conv1.bias.fill_(-100.0)  # every conv1/bn1 pre-activation negative: relu1 dead, zero gradient
        m.bn1.weight.fill_(1.0)
        m.bn1.bias.zero_()
        m.conv2.weight.abs_()
        m.conv2.bias.fill_(0.1)
    kw = dict(size=16, channels=3, preprocess=_preprocess, seed=[7])
    init = visualise(m, m.conv2, [torch.tensor([0, 1, 2])], steps=0, **kw)[0]
    plain = visualise(m, m.conv2, [torch.tensor([0, 1, 2])], steps=4, relu_redirect_steps=0, **kw)[0]
    redir = visualise(m, m.conv2, [torch.tensor([0, 1, 2])], steps=4, relu_redirect_steps=4, **kw)[0]
    assert torch.equal(plain, init)  # ordinary ReLU: no gradient reaches the image
    assert float((redir - init).abs().max()) > 1e-4


def test_one_channel_mlp_style(model: TinyCNN) -> None:
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 4))
    imgs, j_fin, j_ini, ent = visualise(mlp, mlp[1], [torch.tensor([0, 1, 2])], size=8, channels=1,
                                        steps=16, seed=0)
    assert imgs.shape == (1, 1, 8, 8)
    assert float(j_fin[0]) > float(j_ini[0])


def test_vis_coherence_percentiles(model: TinyCNN) -> None:
    sets = [torch.tensor([0, 1, 2]), torch.tensor([3, 4, 5, 6]), torch.tensor([0, 1])]  # last: too small
    rows, summary = vis_coherence(model, model.conv2, sets, layer_size=8, candidates=torch.arange(8),
                                  n_random=19, seed=0, size=16, channels=3, preprocess=_preprocess, steps=4,
                                  relu_redirect_steps=2)
    assert [r["set_index"] for r in rows] == [0, 1]
    grid = {k / 20 for k in range(1, 21)}
    for r in rows:
        for key in ("p_vis_score", "p_vis_entropy"):
            assert any(np.isclose(r[key], g) for g in grid)
        assert r["effect_vis_score"] > 0
    assert summary["n_sets"] == 2
    for stat in ("vis_score", "vis_entropy"):
        assert 0 < summary[f"fisher_p_{stat}"] <= 1
        assert np.isfinite(summary[f"effect_{stat}"])
    rows2, _ = vis_coherence(model, model.conv2, sets, layer_size=8, n_random=19, seed=0, size=16,
                             channels=3, preprocess=_preprocess, steps=4, relu_redirect_steps=2)
    assert rows2 == rows
