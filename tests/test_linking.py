"""Oracles of the linking analysis (linking spec §9.1-§9.6): float64, CPU, seconds."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from featurelens.analysis import linking as lk
from featurelens.models.generators.simple import LinearGenerator, ShapeRenderer

F64 = torch.float64


def _linear_setup(m: int = 5, d: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    Gm = torch.randn(3 * 4 * 4, m, generator=g, dtype=F64)
    gen = LinearGenerator(Gm, (3, 4, 4), num_classes=2, w_avg=torch.randn(2, m, generator=g, dtype=F64))
    P = torch.randn(d, 3 * 4 * 4, generator=g, dtype=F64)
    c = torch.randn(d, generator=g, dtype=F64)
    M = P @ Gm  # r = P x + c = M w + c'
    c_full = P @ gen.offset + c

    def encode(images: torch.Tensor) -> torch.Tensor:
        return images.reshape(images.shape[0], -1) @ P.T + c

    return gen, encode, M, c_full


def _classify_all(num_classes: int):
    def classify(images: torch.Tensor) -> torch.Tensor:
        return torch.zeros(images.shape[0], num_classes, dtype=F64)

    return classify


# -------------------------------------------------------------------------------------------------- §9.1 exact inverse
def test_exact_inverse_full_rank():
    gen, encode, M, c = _linear_setup(m=5, d=8)
    pairs = lk.build_pairs(gen, encode, _classify_all(2), [0, 1], 40, keep_filter=False)
    lmap = lk.fit_linking_map(pairs.r, pairs.w)
    assert torch.linalg.norm(lmap.coef @ M - torch.eye(5, dtype=F64)) < 1e-8
    assert torch.allclose(lmap.intercept, -lmap.coef @ c, atol=1e-8)
    assert lmap.rank == 5  # the centred Gram of r = M w + c has rank m
    held = lk.build_pairs(gen, encode, _classify_all(2), [0, 1], 20, seed_base=1_000_000, keep_filter=False)
    r2m, r2p = lk.r2_scores(held.w, lmap(held.r))
    assert r2m > 1 - 1e-9 and r2p > 1 - 1e-9


def test_exact_inverse_rank_deficient():
    gen, encode, M, c = _linear_setup(m=6, d=3)
    pairs = lk.build_pairs(gen, encode, _classify_all(2), [0, 1], 50, keep_filter=False)
    stats = lk.LinkingStats(3, 6)
    stats.update(pairs.r, pairs.w)
    lmap = stats.solve(0.0)
    assert lmap.rank == 3
    r2m, r2p = lk.r2_scores(pairs.w, lmap(pairs.r))
    assert r2m < 1 and r2p < 1
    tr = stats.train_scores(lmap)
    assert tr["r2_pooled"] == pytest.approx(r2p, abs=1e-9)
    assert tr["mse"] == pytest.approx(lk.mse(pairs.w, lmap(pairs.r)), rel=1e-8)


def test_dead_units_harmless():
    g = torch.Generator().manual_seed(1)
    r = torch.randn(60, 6, generator=g, dtype=F64)
    r[:, 2] = 3.0  # dead unit
    r[:, 4] = r[:, 0] * 2  # collinear unit
    w = r @ torch.randn(6, 4, generator=g, dtype=F64) + 1.0
    lmap = lk.fit_linking_map(r, w)
    assert lmap.rank == 4
    assert torch.all(lmap.coef[:, 2].abs() < 1e-10)
    assert torch.allclose(lmap(r), w, atol=1e-9)


# -------------------------------------------------------------------------------------------------- §9.2 ridge limits
def _random_pairs(n=80, d=7, m=4, seed=2):
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(n, d, generator=g, dtype=F64) * 2 + 1
    w = r @ torch.randn(d, m, generator=g, dtype=F64) + 0.3 * torch.randn(n, m, generator=g, dtype=F64) - 2
    return r, w


def test_ridge_limits_and_streaming():
    r, w = _random_pairs()
    ols = lk.fit_linking_map(r, w, alpha=0.0)
    X = torch.cat([r, torch.ones(len(r), 1, dtype=F64)], 1)
    sol = torch.linalg.lstsq(X, w, driver="gelsd").solution
    assert torch.allclose(ols.coef, sol[:-1].T, atol=1e-10) and torch.allclose(ols.intercept, sol[-1], atol=1e-10)
    big = lk.fit_linking_map(r, w, alpha=1e12)
    assert big.coef.abs().max() < 1e-7
    assert torch.allclose(big.intercept, w.mean(0), atol=1e-6)
    ridge = lk.fit_linking_map(r, w, alpha=1.0)
    # closed form with an unpenalised intercept
    rc, wc = r - r.mean(0), w - w.mean(0)
    A = torch.linalg.solve(rc.T @ rc + torch.eye(7, dtype=F64), rc.T @ wc).T
    assert torch.allclose(ridge.coef, A, atol=1e-10)
    for alpha in (0.0, 1.0):
        one = lk.fit_linking_map(r, w, alpha)
        stream = lk.LinkingStats(7, 4)
        perm = torch.randperm(len(r), generator=torch.Generator().manual_seed(3))
        for chunk in perm.split(13):
            stream.update(r[chunk], w[chunk])
        s = stream.solve(alpha)
        assert torch.allclose(s.coef, one.coef, atol=1e-10) and torch.allclose(s.intercept, one.intercept, atol=1e-10)
        a, b = lk.LinkingStats(7, 4), lk.LinkingStats(7, 4)
        a.update(r[:30], w[:30])
        b.update(r[30:], w[30:])
        a.merge_state(b)
        merged = a.solve(alpha)
        assert torch.allclose(merged.coef, one.coef, atol=1e-10)
        assert torch.allclose(merged.intercept, one.intercept, atol=1e-10)


def test_fit_equals_scikit_learn_ols_and_ridge():
    """The reference fits with sklearn LinearRegression (OLS) or Ridge(alpha=1); the closed form agrees."""
    from sklearn.linear_model import LinearRegression, Ridge
    from sklearn.metrics import r2_score

    r, w = _random_pairs()
    for alpha, est in ((0.0, LinearRegression()), (1.0, Ridge(alpha=1.0)), (25.0, Ridge(alpha=25.0))):
        est.fit(r.numpy(), w.numpy())
        ours = lk.fit_linking_map(r, w, alpha)
        np.testing.assert_allclose(ours.coef.numpy(), est.coef_, atol=1e-9)
        np.testing.assert_allclose(ours.intercept.numpy(), est.intercept_, atol=1e-9)
        scores = lk.evaluate_map(ours, r, w)
        assert abs(scores["r2_mean"] - r2_score(w.numpy(), est.predict(r.numpy()))) < 1e-9


def test_bad_alpha_and_empty():
    with pytest.raises(ValueError, match="alpha"):
        lk.fit_linking_map(*_random_pairs(), alpha=-1)
    with pytest.raises(ValueError, match="n = 0"):
        lk.LinkingStats(3, 2).solve()


def test_npz_round_trip(tmp_path):
    r, w = _random_pairs()
    lmap = lk.fit_linking_map(r, w)
    path = lmap.save(tmp_path / "linking_map.npz", layer="head", classes=[0, 1], psi=0.7, seeds=[1, 2, 3],
                     keep_rates=[0.5, 0.75], generator_hash="abc123")
    back = lk.LinkingMap.load(path)
    assert torch.equal(back.coef, lmap.coef) and torch.equal(back.intercept, lmap.intercept)
    assert back.rank == lmap.rank and back.alpha == 0.0
    assert back.meta["layer"] == "head" and back.meta["generator_hash"] == "abc123" and back.meta["psi"] == 0.7
    assert list(back.meta["classes"]) == [0, 1] and back.meta["n_pairs"] == len(r)
    with pytest.raises(ValueError, match="keep"):
        lmap.save(tmp_path / "bad.npz", keep={"a": 1})
    assert np.load(path, allow_pickle=False)["coef"].shape == (4, 7)


# -------------------------------------------------------------------------------------------------- §9.3 pair builder
def test_pair_builder():
    gen, encode, _, _ = _linear_setup()
    calls = []

    def classify(images):  # keeps about half: sign of the first pixel decides the class
        calls.append(images.shape[0])
        return torch.stack([images[:, 0, 0, 0], -images[:, 0, 0, 0]], 1)

    a = lk.build_pairs(gen, encode, classify, [0, 1], 10, draw_factor=5, batch_size=7)
    b = lk.build_pairs(gen, encode, classify, [0, 1], 10, draw_factor=5, batch_size=3)
    assert torch.equal(a.seeds, b.seeds) and torch.equal(a.w, b.w) and torch.equal(a.n_draws, b.n_draws)
    assert a.seeds.unique().numel() == a.seeds.numel()
    assert torch.all((a.n_kept == 10) | (a.n_draws == a.max_draws))
    assert torch.allclose(a.keep_rate, a.n_kept.double() / a.n_draws.double())
    # every kept w is the one its seed gives
    for i in range(len(a)):
        assert torch.equal(a.w[i], gen.sample_w(1, int(a.labels[i]), 0.7, int(a.seeds[i]))[0])
    held = lk.build_pairs(gen, encode, classify, [0, 1], 10, draw_factor=5, seed_base=1_000_000)
    assert not set(held.seeds.tolist()) & set(range(0, 2 * a.max_draws))


def test_pair_builder_always_wrong():
    gen, encode, _, _ = _linear_setup()

    def wrong(images):
        return torch.tensor([[0.0, 0.0, 1.0]], dtype=F64).expand(images.shape[0], 3)  # always class 2

    out = lk.build_pairs(gen, encode, wrong, [0, 1], 4, draw_factor=3, batch_size=5)
    assert len(out) == 0 and out.max_draws == 12
    assert torch.equal(out.n_draws, torch.tensor([12, 12])) and torch.all(out.keep_rate == 0)
    with pytest.raises(ValueError, match="seed_stride"):
        lk.build_pairs(gen, encode, wrong, [0, 1], 4, draw_factor=3, seed_stride=5)


def test_feature_extractor():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 5), nn.ReLU(), nn.Linear(5, 3)).double().train()
    fx = lk.FeatureExtractor(model, "3")
    x = torch.randn(4, 3, 2, 2, dtype=F64)
    r, logits = fx(x)
    assert r.shape == (4, 5) and torch.allclose(logits, r @ fx.weight.T + fx.bias)
    assert model.training
    with pytest.raises(ValueError, match="nn.Linear"):
        lk.FeatureExtractor(model, "2")


# -------------------------------------------------------------------------------------------------- §9.4 sweep
def test_unit_sweep_and_linear_map():
    r0 = torch.randn(6, dtype=F64)
    sw = lk.unit_sweep(r0, 2, -1.5, 3.0, 5)
    assert torch.equal(sw[:, 2], torch.linspace(-1.5, 3.0, 5, dtype=F64))
    assert torch.equal(torch.cat([sw[:, :2], sw[:, 3:]], 1), torch.cat([r0[:2], r0[3:]]).repeat(5, 1))
    r, w = _random_pairs(d=6)
    lmap = lk.fit_linking_map(r, w)
    dw = lmap(sw[-1]) - lmap(sw[0])
    assert torch.allclose(dw, lmap.coef[:, 2] * 4.5, atol=1e-12)
    r_ref = torch.randn(10, 6, dtype=F64)
    r_ref[:, 4] = 0.5
    mins, maxs, dead = lk.activation_ranges(r_ref)
    assert dead.tolist() == [False] * 4 + [True, False]
    gen = LinearGenerator(torch.randn(3 * 2 * 2, 4, dtype=F64), (3, 2, 2), 1)
    P = torch.randn(6, 12, dtype=F64)
    encode = lambda x: x.reshape(x.shape[0], -1) @ P.T  # noqa: E731
    classify = lambda x: x.reshape(x.shape[0], -1)[:, :3]  # noqa: E731
    df, imgs = lk.sweep_units(gen, lmap, encode, classify, r_ref[:2], torch.zeros(2, dtype=torch.int64), range(6),
                              mins, maxs, r_ref.std(0), keep_images=[1])
    assert sorted(df["unit"].unique().tolist()) == [0, 1, 2, 3, 5]
    assert imgs[1].shape == (2, 3, 3, 2, 2)
    assert {"d_logit", "fidelity", "leakage", "top5", "img_luminance"} <= set(df.columns)


# -------------------------------------------------------------------------------------------------- image measures
def test_local_entropy_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    grey = torch.randint(0, 6, (2, 9, 13), generator=g)
    fast = lk.local_entropy(grey, radius=5)
    assert int(lk.disk_offsets(5).sum()) == 81
    for n in range(2):
        for y in range(9):
            for x in range(13):
                near = [(yy, xx) for yy in range(9) for xx in range(13) if (yy - y) ** 2 + (xx - x) ** 2 <= 25]
                vals = [int(grey[n, yy, xx]) for yy, xx in near]
                _, counts = np.unique(vals, return_counts=True)
                p = counts / counts.sum()
                assert fast[n, y, x].item() == pytest.approx(float(-(p * np.log2(p)).sum()), abs=1e-12)


def test_grey_levels_are_the_references_rgb2gray_bytes():
    """``img_as_ubyte(rgb2gray(img))``: BT.709 weights, rint; not the BT.601 weights of the luminance."""
    pure = torch.eye(3).view(3, 3, 1, 1)  # red, green, blue pixels
    assert lk.grey_levels(pure).flatten().tolist() == [54, 182, 18]  # BT.601 would give 76, 150, 29
    img = torch.randint(0, 256, (2, 3, 5, 7), generator=torch.Generator().manual_seed(0)).double() / 255
    want = np.rint(255 * np.einsum("nchw,c->nhw", img.numpy(), [0.2125, 0.7154, 0.0721]))
    np.testing.assert_array_equal(lk.grey_levels(img).numpy(), want)
    np.testing.assert_allclose(lk.luminance_map(pure).flatten().numpy(), np.array([0.299, 0.587, 0.114]) * 85)


def test_a_part_absent_at_step_0_keeps_its_raw_area_change():
    images = torch.full((3, 3, 8, 8), 0.5)
    masks = torch.zeros(3, 8, 8, dtype=torch.long)
    masks[1, :2, :2], masks[2, :3, :4] = 1, 1  # part 1: absent, 4 px, 12 px; part 0 shrinks 64 -> 52
    r, logits = torch.zeros(3, 4), torch.zeros(3, 2)
    row = lk.measure._change_row(0, 0, 0, r, logits, images, masks, torch.ones(4), ("background", "body"), 1.0, 3)
    assert row["body/area"] == 12.0  # the reference divides by 1 when the step-0 area is 0
    assert row["background/area"] == pytest.approx(-12 / 64)


def test_ellipse_eccentricity_closed_form():
    H, W, a, b = 101, 121, 40.0, 16.0
    ys, xs = torch.meshgrid(torch.arange(H) + 0.5, torch.arange(W) + 0.5, indexing="ij")
    mask = ((xs - 60.5) / a) ** 2 + ((ys - 50.5) / b) ** 2 <= 1
    ecc, ori, cx, cy = lk.ellipse_stats(mask)
    assert ecc == pytest.approx(math.sqrt(1 - (b / a) ** 2), abs=5e-3)
    assert abs(ori) < 1e-6 and cx == pytest.approx(60.5) and cy == pytest.approx(50.5)
    ecc_t, ori_t, _, _ = lk.ellipse_stats(mask.T)
    assert ecc_t == pytest.approx(ecc) and ori_t == pytest.approx(90.0)


# ---------------------------------------------------------------------------------------------- §9.5 planted concepts
def test_selectivity_rule_synthetic():
    rng = np.random.default_rng(0)
    n = 20
    table = {"unit": np.arange(n)}
    for p in ("background", "body", "rim"):
        for q in ("area", "luminance"):
            table[lk.part_column(p, q)] = rng.normal(0, 0.01, n)
    table["body/area"][3] = 1.0  # body only: selective
    table["rim/luminance"][7] = 1.0
    table["body/luminance"][7] = 0.9  # both parts alike: not selective
    sel = lk.selectivity(pd.DataFrame(table), measures=("area", "luminance"))
    assert set(zip(sel.unit, sel.part, sel.measure, strict=True)) == {(3, "body", "area")}


ORDER = ("lum", "cx", "const", "area", "cy", "rot")  # the planted units in permuted order


def _planted():
    gen = ShapeRenderer(32, num_classes=3, dtype=F64)
    bg, rim = gen._background, gen._rim_color

    def encode(images: torch.Tensor) -> torch.Tensor:
        n, _, H, W = images.shape
        shape = (images - bg[None, :, None, None]).abs().sum(1) > 1e-9
        body = shape & ((images - rim[None, :, None, None]).abs().sum(1) > 1e-9)
        rows = []
        for i in range(n):
            _, ori, cx, cy = lk.ellipse_stats(shape[i])
            f = {"lum": float(images[i].amax(0)[body[i]].mean()), "cx": cx / W, "cy": cy / H, "const": 1.0,
                 "area": math.sqrt(2 * float(shape[i].sum()) / math.pi) / W, "rot": ((-ori) % 180) / 180}
            rows.append([f[k] for k in ORDER])
        return torch.tensor(rows, dtype=F64)

    def classify(images):
        return torch.tensor([0.0, 0.0, 1.0], dtype=F64).expand(images.shape[0], 3)

    # the linking map, by design the inverse of encode on the renderer's latent (class 2 = ellipse)
    u = {k: i for i, k in enumerate(ORDER)}
    A, b = torch.zeros(6, 6, dtype=F64), torch.zeros(6, dtype=F64)
    A[0, u["area"]], b[0] = 1 / 0.2, -0.1 / 0.2
    A[1, u["cx"]], b[1] = 2.0, -0.5
    A[2, u["cy"]], b[2] = 2.0, -0.5
    b[3] = float(gen.w_avg(2)[3])
    A[4, u["lum"]], b[4] = 1 / 0.65, -0.35 / 0.65
    A[5, u["rot"]] = 1.0
    return gen, encode, classify, lk.LinkingMap(A, b), u


def test_planted_concepts():
    gen, encode, classify, lmap, u = _planted()
    w = torch.cat([gen.sample_w(1, 2, 0.7, s) for s in range(16)])
    r = encode(gen.synthesize(w))
    assert (lmap(r) - w)[:, [1, 2, 4, 5]].abs().max() < 0.03  # the designed inverse is near exact
    mins, maxs, dead = lk.activation_ranges(r)
    assert dead.nonzero().flatten().tolist() == [u["const"]]
    df, _ = lk.sweep_units(gen, lmap, encode, classify, r[:3], torch.full((3,), 2), range(6), mins, maxs, r.std(0))
    summary = lk.summarise_units(df)
    assert u["const"] not in summary["unit"].tolist()
    assert lk.fidelity_rate(summary) == 1.0
    # brightness changes only the body: the luminance unit is selective for exactly (body, luminance)
    sel = lk.selectivity(summary, measures=("luminance",))
    assert set(zip(sel.unit, sel.part, sel.measure, strict=True)) == {(u["lum"], "body", "luminance")}
    # size and position move body and rim together (not part-exclusive), but each is its planted unit's concept
    s = summary.set_index("unit")
    assert s["body/area"].abs().idxmax() == u["area"] and s["rim/area"].abs().idxmax() == u["area"]
    assert s["body/cx"].abs().idxmax() == u["cx"] and s["body/cy"].abs().idxmax() == u["cy"]
    assert s["body/orientation"].abs().idxmax() == u["rot"]
    assert s.loc[u["area"], "body/area"] > 1 and s.loc[u["lum"], "body/luminance"] > 0.1


def test_shape_renderer_masks():
    gen = ShapeRenderer(32, num_classes=3)
    for c in range(3):
        w = gen.sample_w(4, c, 0.7, seed=5)
        assert torch.equal(w, gen.sample_w(4, c, 0.7, seed=5))
        assert torch.equal(gen.sample_w(2, c, 0.0, 1), gen.w_avg(c).expand(2, 6))
        img, masks = gen.synthesize_with_masks(w)
        assert img.shape == (4, 3, 32, 32) and img.dtype == torch.float32 and masks.dtype == torch.int64
        assert img.min() >= 0 and img.max() <= 1
        assert set(masks.unique().tolist()) == {0, 1, 2}
    with pytest.raises(ValueError, match="class_idx"):
        gen.sample_w(1, 3)


# -------------------------------------------------------------------------------------------------- §9.6 counterfactual
def _cf_setup(d=6, C=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    Wh, bh = torch.randn(C, d, generator=g, dtype=F64), torch.randn(C, generator=g, dtype=F64)
    # E o G o L = identity on r: G(w) = reshape(w), L = identity, E(x) = flatten(x)
    gen = LinearGenerator(torch.eye(d, dtype=F64), (1, 1, d), 1)
    encoder = nn.Linear(d, d, bias=False).double()
    with torch.no_grad():
        encoder.weight.copy_(torch.eye(d, dtype=F64))
    head = nn.Linear(d, C).double()
    with torch.no_grad():
        head.weight.copy_(Wh)
        head.bias.copy_(bh)
    lmap = lk.LinkingMap(torch.eye(d, dtype=F64), torch.zeros(d, dtype=F64))

    def check(r_prime):
        return head(encoder(gen.synthesize(lmap(r_prime)).reshape(1, -1)))

    return gen, encoder, head, lmap, check


def test_counterfactual_success_and_failure():
    gen, encoder, head, lmap, check = _cf_setup()
    r = torch.rand(6, generator=torch.Generator().manual_seed(1), dtype=F64) * 3
    origin = int(head(r).argmax())
    target = (origin + 1) % 4
    with torch.inference_mode():
        res = lk.counterfactual(r, origin, target, head.weight, head.bias, lmap, check, max_steps=2000)
    assert res.success and 1 <= res.steps <= 2000 and res.final_pred == target
    assert int(head(torch.relu(r - res.s)).argmax()) == target
    assert len(res.p_t) == res.steps and res.shift_l1 == pytest.approx(float(res.s.abs().sum()))
    # an unreachable target fails after exactly max_steps updates without raising
    W2, b2 = head.weight.detach().clone(), head.bias.detach().clone()
    W2[target] = 0.0
    b2[target] = -1e6
    with torch.no_grad():
        head.weight.copy_(W2)
        head.bias.copy_(b2)
        res2 = lk.counterfactual(r, origin, target, W2, b2, lmap, check, max_steps=50)
    assert not res2.success and res2.steps == 50 and len(res2.p_t) == 50
    for p in [*gen.parameters(), *encoder.parameters(), *head.parameters()]:
        assert p.grad is None
    with pytest.raises(ValueError, match="target"):
        lk.counterfactual(r, origin, 9, W2, b2, lmap, check)


def test_mlp_baseline_runs():
    r, w = _random_pairs(n=64)
    mlp = lk.fit_mlp_baseline(r, w, steps=50)
    scores = lk.evaluate_map(mlp, r, w.float())
    assert set(scores) == {"r2_mean", "r2_pooled", "mse"} and math.isfinite(scores["mse"])
