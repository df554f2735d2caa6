"""Network dissection (spec dissection.md §2, oracles §6): streaming == brute force, planted units, rotation."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from featurelens.analysis.dissection import (
    IoUTally,
    TopImages,
    UnitQuantiles,
    counts_from_tally,
    default_layer,
    dissect,
    iou,
    make_quantiles,
    random_init_copy,
    random_rotation,
    unique_detectors,
    unit_labels,
    unit_masks,
)
from featurelens.analysis.hooks import onednn_forward
from featurelens.data.broden import BrodenDataset
from featurelens.data.synthbroden import write_synthbroden
from featurelens.models import build_model

torch.set_num_threads(2)
N_IMAGES, SIZE = 20, 32


@pytest.fixture(scope="module")
def broden(tmp_path_factory):
    root = write_synthbroden(tmp_path_factory.mktemp("synthbroden"), n_images=N_IMAGES, size=SIZE, seed=0)
    ds = BrodenDataset(root)
    items = [ds[i] for i in range(len(ds))]
    return ds, items


@pytest.fixture(scope="module")
def broden64(tmp_path_factory):
    """64 px (masks 32x32, planted maps 16x16): 32 px masks are too coarse for 2x pooled blobs (IoU ~0.5)."""
    root = write_synthbroden(tmp_path_factory.mktemp("synthbroden64"), n_images=N_IMAGES, size=64, seed=0)
    ds = BrodenDataset(root)
    return ds, [ds[i] for i in range(len(ds))]


class ListData(torch.utils.data.Dataset):
    def __init__(self, items, categories, label_names):
        self.items, self.categories, self.label_names = items, categories, label_names

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def _label_masks(labels, sh, sw, num_labels):
    """Brute force L_c(x) (C+1, sh, sw) bool: OR over layers, image-level = whole grid, label 0 dropped."""
    L = np.zeros((num_labels, sh, sw), dtype=bool)
    for t in labels.values():
        t = t.numpy()
        if t.ndim == 1:
            for c in t:
                L[c] = True
        else:
            for layer in t:
                for c in np.unique(layer):
                    L[c] |= layer == c
    L[0] = False
    return L


def _brute_force(acts, labels, T, num_labels, prim, K):
    U = acts.shape[1]
    I = np.zeros((U, num_labels), np.int64)
    G = np.zeros(num_labels, np.int64)
    Ap = np.zeros((U, K), np.int64)
    Al = np.zeros((U, K), np.int64)
    for x in range(acts.shape[0]):
        sh, sw = next(t.shape[-2:] for t in labels[x].values() if t.ndim == 3)
        L = _label_masks(labels[x], sh, sw, num_labels)
        S = F.interpolate(acts[x:x + 1].float(), size=(sh, sw), mode="bilinear", align_corners=False)[0]
        S = S.numpy().astype(np.float64)
        present_cats = {prim[c] for c in range(1, num_labels) if L[c].any() and prim[c] >= 0}
        for k in range(U):
            M = S[k] > T[k]
            for kap in present_cats:
                Ap[k, kap] += M.sum()
            overl = set()
            for c in range(1, num_labels):
                inter = int((M & L[c]).sum())
                I[k, c] += inter
                if inter > 0 and prim[c] >= 0:
                    overl.add(prim[c])
            for kap in overl:
                Al[k, kap] += M.sum()
        G += L.reshape(num_labels, -1).sum(1)
    return I, G, Ap, Al


class CountingBroden(BrodenDataset):
    """Counts its mask reads."""

    mask_reads = 0

    def load_labels(self, i):
        self.mask_reads += 1
        return super().load_labels(i)


# what pass 1 keeps within cache_bytes -> (forward passes, labels cached, mask reads beyond the N of one pass)
CACHE_MODES = {"everything": (1, True, 1), "activations": (1, False, 1),
               "labels dropped midway": (1, False, 1 + N_IMAGES), "nothing": (2, False, 0)}


def _cache_budget(mode: str, ds, items) -> int:
    """A cache_bytes that puts dissect of ``items`` (4 units of 8x8 float32 maps) in ``mode``."""
    from featurelens.analysis.dissection import parse_labels

    acts, labels = 4 * 8 * 8 * 4 * len(items), [parse_labels(lab).nbytes for _, lab in items]
    budget = {"everything": 2**30, "activations": acts, "labels dropped midway": acts + sum(labels) - 1,
              "nothing": 0}[mode]
    if mode == "labels dropped midway":  # the first image's labels times N fit: pass 1 reads them, then overflows
        assert labels[0] * len(items) <= budget
    if mode == "activations":
        assert labels[0] * len(items) > budget
    return budget


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("mode", list(CACHE_MODES))
@pytest.mark.parametrize("source", ["list", "broden"])
def test_streaming_equals_brute_force(broden, source, mode, threads):
    """Every path (pass 1 keeping the activations and the parsed labels, only the activations, the labels
    dropped once over budget, or nothing: a second forward pass) on a plain dataset and on a BrodenDataset
    (whose passes decode only what they need), one batch at a time or three (one image each, in threads),
    equal the brute force, reading the masks as often as said."""
    ds, items = broden
    data = CountingBroden(ds.root) if source == "broden" else ListData(items, ds.categories, ds.label_names)
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 3, stride=4, padding=1)  # 32 px -> 8x8 raw maps, masks 16x16
    res = dissect(conv, conv, data, ds.num_labels, ds.primary_category, q=0.05, batch_size=3,
                  cache_bytes=_cache_budget(mode, ds, items), threads=threads)
    passes, labels_cached, extra_reads = CACHE_MODES[mode]
    assert (res["forward_passes"], res["labels_cached"]) == (passes, labels_cached)
    if source == "broden":
        assert data.mask_reads == N_IMAGES + extra_reads  # + the first image's, to size the label cache

    with torch.no_grad():
        acts = conv(torch.stack([x for x, _ in items]))
    raw = acts.transpose(0, 1).reshape(4, -1).double().numpy()
    expect_T = np.quantile(raw, 0.95, axis=1, method="linear")
    np.testing.assert_allclose(res["thresholds"].numpy(), expect_T, rtol=1e-6)

    K = len(ds.categories)
    I, G, Ap, Al = _brute_force(acts, [lab for _, lab in items], res["thresholds"].numpy(), ds.num_labels,
                                ds.primary_category, K)
    t = res["tally"]
    assert torch.equal(t["intersection"], torch.from_numpy(I))
    assert torch.equal(t["label_count"], torch.from_numpy(G))
    assert torch.equal(t["act_paper"], torch.from_numpy(Ap))
    assert torch.equal(t["act_lite"], torch.from_numpy(Al))
    # label 0 never counts; bounds; lite >= paper
    assert int(t["label_count"][0]) == 0 and int(t["intersection"][:, 0].abs().sum()) == 0
    ip, il = res["iou"], iou(t, ds.primary_category, "lite")
    assert (ip[:, 0] == 0).all() and (ip >= 0).all() and (ip <= 1).all()
    assert (il >= ip - 1e-12).all()
    # table layout
    tab = res["table"]
    assert list(tab.columns[:4]) == ["unit", "category", "label", "score"]
    assert "object-iou" in tab.columns and "color-truth" in tab.columns
    assert sorted(tab["unit"]) == [1, 2, 3, 4] and tab["score"].is_monotonic_decreasing


def test_threads_and_the_onednn_layout_give_bitwise_the_plain_one_thread_result(broden, monkeypatch):
    """The small CNN's last block on the CPU, its batch norms with trained-like statistics: the default (torch's
    threads, batches side by side, oneDNN's layout) and 2 threads with 2 DataLoader workers give bitwise the
    thresholds, tallies and top images of one batch at a time on the plain forward; with threads, oneDNN's check
    runs as the batches do (one intra-op thread, the two forwards at once)."""
    ds, _ = broden
    torch.manual_seed(0)
    model = build_model("small_cnn", 10).eval()
    for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2), bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.5, 0.5)
    layer = model.get_submodule(default_layer(model))
    kw = {"q": 0.01, "batch_size": 8, "topn": 3}
    fast = dissect(model, layer, ds, ds.num_labels, ds.primary_category, **kw)
    checked = []  # (intra-op threads, concurrent) of the oneDNN check: as the batches run

    def spy(model, record, x, concurrent=False):
        checked.append((torch.get_num_threads(), concurrent))
        return onednn_forward(model, record, x, concurrent)

    monkeypatch.setattr("featurelens.analysis.dissection.measure.onednn_forward", spy)
    workers = dissect(model, layer, ds, ds.num_labels, ds.primary_category, threads=2, num_workers=2, **kw)
    assert fast["onednn"] and workers["onednn"] and checked == [(1, True)]
    monkeypatch.setattr("featurelens.analysis.dissection.measure.onednn_forward",
                        lambda model, record, x, concurrent=False: contextlib.nullcontext((False, record(model, x))))
    plain = dissect(model, layer, ds, ds.num_labels, ds.primary_category, threads=1, **kw)
    assert not plain["onednn"]
    for res in (fast, workers):
        assert torch.equal(res["thresholds"], plain["thresholds"])
        assert all(torch.equal(res["tally"][k], plain["tally"][k]) for k in plain["tally"])
        assert torch.equal(res["top_images"], plain["top_images"])


def test_dataloader_workers_are_read_as_the_batches_are_taken(broden, monkeypatch):
    """With DataLoader workers the batches are read as the threads take them (at most 2 per thread ahead of the
    in-order updates), not all at once: memory stays independent of the number of images."""
    ds, _ = broden
    yielded, lead = [0], []

    class CountingLoader(torch.utils.data.DataLoader):
        def __iter__(self):
            for batch in super().__iter__():
                yielded[0] += 1
                yield batch

    update = TopImages.update

    def counting_update(self, acts, index):  # pass 1's in-order update in the calling thread, once a batch
        lead.append(yielded[0] - len(lead) - 1)
        return update(self, acts, index)

    monkeypatch.setattr(torch.utils.data, "DataLoader", CountingLoader)
    monkeypatch.setattr(TopImages, "update", counting_update)
    conv = torch.nn.Conv2d(3, 4, 3, stride=4, padding=1)
    dissect(conv, conv, ds, ds.num_labels, ds.primary_category, q=0.05, batch_size=4, threads=2, num_workers=1,
            topn=2)
    assert len(lead) == N_IMAGES // 2 and max(lead) <= 2 * 2  # batches of 2 images, 2 per thread in flight


def test_quantiles_streaming_and_per_unit_q():
    g = torch.Generator().manual_seed(0)
    chunks = [torch.randn(5, 3, 4, 4, generator=g) for _ in range(4)]
    q = [0.01, 0.1, 0.3]
    m = UnitQuantiles(3, 4 * 5 * 16, q)
    for c in chunks:
        m.update(c)
    allv = torch.cat(chunks).transpose(0, 1).reshape(3, -1).double().numpy()
    expect = [np.quantile(allv[k], 1 - q[k], method="linear") for k in range(3)]
    np.testing.assert_allclose(m.compute().numpy(), expect, rtol=1e-9)


def test_label_zero_and_image_level():
    prim = np.array([-1, 0, 1])
    t = IoUTally(1, 3, prim, num_categories=2)
    acts = torch.zeros(1, 1, 2, 2)
    acts[0, 0, 0, 0] = 1.0
    labels = [{"object": torch.tensor([[[0, 1], [0, 0]]]), "scene": torch.tensor([2])}]
    t.update(acts, labels, torch.tensor([0.5]), mask_size=(2, 2))
    d = t.compute()
    assert d["label_count"].tolist() == [0, 1, 4]
    M = (F.interpolate(acts, size=(2, 2), mode="bilinear", align_corners=False) > 0.5).sum().item()
    assert d["intersection"][0].tolist() == [0, 0, M]


def _planted(items, ds, n_noise=4, seed=0, noise_std=None):
    """Per image: channel j = 2x2 average-pooled ground-truth mask of concept c_j; then noise channels, uniform
    on [0, 1], or N(0, noise_std²) when ``noise_std`` is given."""
    num_labels = ds.num_labels
    blob = {ds.categories.index(c) for c in ("object", "material")}  # parts (rims) are too thin for 2x pooling
    pix = [(lab, next(t.shape[-2:] for t in lab.values() if t.ndim == 3)) for _, lab in items]
    masks = [torch.from_numpy(_label_masks(lab, sh, sw, num_labels)) for lab, (sh, sw) in pix]
    cover = torch.stack(masks).float().mean(dim=(0, 2, 3))  # dataset pixel fraction per label
    cats = {c for _, lab in items for cat, t in lab.items() if t.ndim == 3 for c in t.unique().tolist()}
    # pixel concepts with coverage in [0.8%, 4%]: detectable (coverage < q/tau needs q ~ coverage, spec §3.3)
    concepts = [c for c in range(1, num_labels) if c in cats and ds.primary_category[c] in blob
                and 0.008 <= cover[c] <= 0.04][:4]
    g = torch.Generator().manual_seed(seed)
    new = []
    for (_, lab), L in zip(items, masks, strict=True):
        planted = F.avg_pool2d(L[concepts].float()[None], 2)[0]
        if noise_std is None:
            noise = torch.rand(n_noise, *planted.shape[-2:], generator=g)
        else:
            noise = noise_std * torch.randn(n_noise, *planted.shape[-2:], generator=g)
        new.append((torch.cat([planted, noise]), lab))
    q = [float(cover[c]) for c in concepts] + [0.01] * n_noise
    return new, concepts, q


def test_planted_units_recovered(broden64):
    ds, items = broden64
    new, concepts, q = _planted(items, ds)
    assert len(concepts) >= 3
    ident = torch.nn.Identity()
    res = dissect(ident, ident, ListData(new, ds.categories, ds.label_names), ds.num_labels,
                  ds.primary_category, q=q, batch_size=6)
    lab = res["labels"]
    for j, c in enumerate(concepts):
        assert int(lab["label"][j]) == c, (j, c, ds.label_names[c])
        assert float(lab["score"][j]) > 0.5
    assert (lab["score"][len(concepts):] < 0.04).all()
    counts = res["counts"]
    assert counts["unique_B"] >= counts["unique_A"] >= len(concepts)
    assert (res["iou"][:, 0] == 0).all()


def test_rotation_baseline(broden64):
    """Spec §6: unique detectors non-increasing in alpha (mean of 3 seeds), below half at alpha = 1. The noise
    channels are centred (N(0, 0.5²)), like features of either sign; rotating uniform [0, 1] noise into the planted
    channels only adds a common offset and leaves the concepts detectable."""
    ds, items = broden64
    new, concepts, q = _planted(items, ds, n_noise=12, noise_std=0.5)
    U = len(q)
    ident = torch.nn.Identity()
    data = ListData(new, ds.categories, ds.label_names)

    def run(rot):
        return dissect(ident, ident, data, ds.num_labels, ds.primary_category, q=q, batch_size=10,
                       rotation=rot)

    base = run(None)
    Q1 = random_rotation(U, 1.0, torch.Generator().manual_seed(3))
    Qh = random_rotation(U, 0.5, torch.Generator().manual_seed(3))
    for Q in (Q1, Qh):
        assert torch.allclose(Q @ Q.T, torch.eye(U, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(Qh @ Qh, Q1, atol=1e-6)
    r0 = run(random_rotation(U, 0.0, torch.Generator().manual_seed(0)))
    assert all(torch.equal(base["tally"][k], r0["tally"][k]) for k in base["tally"])  # alpha=0: identical
    assert base["counts"]["unique_A"] == len(concepts)
    alphas = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
    mean = [float(np.mean([run(random_rotation(U, a, torch.Generator().manual_seed(s)))["counts"]["unique_A"]
                           for s in range(3)])) for a in alphas]
    assert mean[0] == len(concepts)
    assert all(x >= y for x, y in zip(mean, mean[1:], strict=False)), mean
    assert mean[-1] < mean[0] / 2, mean


def test_counts_method_b_geq_a():
    g = torch.Generator().manual_seed(0)
    prim = np.array([-1, 0, 0, 1, 1, 2])
    for _ in range(20):
        x = torch.rand(7, 6, generator=g, dtype=torch.float64) * 0.2
        c = unique_detectors(x, prim, num_categories=3)
        assert c["unique_B"] >= c["unique_A"]
        ul = unit_labels(x, prim, num_categories=3)
        assert (ul["label"] > 0).all()


def test_quantile_methods_sort_exact_and_subsample_estimate():
    g = torch.Generator().manual_seed(1)
    acts = torch.randn(50, 2, 60, 60, generator=g)  # n = 180,000 values per unit
    n = 50 * 60 * 60
    flat = acts.transpose(0, 1).reshape(2, -1).double().numpy()
    expect = np.quantile(flat, 0.995, axis=1, method="linear")
    results = {}
    for method, max_bytes in (("exact_topk", 2**30), ("sort", 2**30), ("exact_topk", 3600), ("subsample", 3600)):
        m, used = make_quantiles(2, n, 0.005, method, max_bytes)
        for chunk in acts.split(7):
            m.update(chunk)
        results[(method, max_bytes)] = (m.compute().numpy(), used)
    assert results[("exact_topk", 2**30)][1] == "exact_topk" and results[("sort", 2**30)][1] == "sort"
    np.testing.assert_allclose(results[("exact_topk", 2**30)][0], expect, rtol=1e-9)
    np.testing.assert_allclose(results[("sort", 2**30)][0], expect, rtol=1e-9)
    assert UnitQuantiles.buffer_bytes(2, n, 0.005) > 7000
    for key in (("exact_topk", 3600), ("subsample", 3600)):  # the buffer does not fit: documented estimate
        est, used = results[key]
        assert used.startswith("subsample(p=")
        rank = (flat <= est[:, None]).mean(axis=1)  # the estimate's rank among all values
        assert np.all(np.abs(rank - 0.995) < 1e-3), rank
    with pytest.raises(ValueError, match="valid"):
        make_quantiles(2, n, 0.005, "kll")


def test_top_images_and_unit_masks_match_brute_force(broden):
    ds, items = broden
    data = ListData(items, ds.categories, ds.label_names)
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 5, 3, stride=4, padding=1)
    res = dissect(conv, conv, data, ds.num_labels, ds.primary_category, q=0.05, batch_size=6, topn=4,
                  shard=(0, 1))
    with torch.no_grad():
        acts = conv(torch.stack([x for x, _ in items]))
    peak = acts.flatten(2).amax(dim=2)  # (N, U)
    expect = peak.argsort(dim=0, descending=True)[:4]
    assert torch.equal(res["top_images"], expect)
    # the strips' masks are the tally's M_k
    x = torch.stack([items[i][0] for i in range(3)])
    m = unit_masks(conv, conv, x, 2, float(res["thresholds"][2]), (16, 16))
    S = F.interpolate(acts[:3, 2:3], size=(16, 16), mode="bilinear", align_corners=False)[:, 0]
    assert torch.equal(m, S.double() > float(res["thresholds"][2]))


def test_equivariance_permutation_and_positive_affine(broden):
    ds, items = broden
    data = ListData(items[:12], ds.categories, ds.label_names)
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 6, 3, stride=4, padding=1)
    base = dissect(conv, conv, data, ds.num_labels, ds.primary_category, q=0.05, batch_size=5)
    perm = torch.randperm(6)
    permuted = torch.nn.Conv2d(3, 6, 3, stride=4, padding=1)
    affine = torch.nn.Conv2d(3, 6, 3, stride=4, padding=1)
    with torch.no_grad():
        permuted.weight.copy_(conv.weight[perm])
        permuted.bias.copy_(conv.bias[perm])
        affine.weight.copy_(2.0 * conv.weight)  # a * A + b with a = 2, b = 2 * bias + 0.5
        affine.bias.copy_(2.0 * conv.bias + 0.5)
    res_p = dissect(permuted, permuted, data, ds.num_labels, ds.primary_category, q=0.05, batch_size=5)
    assert torch.equal(res_p["tally"]["intersection"], base["tally"]["intersection"][perm])
    assert torch.equal(res_p["labels"]["label"], base["labels"]["label"][perm])
    res_a = dissect(affine, affine, data, ds.num_labels, ds.primary_category, q=0.05, batch_size=5)
    for key in ("intersection", "act_paper", "act_lite"):
        assert torch.equal(res_a["tally"][key], base["tally"][key]), key
    assert torch.equal(res_a["labels"]["label"], base["labels"]["label"])


def test_random_init_net_has_far_fewer_detectors_than_the_planted_model(tmp_path):
    """200 images: with fewer, chance overlaps let random units pass tau = 0.04 (spec §10, NetDissect #28)."""
    ds = BrodenDataset(write_synthbroden(tmp_path, n_images=200, size=64, seed=0))
    items = [ds[i] for i in range(len(ds))]
    new, concepts, q = _planted(items, ds, n_noise=4)
    ident = torch.nn.Identity()
    planted = dissect(ident, ident, ListData(new, ds.categories, ds.label_names), ds.num_labels,
                      ds.primary_category, q=q, batch_size=50)
    net = random_init_copy(build_model("small_cnn", 10, channels=[8, 8, 16, 16]), seed=0)
    data = ListData(items, ds.categories, ds.label_names)
    rand = dissect(net, net.features[-2], data, ds.num_labels, ds.primary_category, q=0.005, batch_size=50)
    assert planted["counts"]["unique_A"] >= len(concepts) >= 3
    assert rand["counts"]["unique_A"] <= planted["counts"]["unique_A"] // 2


def test_batches_without_any_live_unit_add_only_ground_truth(broden):
    ds, items = broden
    prim = ds.primary_category
    t = IoUTally(3, ds.num_labels, prim, num_categories=len(ds.categories))
    acts = torch.zeros(4, 3, 8, 8)
    t.update(acts, [lab for _, lab in items[:4]], torch.ones(3))  # max A = 0 <= T = 1: skip rule everywhere
    d = t.compute()
    assert int(d["label_count"].sum()) > 0
    for key in ("intersection", "act_paper", "act_lite", "act_total"):
        assert int(d[key].abs().sum()) == 0, key
    assert int(d["images"]) == 4 and int(d["pixels"]) == 4 * 16 * 16


def test_colour_planted_1x1_conv_detects_the_foreground_colours(broden64):
    """Spec §6: a 1x1 conv firing where a pixel is within a tolerance of a nominal foreground colour."""
    from featurelens.data.shapes import COLORS, FOREGROUND_COLORS

    ds, items = broden64
    colours = torch.tensor([COLORS[c] for c in FOREGROUND_COLORS], dtype=torch.float32) / 255

    class ColourUnits(torch.nn.Module):
        def forward(self, x):  # unit j = relu(tol^2 - |x - c_j|^2), tol = 0.15
            d2 = ((x[:, None] - colours[None, :, :, None, None]) ** 2).sum(dim=2)
            return torch.relu(0.15**2 - d2)

    net = ColourUnits()
    number = {name: n for n, name in enumerate(ds.label_names)}
    # q = the colour's pixel coverage (spec §3.3: a concept covering more than q/tau of all pixels is undetectable)
    q = [ds.category_stats["color"][number[f"{c}-c"]][1] / len(ds) for c in FOREGROUND_COLORS]
    res = dissect(net, net, ListData(items, ds.categories, ds.label_names), ds.num_labels, ds.primary_category,
                  q=q, batch_size=10)
    k = ds.categories.index("color")
    names = [ds.label_names[int(c)] for c in res["labels"]["label_percat"][:, k]]
    assert names == [f"{c}-c" for c in FOREGROUND_COLORS]  # each unit's best colour is its own colour ...
    assert bool((res["labels"]["score_percat"][:, k] > 0.04).all())  # ... with a detector-level IoU
    assert res["counts"]["unique_B_percat"][k] == len(FOREGROUND_COLORS)


def test_frac_active_raw_is_q_for_a_continuous_layer(broden):
    """Spec §6 bound: the share of raw values above T_k is in [0.004, 0.006] at q = 0.005."""
    ds, items = broden
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 6, 3, stride=4, padding=1)  # no ReLU: no ties at the threshold
    res = dissect(conv, conv, ListData(items, ds.categories, ds.label_names), ds.num_labels, ds.primary_category,
                  batch_size=7)
    assert 0.004 <= res["frac_active_raw"] <= 0.006
    assert 0 < res["frac_active"] < 0.05  # after bilinear upsampling: not pinned to q


def test_counts_from_the_tally_table_equal_the_tallies(broden):
    ds, items = broden
    torch.manual_seed(1)
    conv = torch.nn.Conv2d(3, 12, 3, stride=4, padding=1)
    res = dissect(conv, conv, ListData(items, ds.categories, ds.label_names), ds.num_labels, ds.primary_category,
                  q=0.05, batch_size=7)
    assert res["counts"]["detectors"] > 0
    from_csv = counts_from_tally(res["table"])
    assert from_csv["categories"] == list(ds.categories)
    for key in ("detectors", "unique_A", "unique_B", "unique_A_percat", "unique_B_percat", "detectors_percat"):
        assert from_csv[key] == res["counts"][key], key


REFERENCE_CSVS = {  # spec §7: NetDissect's released per-unit CSVs -> (method B, method A) unique detectors
    "caffe_reference_imagenet.csv": (61, 50), "caffe_reference_places205.csv": (79, 60),
    "caffe_reference_places365.csv": (91, 72), "ResNet-152-model_imagenet.csv": (242, 197),
    "ResNet-152-model_places365.csv": (347, 278),
}


@pytest.mark.skipif(not os.environ.get("FEATURELENS_NETDISSECT_PLOT"),
                    reason="set FEATURELENS_NETDISSECT_PLOT to a NetDissect checkout's plot/ folder")
@pytest.mark.parametrize("name", sorted(REFERENCE_CSVS))
def test_counting_regression_on_the_released_csvs(name):
    import pandas as pd

    path = Path(os.environ["FEATURELENS_NETDISSECT_PLOT"]) / name
    if not path.exists():
        pytest.skip(f"{path} is absent")
    counts = counts_from_tally(pd.read_csv(path))
    assert (counts["unique_B"], counts["unique_A"]) == REFERENCE_CSVS[name]
