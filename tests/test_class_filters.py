"""Oracles of spec ``class_filters.md`` §5 for :mod:`featurelens.analysis.class_filters`."""

from __future__ import annotations

import math
import os
import socket
import tempfile
import warnings

import pytest
import torch
from sklearn.metrics import mutual_info_score
from torch import nn

from featurelens.analysis.class_filters import (
    ClassFeatureStats,
    EvalCounts,
    FractionalHistogram,
    decomposed_logits,
    features_per_class,
    fractional_k1,
    gathered_logits,
    head_macs,
    indices_to_mask,
    jaccard_per_class,
    l1_normalise,
    mutual_info,
    n_below,
    noise_corrupt,
    overlap_stats,
    psi,
    select_fraction,
    select_topk,
    topk_membership,
    weight_alignment,
)
from featurelens.analysis.hooks import capture_head_input, find_head

torch.set_num_threads(2)

# --------------------------------------------------------------------------------------------------------------
# Planted model (§5): D = 16, C = 4, k = 3, S_c = {3c, 3c+1, 3c+2}, features 12-15 never used.
# --------------------------------------------------------------------------------------------------------------
D_P, C_P, K_P = 16, 4, 3
PLANTED = torch.tensor([[3 * c + t for t in range(3)] for c in range(C_P)])


def planted_data(seed: int, n_per_class: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    """Constant 2x2 feature maps ``(B, D, 2, 2)`` and labels for the planted model."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(C_P).repeat_interleave(n_per_class)
    u = torch.rand(len(y), D_P, generator=g)
    member = indices_to_mask(PLANTED, D_P)[y]
    a = torch.where(member, 1 + 0.5 * u, 0.4 * u)
    perm = torch.randperm(len(y), generator=g)
    return a[perm, :, None, None].expand(-1, -1, 2, 2).contiguous(), y[perm]


class Planted(nn.Module):
    """Identity "backbone" on the maps, GAP, then a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(D_P, C_P)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(torch.relu(x)), 1))


def indicator_model() -> Planted:
    model = Planted().eval()
    with torch.no_grad():
        model.fc.weight.copy_(indices_to_mask(PLANTED, D_P).float())
        model.fc.bias.zero_()
    return model


def penultimate(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(features, full logits) through the model, features captured at its head."""
    _, head = find_head(model, num_classes=C_P)
    with torch.no_grad(), capture_head_input(head) as feats:
        z = model(x)
    return torch.cat(feats), z


def stats_of(a, y, num_classes=C_P, dim=D_P, ks=(K_P,), fractions=(0.5,), batches=None) -> dict:
    metric = ClassFeatureStats(num_classes, dim, ks=ks, fractions=fractions)
    if batches is None:
        metric.update(a, y)
    else:
        start = 0
        for b in batches:
            metric.update(a[start : start + b], y[start : start + b])
            start += b
        assert start == len(y)
    return {k: v.clone() for k, v in metric.compute().items()}


def sets_of(idx: torch.Tensor) -> list[set[int]]:
    return [set(row.tolist()) for row in idx]


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_planted_recovery_exact_heads_and_streaming(seed):
    x, y = planted_data(seed)
    model = indicator_model()
    a, z = penultimate(model, x)
    assert a.shape == (len(y), D_P)
    s = stats_of(a, y)
    idx = select_topk(s["hist"][0], s["mass"], K_P)
    assert sets_of(idx) == sets_of(PLANTED)
    assert torch.equal(s["hist"][0].sum(1), 3 * s["count"]) and s["count"].tolist() == [24] * C_P

    # W = indicator, b = 0: the decomposed head is the full head, and both are perfect.
    mask = indices_to_mask(idx, D_P)
    zd = decomposed_logits(a, model.fc.weight, model.fc.bias, mask)
    assert torch.equal(zd, z)
    ev = EvalCounts(C_P, n_heads=2)
    ev.update([z, zd], y)
    out = ev.compute()
    assert out["acc"].tolist() == [1.0, 1.0] and torch.equal(out["correct"][0], out["total"])

    # Streaming in batches of varied size gives the states of one batch.
    sizes = [7, 1, 13, 30, 0, len(y) - 51]
    s2 = stats_of(a, y, batches=sizes)
    for key in ("hist", "count", "skipped", "nhist"):
        assert torch.equal(s[key], s2[key]), key
    for key in ("mass", "captured"):
        torch.testing.assert_close(s[key], s2[key], rtol=1e-12, atol=0)

    # Any other W changes nothing: the score ignores weights.
    with torch.no_grad():
        model.fc.weight.copy_(torch.randn(C_P, D_P, generator=torch.Generator().manual_seed(seed)))
        model.fc.bias.normal_()
    a_rand, _ = penultimate(model, x)
    s3 = stats_of(a_rand, y)
    assert torch.equal(s3["hist"], s["hist"])
    assert torch.equal(select_topk(s3["hist"][0], s3["mass"], K_P), idx)


def test_k_equals_d_is_the_full_head():
    x, y = planted_data(7)
    model = Planted().eval()
    torch.manual_seed(0)
    a, z = penultimate(model, x)
    s = stats_of(a, y, ks=(D_P, 40))  # 40 is clipped to D
    assert torch.equal(s["hist"][0], s["hist"][1])
    for r in range(2):
        idx = select_topk(s["hist"][r], s["mass"], D_P)
        w, b = model.fc.weight.detach(), model.fc.bias.detach()
        mask = indices_to_mask(idx, D_P)
        assert bool(mask.all())
        zd = decomposed_logits(a, w, b, mask)
        zg = gathered_logits(a, w, b, idx)
        tol = 1e-5 * float(z.abs().max())
        assert float((zd - z).abs().max()) <= tol and float((zg - z).abs().max()) <= tol
        assert torch.equal(zd.argmax(1), z.argmax(1)) and torch.equal(zg.argmax(1), z.argmax(1))
    torch.testing.assert_close(s["captured"][0], s["count"].double(), rtol=1e-12, atol=0)  # mu_c(D) = 1


def test_scaling_invariance_and_gather_equals_mask():
    g = torch.Generator().manual_seed(3)
    a = torch.rand(200, 32, generator=g, dtype=torch.float64) ** 3  # skewed, non-negative
    a[:, 5] = 0.0  # a dead filter
    y = torch.randint(0, 6, (200,), generator=g)
    alpha = torch.exp(3 * torch.randn(200, 1, generator=g, dtype=torch.float64))
    p1, k1 = l1_normalise(a)
    p2, k2 = l1_normalise(alpha * a)
    assert k1.all() and k2.all()
    torch.testing.assert_close(p1, p2, rtol=1e-12, atol=1e-15)
    s1 = stats_of(a, y, num_classes=6, dim=32, ks=(1, 4, 9), fractions=(0.3, 0.5))
    s2 = stats_of(alpha * a, y, num_classes=6, dim=32, ks=(1, 4, 9), fractions=(0.3, 0.5))
    for key in ("hist", "count", "nhist"):
        assert torch.equal(s1[key], s2[key]), key
    assert int(s1["hist"][:, :, 5].sum()) == 0  # zero entries are never selected
    for r, k in enumerate((1, 4, 9)):
        i1 = select_topk(s1["hist"][r], s1["mass"], k)
        assert torch.equal(i1, select_topk(s2["hist"][r], s2["mass"], k))
        w = torch.randn(6, 32, generator=g, dtype=torch.float64)
        b = torch.randn(6, generator=g, dtype=torch.float64)
        zm = decomposed_logits(a, w, b, indices_to_mask(i1, 32))
        zg = gathered_logits(a, w, b, i1)
        torch.testing.assert_close(zg, zm, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(gathered_logits(a, w, None, i1), zm - b, rtol=1e-12, atol=1e-12)


def test_topk_membership_ties_zeros_and_n_below():
    p = torch.tensor([[0.25, 0.25, 0.25, 0.25, 0.0], [0.5, 0.0, 0.5, 0.0, 0.0], [0.0] * 5], dtype=torch.float64)
    m = topk_membership(p, 2)
    assert m.tolist()[0] == [True, True, False, False, False]  # ties -> lower index
    assert m.tolist()[1] == [True, False, True, False, False]
    assert m.tolist()[2] == [False] * 5  # zeros never count
    assert topk_membership(p, 3)[1].sum() == 2  # T_i(3) holds only the two positive entries
    assert n_below(p, 0.5).tolist() == [1, 0, 5]
    assert n_below(p, 0.6).tolist() == [2, 1, 5]


def test_skipped_images_and_negative_features_warn_once():
    a = torch.tensor([[1.0, 0.0, 2.0], [0.0, 0.0, 0.0], [-3.0, 1.0, 0.0], [0.0, -1.0, 0.0]])
    y = torch.tensor([0, 1, 1, 0])
    metric = ClassFeatureStats(2, 3, ks=(1,), fractions=(0.5,))
    with pytest.warns(UserWarning, match="negative features"):
        metric.update(a, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        metric.update(a, y)  # warned once per instance
    s = metric.compute()
    assert int(s["skipped"]) == 2 and s["count"].tolist() == [4, 2]
    assert s["hist"][0].tolist() == [[0, 2, 2], [2, 0, 0]]  # |a| ranks feature 0 first for the 3rd row
    with pytest.raises(ValueError, match="labels"):
        metric.update(a, torch.tensor([0, 1, 2, 0]))
    with pytest.raises(ValueError, match="shape"):
        metric.update(torch.ones(4, 5), y)


# --------------------------------------------------------------------------------------------------------------
# Fractional oracle (§5)
# --------------------------------------------------------------------------------------------------------------
FRAC_ROWS = torch.tensor(
    [[0.4, 0.3, 0.2, 0.1, 0, 0]] * 9 + [[0.3, 0.4, 0.2, 0.1, 0, 0]] * 7 + [[0.3, 0.2, 0.4, 0.1, 0, 0]] * 4,
    dtype=torch.float64,
)


def test_fractional_oracle():
    y = torch.zeros(20, dtype=torch.int64)
    s = stats_of(FRAC_ROWS, y, num_classes=1, dim=6, ks=(2,), fractions=(0.5, 0.3))
    # integer k = 2
    assert s["hist"][0, 0].tolist() == [20, 16, 4, 0, 0, 0]
    assert sets_of(select_topk(s["hist"][0], s["mass"], 2)) == [{0, 1}]
    # n_i(0.5) = 1 and n_i(0.3) = 0 for every image
    assert n_below(FRAC_ROWS, 0.5).tolist() == [1] * 20 and n_below(FRAC_ROWS, 0.3).tolist() == [0] * 20
    assert s["nhist"][0, 0, 1] == 20 and s["nhist"][1, 0, 0] == 20
    k1 = fractional_k1(s["nhist"])
    assert k1.tolist() == [[1], [1]]  # f = 0.3: floor(0) = 0, the guard gives 1
    fh = FractionalHistogram(k1, dim=6)
    fh.update(FRAC_ROWS[:11], y[:11])
    fh.update(FRAC_ROWS[11:], y[11:])
    h = fh.compute()
    assert h[0, 0].tolist() == [9, 7, 4, 0, 0, 0] and torch.equal(h[0], h[1])
    q = h[0, 0].double() / h[0, 0].sum()
    torch.testing.assert_close(q, torch.tensor([0.45, 0.35, 0.2, 0, 0, 0], dtype=torch.float64))
    for r, f in enumerate((0.5, 0.3)):
        mask = select_fraction(h[r], f)
        assert mask[0].nonzero().flatten().tolist() == [0, 1]
    # K_i(0.5) = 2, Psi = 5/6 (median and mean)
    assert features_per_class(s["nhist"][0]).tolist() == [2.0]
    psi_med, psi_mean = psi(s["nhist"][0], 6)
    assert psi_med.tolist() == pytest.approx([5 / 6]) and psi_mean.tolist() == pytest.approx([5 / 6])
    # lazily sized state (no dim given) gives the same histogram
    lazy = FractionalHistogram(k1)
    lazy.update(FRAC_ROWS, y)
    assert torch.equal(lazy.compute(), h)


def test_fractional_selection_rules():
    hist = torch.tensor([[5, 5, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1], [7, 0, 2, 1]])
    m = select_fraction(hist, 0.5)
    assert m[0].tolist() == [True, False, False, False]  # tie: the higher index is dropped first
    assert m[1].tolist() == [False] * 4  # empty histogram -> empty set
    assert m[2].tolist() == [True, True, False, False]
    assert m[3].tolist() == [True, False, False, False]  # 0.1 + 0.2 <= 0.5
    assert select_fraction(hist, 0.0)[3].tolist() == [True, False, True, True]  # f_hist = 0 drops zeros only
    # per-class depth k1 in the second pass, and the exact integer floor of the mean
    nhist = torch.zeros(1, 3, 5, dtype=torch.int64)
    nhist[0, 0, 2], nhist[0, 0, 3] = 1, 1  # mean 2.5 -> 2
    nhist[0, 1, 4] = 3  # mean 4
    assert fractional_k1(nhist).tolist() == [[2, 4, 1]]  # class 2 has no images -> 1
    fh = FractionalHistogram(torch.tensor([[1, 3]]), dim=4)
    fh.update(torch.tensor([[4.0, 3, 2, 1], [4.0, 3, 2, 1]]), torch.tensor([0, 1]))
    assert fh.compute()[0].tolist() == [[1, 0, 0, 0], [1, 1, 1, 0]]
    # medians: lower median for even counts, NaN for empty classes
    nh = torch.tensor([[0, 2, 0, 2, 0], [0, 0, 0, 0, 0], [1, 1, 1, 0, 0]])
    k = features_per_class(nh)
    assert k[0] == 2 and math.isnan(k[1]) and k[2] == 2
    med, mean = psi(nh, 4)
    assert med[0] == pytest.approx(3 / 4) and mean[0] == pytest.approx(2 / 4) and mean[2] == pytest.approx(3 / 4)


# --------------------------------------------------------------------------------------------------------------
# Mutual information, overlap, cost (§5)
# --------------------------------------------------------------------------------------------------------------
def two_sets(D: int, k: int, o: int) -> torch.Tensor:
    mask = torch.zeros(2, D, dtype=torch.bool)
    mask[0, :k] = True
    mask[1, k - o : 2 * k - o] = True
    return mask


def sk_mi(u: torch.Tensor, v: torch.Tensor) -> float:
    return mutual_info_score(u.int().tolist(), v.int().tolist())


def test_mutual_info_closed_form():
    hb = -(5 / 64) * math.log(5 / 64) - (59 / 64) * math.log(59 / 64)
    assert hb == pytest.approx(0.274166, abs=5e-7)
    expected = [0.00663, 0.00654, 0.03629, 0.08511, 0.15587]
    for o, want in enumerate(expected):
        mask = two_sets(64, 5, o)
        mi = mutual_info(mask)
        assert mi["mi_excl_self"] == pytest.approx(want, abs=5e-6)
        assert mi["mi_excl_self"] == pytest.approx(sk_mi(mask[0], mask[1]), abs=1e-12)
        assert mi["mi_incl_self"] == pytest.approx((2 * hb + 2 * mi["mi_excl_self"]) / 4, abs=1e-12)
    assert mutual_info(two_sets(64, 5, 5))["mi_excl_self"] == pytest.approx(hb, abs=1e-12)
    # the identity MI_incl = H_b/C + (1 - 1/C) MI_excl for equal set sizes
    g = torch.Generator().manual_seed(0)
    C, D, k = 7, 64, 5
    idx = torch.stack([torch.randperm(D, generator=g)[:k] for _ in range(C)])
    mi = mutual_info(indices_to_mask(idx, D))
    assert mi["mi_incl_self"] == pytest.approx(hb / C + (1 - 1 / C) * mi["mi_excl_self"], abs=1e-12)
    # any sizes, including empty and full sets, against sklearn
    mask = torch.rand(6, 20, generator=g) < torch.tensor([0.0, 0.1, 0.3, 0.5, 0.9, 1.0])[:, None]
    mask[0], mask[5] = False, True
    mi = mutual_info(mask)
    pair = [[sk_mi(mask[i], mask[j]) for j in range(6)] for i in range(6)]
    incl = sum(map(sum, pair)) / 36
    excl = sum(pair[i][j] for i in range(6) for j in range(6) if i != j) / 30
    assert mi["mi_incl_self"] == pytest.approx(incl, abs=1e-12)
    assert mi["mi_excl_self"] == pytest.approx(excl, abs=1e-12)


AUTHORS_RESNET20_K5 = [
    [7, 23, 54, 50, 22],
    [9, 47, 40, 55, 6],
    [1, 23, 13, 61, 53],
    [17, 57, 49, 53, 59],
    [46, 48, 57, 61, 25],
    [63, 37, 13, 42, 49],
    [56, 52, 9, 48, 61],
    [53, 16, 25, 0, 56],
    [9, 2, 29, 21, 22],
    [21, 8, 55, 54, 40],
]


def test_authors_sets_regression():
    idx = torch.tensor(AUTHORS_RESNET20_K5)
    mask = indices_to_mask(idx, 64)
    mi = mutual_info(mask)
    assert mi["mi_incl_self"] == pytest.approx(0.034538, abs=5e-7)
    assert mi["mi_excl_self"] == pytest.approx(0.007912, abs=5e-7)
    ov = overlap_stats(mask)
    assert ov["union"] == 32 and ov["overlap_mean"] == pytest.approx(21 / 45) and round(ov["overlap_mean"], 4) == 0.4667
    assert ov["set_size_mean"] == 5
    assert head_macs(mask, 10, 64) == (640, 50, 12.8)
    assert head_macs(idx, 10, 64) == (640, 50, 12.8)


def test_overlap_jaccard_and_alignment():
    mask = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 0, 0]], dtype=torch.bool)
    ov = overlap_stats(mask)
    assert ov["union"] == 3 and ov["overlap_mean"] == pytest.approx(1 / 3)
    assert ov["jaccard_mean"] == pytest.approx((1 / 3 + 0 + 0) / 3)
    assert math.isnan(overlap_stats(mask[:1])["overlap_mean"])
    other = torch.tensor([[1, 0, 0, 0], [0, 1, 1, 0], [0, 0, 0, 0]], dtype=torch.bool)
    assert jaccard_per_class(mask, other).tolist() == [0.5, 1.0, 1.0]  # two empty sets are identical
    w = torch.tensor([[3.0, 1.0, 2.0, 0.0], [0.0, 5.0, 4.0, 3.0], [1.0, 2.0, 3.0, 4.0]])
    assert weight_alignment(w, mask) == pytest.approx(3 / 4)  # row 0: {0,2} vs {0,1}; row 1: {1,2} exact


@pytest.mark.parametrize(
    ("C", "D", "k", "dec", "factor"),
    [
        (10, 64, 5, 50, 12.8),
        (10, 64, 10, 100, 6.4),
        (10, 64, 20, 200, 3.2),
        (1000, 2048, 50, 50_000, 40.96),
        (1000, 2048, 64, 64_000, 32.0),
        (1000, 4096, 50, 50_000, 81.92),
    ],
)
def test_head_mac_arithmetic(C, D, k, dec, factor):
    full, d, r = head_macs(k, C, D)
    assert (full, d) == (C * D, dec) and r == pytest.approx(factor)
    assert head_macs([k] * C, C, D) == (full, d, r) == head_macs(torch.full((C,), k), C, D)


# --------------------------------------------------------------------------------------------------------------
# Essentiality (noise) test (§2.6)
# --------------------------------------------------------------------------------------------------------------
def test_noise_at_s_hurts_far_more_than_noise_elsewhere():
    x, y = planted_data(11, n_per_class=250)
    model = indicator_model()
    a, _ = penultimate(model, x)
    s = stats_of(a, y)
    mask = indices_to_mask(select_topk(s["hist"][0], s["mass"], K_P), D_P)
    a_s, a_rest = noise_corrupt(a, y, mask, torch.Generator().manual_seed(0))
    member = mask[y]
    assert torch.equal(a_s[~member], a[~member]) and torch.equal(a_rest[member], a[member])
    assert float(a_s[member].std()) == pytest.approx(1.0, abs=0.1)  # replaced by N(0,1), not added
    ev = EvalCounts(C_P, n_heads=2)
    with torch.no_grad():
        ev.update([model.fc(a_s), model.fc(a_rest)], y)
    acc_s, acc_rest = ev.compute()["acc"].tolist()
    assert acc_rest > 0.85 and acc_s < 0.6 and acc_rest - acc_s > 0.4
    a_s2, _ = noise_corrupt(a, y, mask, torch.Generator().manual_seed(0))
    assert torch.equal(a_s, a_s2)  # seeded


# --------------------------------------------------------------------------------------------------------------
# DDP: 2 gloo processes on CPU give the single-process states exactly.
# --------------------------------------------------------------------------------------------------------------
DDP_C, DDP_D, DDP_KS, DDP_FS = 5, 12, (1, 3, 12), (0.3, 0.5, 0.8)


def ddp_data() -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Dyadic features (integer entries, row sums 128) so that every float sum is exact in any order."""
    g = torch.Generator().manual_seed(5)
    n = 61
    a = torch.randint(0, 10, (n, DDP_D), generator=g).double()
    a[:, 0] = 0.0
    a[:, 0] = 128.0 - a.sum(1)
    rows = torch.arange(n)
    cols = torch.randint(0, DDP_D, (n,), generator=g)
    a[rows, 0], a[rows, cols] = a[rows, cols].clone(), a[rows, 0].clone()  # the filler at a random position
    a[[3, 40]] = 0.0  # skipped images
    y = torch.randint(0, DDP_C, (n,), generator=g)
    logits = [torch.randn(n, DDP_C, generator=g) for _ in range(3)]
    return a, y, logits


def _update_all(a, y, logits, k1, **kw):
    stats = ClassFeatureStats(DDP_C, DDP_D, ks=DDP_KS, fractions=DDP_FS, **kw)
    ev = EvalCounts(DDP_C, n_heads=3, **kw)
    fh = FractionalHistogram(k1, dim=DDP_D, **kw)
    stats.update(a, y)
    ev.update(logits, y)
    fh.update(a, y)
    return stats, ev, fh


def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        a, y, logits = ddp_data()
        k1 = torch.tensor([[1, 2, 3, 1, 2], [2, 2, 1, 1, 4], [5, 1, 1, 3, 2]])
        part = slice(0, 25) if rank == 0 else slice(25, None)  # uneven halves
        stats, ev, fh = _update_all(a[part], y[part], [z[part] for z in logits], k1)
        out = {f"stats/{k}": v.clone() for k, v in stats.compute().items()}
        out |= {f"eval/{k}": v.clone() for k, v in ev.compute().items()}
        out["frac/hist"] = fh.compute().clone()
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_sync_equals_single_process():
    import torch.multiprocessing as mp

    a, y, logits = ddp_data()
    k1 = torch.tensor([[1, 2, 3, 1, 2], [2, 2, 1, 1, 4], [5, 1, 1, 3, 2]])
    stats, ev, fh = _update_all(a, y, logits, k1)
    ref = {f"stats/{k}": v for k, v in stats.compute().items()}
    ref |= {f"eval/{k}": v for k, v in ev.compute().items()}
    ref["frac/hist"] = fh.compute()
    assert int(ref["stats/skipped"]) == 2
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_ddp_worker, args=(2, _free_port(), tmp), nprocs=2, join=True)
        for rank in range(2):
            got = torch.load(os.path.join(tmp, f"rank{rank}.pt"))
            assert got.keys() == ref.keys()
            for key, want in ref.items():
                assert got[key].dtype == want.dtype and torch.equal(got[key], want), (rank, key)


# --------------------------------------------------------------------------------------------------------------
# Model plumbing
# --------------------------------------------------------------------------------------------------------------
def test_find_head_and_capture_on_torchvision_models():
    from torchvision.models import resnet18, vgg11

    torch.manual_seed(0)
    model = resnet18(weights=None, num_classes=10).eval()
    name, head = find_head(model)
    assert name == "fc" and head is model.fc
    assert find_head(model, num_classes=10)[0] == "fc"
    assert find_head(model, head_module="fc")[1] is model.fc
    with pytest.raises(ValueError, match=r"'layer4' is a Sequential, not an nn.Linear"):
        find_head(model, head_module="layer4")
    with pytest.raises(ValueError, match="no submodule 'nope'"):
        find_head(model, head_module="nope")
    with pytest.raises(ValueError, match="has no final nn.Linear with out_features=1000"):
        find_head(model, num_classes=1000)

    grid: list[torch.Tensor] = []
    x = torch.rand(2, 3, 64, 64)
    handle = model.layer4.register_forward_hook(lambda m, i, o: grid.append(o))
    with torch.no_grad(), capture_head_input(model.fc) as feats:
        z = model(x)
    handle.remove()
    assert len(model.fc._forward_pre_hooks) == 0  # removed on exit
    assert len(feats) == 1 and feats[0].shape == (2, 512) and grid[0].shape[-2:] == (2, 2)
    torch.testing.assert_close(feats[0], grid[0].mean((2, 3)))
    torch.testing.assert_close(model.fc(feats[0]), z)

    with torch.device("meta"):
        vgg = vgg11(weights=None)
    assert find_head(vgg)[0] == "classifier.6" and find_head(vgg, num_classes=1000)[0] == "classifier.6"

    class NoLinear(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

    with pytest.raises(ValueError) as err:
        find_head(NoLinear())
    assert str(err.value) == (
        "NoLinear has no final nn.Linear; expected an nn.Linear head over penultimate features "
        "(set the analysis' head_module)"
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_planted_pipeline_on_gpu_matches_cpu():
    x, y = planted_data(0)
    a = x.mean((2, 3))
    s_cpu = stats_of(a, y)
    metric = ClassFeatureStats(C_P, D_P, ks=(K_P,)).cuda()
    metric.update(a.cuda(), y.cuda())
    s_gpu = metric.compute()
    for key in ("hist", "count", "nhist"):
        assert torch.equal(s_gpu[key].cpu(), s_cpu[key])
    torch.testing.assert_close(s_gpu["mass"].cpu(), s_cpu["mass"], rtol=1e-12, atol=1e-12)
    idx = select_topk(s_gpu["hist"][0], s_gpu["mass"], K_P)
    assert sets_of(idx.cpu()) == sets_of(PLANTED)
    k1 = fractional_k1(s_gpu["nhist"])
    fh = FractionalHistogram(k1, dim=D_P).cuda()
    fh.update(a.cuda(), y.cuda())
    assert select_fraction(fh.compute()[0], 0.5).any(1).all()
    w = torch.randn(C_P, D_P, device="cuda")
    mask = indices_to_mask(idx, D_P)
    torch.testing.assert_close(gathered_logits(a.cuda(), w, None, idx), decomposed_logits(a.cuda(), w, None, mask))
    a_s, _ = noise_corrupt(a.cuda(), y.cuda(), mask, torch.Generator().manual_seed(0))
    assert a_s.device.type == "cuda"
    assert 0.0 <= weight_alignment(w, mask) <= 1.0
