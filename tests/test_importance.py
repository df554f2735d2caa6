"""Lesion importance and dataset coherence (spec §2.6, §2.7, oracles §6)."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from featurelens.analysis import specialization as spec
from featurelens.analysis.importance import (
    dataset_coherence,
    eligible,
    importance,
    layer_clusters,
    lesion_hook,
    lesion_test,
    lesion_test_naive,
    random_sets,
    subcluster_importance,
    summarize_importance,
)

torch.set_num_threads(2)


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 5))


def _cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 8, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 5))


def _batches(shape, n_batches=3, b=16, k=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn((b,) + shape, generator=g), torch.randint(0, k, (b,), generator=g)) for _ in range(n_batches)]


def test_hook_lesion_equals_zeroed_weights():
    model = _mlp().eval()
    x = torch.randn(32, 12)
    units = torch.tensor([1, 4, 9, 15])
    with torch.no_grad(), lesion_hook(model[3], units):
        hooked = model(x)
    ref = _mlp().eval()
    with torch.no_grad():
        ref[3].weight[units] = 0
        ref[3].bias[units] = 0
        expected = ref(x)
    assert torch.equal(hooked, expected)
    assert not model[3]._forward_hooks  # removed


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_prefix_shared_equals_naive(kind):
    if kind == "mlp":
        model, z, data = _mlp(1), "3", _batches((12,), seed=1)
        n_units = 16
    else:
        model, z, data = _cnn(2), "1", _batches((3, 8, 8), seed=2)
        n_units = 6
        model.train()  # lesion_test must switch to eval and restore
    gen = torch.Generator().manual_seed(0)
    sets = [torch.randperm(n_units, generator=gen)[:s] for s in (1, 2, 3, 4, 5, 2, 3)]
    naive = lesion_test_naive(model, data, z, sets, 5)
    fast = lesion_test(model, data, z, sets, 5)
    chunked = lesion_test(model, data, z, sets, 5, max_images=40)  # 2 masks per forward
    repeated = lesion_test(model, data, z, sets, 5, mode="repeat")
    assert fast.shape == (len(sets) + 1, 5)
    assert torch.equal(fast, naive) and torch.equal(chunked, naive) and torch.equal(repeated, naive)
    assert fast.sum() > 0 and any(not torch.equal(fast[0], row) for row in fast[1:])
    if kind == "cnn":
        assert model.training


class _Res(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Linear(4, 5)

    def forward(self, x):
        h = torch.relu(self.conv(x))
        h = h + torch.relu(self.conv2(h))  # skip path computed before conv2
        return self.head(h.mean(dim=(2, 3)))


def test_residual_falls_back_to_repeat():
    torch.manual_seed(3)
    model, data = _Res(), _batches((3, 6, 6), seed=3)
    sets = [torch.tensor([0, 1]), torch.tensor([2]), torch.tensor([1, 3])]
    assert torch.equal(lesion_test(model, data, "conv2", sets, 5), lesion_test_naive(model, data, "conv2", sets, 5))


def _planted():
    """4 classes, 2 modules; module A (hidden units 0..15) alone carries classes {0, 1}, B the rest.

    Hidden-1 unit j copies input j // 8 (class j // 8), hidden-2 is the identity, logit c = mean of its 8 units;
    logit 4 is a constant competitor (bias 1).  An input of class c is x = s e_c with s spread so that losing k of
    a class's 8 units loses about k/16 of its accuracy (linear damage), and all 8 lose all of it.
    """
    net = nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 5))
    with torch.no_grad():
        for lin in net:
            if isinstance(lin, nn.Linear):
                lin.weight.zero_()
                lin.bias.zero_()
        for j in range(32):
            net[0].weight[j, j // 8] = 1.0
            net[2].weight[j, j] = 1.0
            net[4].weight[j // 8, j] = 1.0 / 8
        net[4].bias[4] = 1.0
    n = 64
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    s = torch.where(u < 0.5, 1.0 / (1.0 - u / 0.5), torch.full_like(u, 1e3)).float() * 1.0001
    xs, ys = [], []
    for c in range(4):
        x = torch.zeros(n, 4)
        x[:, c] = s
        xs.append(x)
        ys.append(torch.full((n,), c))
    x, y = torch.cat(xs), torch.cat(ys)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    return net, [(x[i:i + 64], y[i:i + 64]) for i in range(0, len(y), 64)]


def test_planted_module_is_important():
    net, data = _planted()
    graph = spec.weight_graph(net)
    assert graph.kind == "mlp" and list(graph.layer_sizes) == [4, 32, 32, 5]
    labels = np.full(graph.n, -1)
    for layer in (1, 2):
        sl = graph.layer_slice(layer)
        labels[sl] = (np.arange(32) >= 16).astype(int)  # cluster 0 = module A, cluster 1 = module B
    rows, summary = importance(net, graph, labels, data, 5, seed=0)
    assert len(rows) == 4 and summary["n_eligible"] == 4
    for r in rows:
        assert r["size"] == 16 and r["n_nonisolated"] == 32
        assert r["p_mean"] == pytest.approx(0.05), r
        if r["cluster"] == 0:  # module A, the oracle of §6 (module B's range null is seed-dependent here)
            assert r["p_range"] == pytest.approx(0.05), r
        assert r["acc_after"] == pytest.approx(0.5) and r["range"] == pytest.approx(2.0)
        assert r["acc_before"] == 1.0
        assert 0.5 < r["e_mean"] < 1
    pm = [r["p_mean"] for r in rows]
    fisher = spec.fisher_combine(pm, n_random=19)
    assert summary["fisher_p_mean"] == pytest.approx(float(fisher.pvalue))
    assert summary["fisher_stat"] == pytest.approx(float(fisher.fisher_stat))
    assert summary["frac_min_p_mean"] == 1.0
    assert summary["effect_mean"] == pytest.approx(2 * np.mean([r["e_mean"] for r in rows]))
    # seeded: the same call gives the same rows
    rows2, _ = importance(net, graph, labels, data, 5, seed=0)
    assert rows2 == rows


def test_random_sets_and_eligibility():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 3))
    with torch.no_grad():
        net[0].weight[[2, 5]] = 0  # hidden units 2, 5 have no input ...
        net[2].weight[:, [2, 5]] = 0  # ... and no output: isolated
    graph = spec.weight_graph(net)
    sl = graph.layer_slice(1)
    iso = graph.isolated[sl]
    assert list(np.flatnonzero(iso)) == [2, 5]
    labels = np.full(graph.n, -1)
    labels[sl] = [0, 0, 0, 1, 1, 1, 1, 0, 1, 1]
    clusters = layer_clusters(graph, labels, 1)
    assert clusters[0].tolist() == [0, 1, 7] and clusters[1].tolist() == [3, 4, 6, 8, 9]
    cand = torch.as_tensor(np.flatnonzero(~iso))
    sets = random_sets(cand, 3, 50, torch.Generator().manual_seed(1))
    assert len(sets) == 50
    for s in sets:
        assert len(s) == 3 and len(set(s.tolist())) == 3 and not set(s.tolist()) & {2, 5}
        assert set(s.tolist()) <= set(range(10))
    assert eligible(2, 8) and not eligible(1, 8) and eligible(7, 8) and not eligible(8, 8)
    assert eligible(6, 8, 5, 0.75) and not eligible(7, 8, 5, 0.75)


def test_subcluster_statistics():
    acc0 = np.array([1.0, 1.0, 1.0, 1.0])
    st = subcluster_importance(acc0, [0.0, 0.0, 1.0, 1.0], [[0.5, 0.5, 0.5, 0.5], [0.0, 0.0, 1.0, 1.0], acc0])
    assert st["m"] == 0.5 and st["range"] == 2.0
    assert st["p_mean"] == pytest.approx(3 / 4)  # ties with randoms 0 and 1 count against: (1 + 2) / 4
    assert st["p_range"] == pytest.approx(2 / 3)  # tie with random 1; random 2's NaN range is dropped: (1 + 1) / 3
    assert st["e_mean"] == pytest.approx(-0.5 / (-0.5 - 1 / 3))
    assert st["e_range"] == pytest.approx(2.0 / (2.0 + 1.0))
    same = subcluster_importance(acc0, acc0, [acc0, acc0])
    assert math.isnan(same["range"]) and math.isnan(same["p_range"]) and same["e_mean"] == 0.0
    summ = summarize_importance([{**st, "p_mean": 0.05, "p_range": 0.05}, {**same, "p_mean": 0.5}], 19)
    assert summ["fisher_p_range"] == pytest.approx(0.05 - 1 / 40)  # single p' (NaN dropped) -> itself
    assert summ["n_eligible"] == 2


def test_dataset_coherence_planted():
    g = torch.Generator().manual_seed(0)
    # a wide layer with noisy other units, so that random sets of 6 rarely share the planted units' purity
    # (ties count against significance: a random set as pure as the planted one would raise p)
    n, units, k = 400, 200, 5
    targets = torch.arange(n) % k
    scores = 3 * torch.rand(n, units, generator=g)
    coherent = torch.arange(6)
    scores[:, coherent] = 0.0
    scores[(targets == 3).nonzero().squeeze(1)[:, None], coherent[None]] = 1.0  # weak per unit, pure as a set
    sets = [coherent, torch.arange(10, 18), torch.arange(3)]  # the last is too small (min_size 5)
    rows, summary = dataset_coherence(scores, targets, sets, seed=0)
    assert [r["set"] for r in rows] == [0, 1] and summary["n_eligible"] == 2
    assert rows[0]["entropy"] == 0.0 and rows[0]["p"] == pytest.approx(0.05) and rows[0]["effect"] == math.inf
    assert rows[1]["entropy"] > 0 and math.isfinite(rows[1]["effect"])
    assert summary["effect"] == pytest.approx(rows[1]["effect"])  # inf excluded from the mean
    ref = spec.fisher_combine([r["p"] for r in rows], n_random=19)
    assert summary["fisher_p"] == pytest.approx(float(ref.pvalue))
    skip_rows, _ = dataset_coherence(scores, targets, sets, seed=0, skip_first=True)
    assert skip_rows[0]["entropy"] == 0.0


def test_lesion_target_weights_is_the_references_zeroed_conv_weights():
    """target=weights zeroes the conv's own output (= its weights and bias): the BN after it then outputs the
    constant beta - gamma mu / sigma, where target=output zeroes the BN output (issue 11)."""
    net = _cnn().eval()
    with torch.no_grad():
        net[1].bias.fill_(2.0)  # beta > 0: a weight lesion leaves a constant, non-zero channel
        net[1].running_mean.uniform_(-1, 1)
    graph = spec.weight_graph(net)
    data = _batches((3, 6, 6), n_batches=2)
    labels = np.full(graph.n, -1)
    labels[graph.layer_slice(0)] = np.arange(6) % 2
    got = {t: importance(net, graph, labels, data, 5, seed=0, n_random=3, target=t)[0] for t in ("output", "weights")}
    reference = copy.deepcopy(net)
    units = torch.as_tensor(np.flatnonzero(labels[graph.layer_slice(0)] == 0))
    with torch.no_grad():
        reference[0].weight[units] = 0
        reference[0].bias[units] = 0
    totals = torch.bincount(torch.cat([y for _, y in data]), minlength=5)
    correct = lesion_test_naive(reference, data, reference[1], [], 5)[0]
    want = float((correct[totals > 0].double() / totals[totals > 0]).mean())  # m(S): mean per-class accuracy
    rows = {t: next(r for r in got[t] if r["cluster"] == 0) for t in got}
    assert rows["weights"]["acc_after"] == pytest.approx(want)
    bn, x = net[1], data[0][0]
    const = bn.bias - bn.weight * bn.running_mean / torch.sqrt(bn.running_var + bn.eps)
    with torch.no_grad(), lesion_hook(net[0], units):
        lesioned = net[1](net[0](x))
    torch.testing.assert_close(lesioned[:, units], const[units].view(1, -1, 1, 1).expand_as(lesioned[:, units]))
    assert (const[units].abs() > 0.5).all()  # not the 0 of target=output
    assert graph.z_modules[0] == "1" and graph.layer_names[0] == "0"  # the BN output vs the conv output
    with pytest.raises(ValueError, match="target"):
        importance(net, graph, labels, data, 5, target="inputs")
