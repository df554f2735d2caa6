"""Oracles of the specialization spec (§6) for the foundation layer: graphs, spectral partitions, n-cut,
shuffles, activation r^2 graph and the statistics helpers."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import scipy.stats
import torch
import torchvision
from sklearn.metrics import adjusted_rand_score
from torch import nn

from featurelens.analysis import specialization as spec
from featurelens.models.builders import SmallCNN

torch.set_num_threads(2)

MODULES = 4
LOGITS = (3, 3, 2, 2)


def planted_mlp(eps: float = 0.0, seed: int = 0) -> tuple[nn.Module, np.ndarray]:
    """The 784-64-64-64-10 planted modular MLP of §6 (196 inputs, 16 units per hidden layer, (3,3,2,2) logits
    per module, cross-module weights eps*U(0,1)); returns the net and the true module of every graph node."""
    gen = torch.Generator().manual_seed(seed)
    widths = [784, 64, 64, 64, 10]
    groups = [np.repeat(np.arange(MODULES), 196), *[np.repeat(np.arange(MODULES), 16)] * 3,
              np.repeat(np.arange(MODULES), LOGITS)]
    layers: list[nn.Module] = [nn.Flatten()]
    for i in range(4):
        lin = nn.Linear(widths[i], widths[i + 1])
        same = torch.as_tensor(groups[i + 1][:, None] == groups[i][None, :])
        w = (0.1 + torch.rand(widths[i + 1], widths[i], generator=gen)) * torch.where(
            torch.rand(widths[i + 1], widths[i], generator=gen) < 0.5, -1.0, 1.0)
        cross = eps * torch.rand(widths[i + 1], widths[i], generator=gen)
        with torch.no_grad():
            lin.weight.copy_(torch.where(same, w, cross))
        layers += [lin, nn.ReLU()] if i < 3 else [lin]
    return nn.Sequential(*layers), np.concatenate(groups)


def iid_mlp(seed: int, widths=(64, 32, 32, 32, 10)) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i in range(len(widths) - 1):
        lin = nn.Linear(widths[i], widths[i + 1])
        nn.init.xavier_uniform_(lin.weight)
        layers += [lin, nn.ReLU()]
    return nn.Sequential(*layers[:-1])


# ---------------------------------------------------------------------------------------------------- edge weights
def test_kernel_norms_example_and_bounds():
    k = torch.arange(1.0, 10.0).view(1, 1, 3, 3)
    assert spec.kernel_edge_weights(k, conv_norm="l1")[0, 0] == 45
    assert spec.kernel_edge_weights(k, conv_norm="induced_l1")[0, 0] == 18
    w = torch.randn(6, 4, 3, 5)
    l1, ind = spec.kernel_edge_weights(w), spec.kernel_edge_weights(w, conv_norm="induced_l1")
    assert l1.shape == (4, 6) and np.all(ind >= l1 / 5 - 1e-12) and np.all(ind <= l1 + 1e-12)
    one = torch.randn(6, 4, 1, 1)
    np.testing.assert_allclose(spec.kernel_edge_weights(one), spec.kernel_edge_weights(one, conv_norm="induced_l1"))
    lin = torch.randn(3, 5)
    np.testing.assert_array_equal(spec.kernel_edge_weights(lin), lin.abs().T.double().numpy())
    grouped = spec.kernel_edge_weights(torch.randn(6, 2, 3, 3), groups=2)  # C_in = 4, 2 groups
    assert grouped.shape == (4, 6)
    assert np.all(grouped[:2, 3:] == 0) and np.all(grouped[2:, :3] == 0) and np.all(grouped[:2, :3] > 0)


def test_bn_folding_matches_conv_bn_and_negative_gamma_gives_nonnegative_edges():
    conv, bn = nn.Conv2d(3, 5, 3, padding=1), nn.BatchNorm2d(5)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.5, -2.0, 0.3, -0.1, 1.0]))
        bn.bias.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    conv.eval(), bn.eval()
    x = torch.randn(2, 3, 8, 8)
    w, b = spec.fold_bn_into_conv(conv, bn)
    torch.testing.assert_close(nn.functional.conv2d(x, w, b, padding=1), bn(conv(x)), atol=1e-5, rtol=1e-5)
    net = nn.Sequential(conv, bn, nn.ReLU(), nn.Conv2d(5, 4, 3)).eval()
    g = spec.weight_graph(net)
    assert g.adjacency.data.min() >= 0
    s = spec.bn_scale(bn).abs().numpy()  # folded into the first conv's incoming edges: none (input excluded),
    np.testing.assert_allclose(g.blocks[(0, 1)], spec.kernel_edge_weights(net[3].weight))  # outgoing unscaled
    assert g.z_modules == ["1", "3"]
    # BN after the nonlinearity scales the channel's outgoing edges instead (§2.2, Keras CIFAR VGG)
    late = nn.Sequential(nn.Conv2d(3, 5, 3), nn.ReLU(), bn, nn.Conv2d(5, 4, 3)).eval()
    g2 = spec.weight_graph(late)
    np.testing.assert_allclose(g2.blocks[(0, 1)], spec.kernel_edge_weights(late[3].weight) * s[:, None])
    g3 = spec.weight_graph(late, fold_bn=False)
    np.testing.assert_allclose(g3.blocks[(0, 1)], spec.kernel_edge_weights(late[3].weight))


def test_bn_after_conv_scales_incoming_edges():
    net = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    with torch.no_grad():
        net[3].weight.copy_(torch.tensor([2.0, -1.0, 0.5, 3.0]))
    g = spec.weight_graph(net)
    np.testing.assert_allclose(g.blocks[(0, 1)], spec.kernel_edge_weights(net[2].weight) * [[2.0, 1.0, 0.5, 3.0]],
                               rtol=1e-4)


# ---------------------------------------------------------------------------------------------------- n-cut
def test_ncut_matches_hand_computation_and_double_loop():
    a = np.zeros((4, 4))
    for i, j, w in [(0, 1, 2.0), (2, 3, 3.0), (1, 2, 1.0)]:
        a[i, j] = a[j, i] = w
    # degrees (2, 3, 4, 3); both clusters cut 1, volumes 5 and 7
    assert spec.ncut(a, [0, 0, 1, 1]) == pytest.approx(1 / 5 + 1 / 7)
    assert spec.ncut(a, [0, 1, 2, 3]) == pytest.approx(4.0)  # every edge cut: each term is 1
    a[1, 2] = a[2, 1] = 0
    assert spec.ncut(a, [0, 0, 1, 1]) == pytest.approx(0.0, abs=1e-12)  # two components
    rng = np.random.default_rng(0)
    b = rng.random((30, 30)) * (rng.random((30, 30)) < 0.3)
    b = np.triu(b, 1) + np.triu(b, 1).T
    lab = rng.integers(0, 5, 30)
    d = b.sum(1)
    naive = 0.0
    for c in range(5):
        cut = sum(b[i, j] for i in range(30) for j in range(30) if lab[i] == c and lab[j] != c)
        naive += cut / (d[lab == c].sum() + 1e-8)
    assert spec.ncut(b, lab) == pytest.approx(naive, rel=1e-12)
    assert 0 <= naive <= 5
    assert spec.ave_in_out(6.0, 12) == pytest.approx(0.5) and spec.ave_in_out(0.0, 4) == np.inf


# ---------------------------------------------------------------------------------------------------- planted net
def test_planted_modular_mlp_is_recovered_and_beats_its_shuffles():
    net, truth = planted_mlp()
    g = spec.weight_graph(net)
    assert list(g.layer_sizes) == [784, 64, 64, 64, 10] and g.kind == "mlp"
    a = g.adjacency
    assert abs(a - a.T).max() == 0 and a.diagonal().max() == 0
    assert a.sum() == pytest.approx(2 * sum(b.sum() for b in g.blocks.values()))
    res = spec.clusterability(g, k=4, n_shuffles=10, seed=0)
    assert adjusted_rand_score(truth, res["labels"]) == 1.0
    assert res["ncut"] < 1e-6 and res["n_isolated"] == 0
    assert np.all(res["shuffled_ncuts"] > res["ncut"] + 0.5)
    assert res["ncut_percentile"] == pytest.approx(1 / 11) and res["ncut_z"] < -10
    # same seed -> same partition and same shuffles
    again = spec.clusterability(g, k=4, n_shuffles=2, seed=0)
    np.testing.assert_array_equal(again["labels"], res["labels"])
    np.testing.assert_allclose(again["shuffled_ncuts"], res["shuffled_ncuts"][:2])
    np.testing.assert_array_equal(spec.spectral_partition(a, 4, seed=3), spec.spectral_partition(a, 4, seed=3))


def test_several_clustering_seeds_keep_the_lowest_ncut_and_report_the_spread():
    g = spec.weight_graph(iid_mlp(0))
    res = spec.clusterability(g, k=4, n_shuffles=3, seed=0, n_init=2, n_cluster_seeds=4)
    one = spec.clusterability(g, k=4, n_shuffles=3, seed=0, n_init=2)
    np.testing.assert_allclose(res["shuffled_ncuts"], one["shuffled_ncuts"])  # the shuffles are unchanged
    assert res["ncut_seeds"][0] == pytest.approx(one["ncut"])  # child 0 is the single-seed clustering
    children = np.random.SeedSequence(0).spawn(3 + 4)
    by_hand = [spec.ncut(g.adjacency, spec.spectral_partition(g.adjacency, 4, spec.measure._child_int(c), 2))
               for c in (children[0], *children[4:])]
    np.testing.assert_allclose(res["ncut_seeds"], by_hand)
    assert res["ncut"] == min(by_hand) == pytest.approx(spec.ncut(g.adjacency, res["labels"]))
    mean, std = one["ncut_shuffled_mean"], one["ncut_shuffled_std"]
    assert res["ncut_seed_mean"] == pytest.approx(np.mean(by_hand)) and res["ncut_seed_std"] == pytest.approx(
        np.std(by_hand))
    assert res["ncut_z"] == pytest.approx((min(by_hand) - mean) / std)
    assert res["ncut_z_seed_mean"] == pytest.approx((np.mean(by_hand) - mean) / std)


def test_activation_clusterability_planted_groups_beat_column_shuffles():
    rng = np.random.default_rng(0)
    latent = rng.normal(size=(300, 3))
    samples = np.concatenate([latent[:, [g]] + 0.3 * rng.normal(size=(300, 6)) for g in range(3)], axis=1)
    adjacency = spec.rank_correlation_squared(samples).numpy()
    res = spec.activation_clusterability(adjacency, samples, k=3, n_shuffles=5, seed=0, n_init=3)
    assert adjusted_rand_score(np.repeat(np.arange(3), 6), res["labels"]) == 1.0
    assert res["ncut_percentile"] == pytest.approx(1 / 6) and res["ncut_z"] < -5
    # independent units: the true graph is one more draw from the shuffle null
    iid = rng.normal(size=(300, 18))
    null = spec.activation_clusterability(spec.rank_correlation_squared(iid).numpy(), iid, k=3, n_shuffles=5,
                                          seed=0, n_init=3)
    assert abs(null["ncut_z"]) < 4


def test_planted_ncut_rises_with_cross_module_weights():
    values = []
    for eps in (0.0, 0.02, 0.1, 0.4):
        g = spec.weight_graph(planted_mlp(eps)[0])
        values.append(spec.ncut(g.adjacency, spec.spectral_partition(g.adjacency, 4, seed=0, n_init=5)))
    assert values[0] < 1e-6 and all(b > a for a, b in zip(values, values[1:], strict=False)), values


def test_local_partition_recovers_planted_modules_per_layer():
    net, truth = planted_mlp()
    g = spec.weight_graph(net)
    labels = spec.spectral_partition(g.adjacency, 4, seed=0, n_init=5)
    local = spec.local_partition(g, labels, seed=1, n_init=5)
    for layer in range(len(g.layer_sizes)):
        sl = g.layer_slice(layer)
        assert adjusted_rand_score(truth[sl], local[sl]) == 1.0


def test_function_preserving_permutation_keeps_ncut():
    net, _ = planted_mlp(eps=0.05)
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(1))
    permuted = copy.deepcopy(net)
    with torch.no_grad():
        permuted[3].weight.copy_(net[3].weight[perm])
        permuted[3].bias.copy_(net[3].bias[perm])
        permuted[5].weight.copy_(net[5].weight[:, perm])
    x = torch.randn(3, 784, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(permuted(x), net(x), rtol=1e-4, atol=1e-4)
    g, gp = spec.weight_graph(net), spec.weight_graph(permuted)
    lab, lab_p = (spec.spectral_partition(h.adjacency, 4, seed=0, n_init=5) for h in (g, gp))
    assert spec.ncut(g.adjacency, lab) == pytest.approx(spec.ncut(gp.adjacency, lab_p), rel=1e-6)
    sl = g.layer_slice(2)
    lab_in_perm_order = lab.copy()
    lab_in_perm_order[sl] = lab[sl][perm.numpy()]
    assert adjusted_rand_score(lab_in_perm_order, lab_p) == 1.0


# ---------------------------------------------------------------------------------------------------- shuffles
def test_shuffles_preserve_block_multisets_and_zero_pattern():
    rng = np.random.default_rng(0)
    blocks = {(0, 1): rng.random((5, 7)) * (rng.random((5, 7)) < 0.4), (1, 2): rng.random((7, 3))}
    for method in ("layer", "layer_nonzero"):
        out = spec.shuffle_blocks(blocks, method, rng=1)
        for key, blk in blocks.items():
            assert out[key].shape == blk.shape
            np.testing.assert_array_equal(np.sort(out[key], axis=None), np.sort(blk, axis=None))
            assert not np.array_equal(out[key], blk)
    kept = spec.shuffle_blocks(blocks, "layer_nonzero", rng=2)
    np.testing.assert_array_equal(kept[(0, 1)] != 0, blocks[(0, 1)] != 0)
    g = spec.WeightGraph.from_blocks(blocks, [5, 7, 3])
    gs = spec.shuffle_graph(g, "layer", rng=3)
    assert gs.adjacency.sum() == pytest.approx(g.adjacency.sum()) and gs.layer_sizes is g.layer_sizes
    with pytest.raises(ValueError):
        spec.shuffle_blocks(blocks, "weights")


def test_iid_network_percentile_is_not_piled_at_the_minimum():
    percentiles = []
    for seed in range(6):
        g = spec.weight_graph(iid_mlp(seed))
        res = spec.clusterability(g, k=4, n_shuffles=10, seed=seed, n_init=5)
        assert 0 < res["ncut"] <= 4 and np.isfinite(res["ncut_z"])
        percentiles.append(res["ncut_percentile"])
    percentiles = np.asarray(percentiles)
    assert np.all((percentiles > 0) & (percentiles <= 1))
    assert (percentiles == 1 / 11).sum() <= 3 and percentiles.max() >= 0.3, percentiles


# ---------------------------------------------------------------------------------------------------- CNN graphs
def test_small_cnn_graph_nodes_and_edges():
    net = SmallCNN(3, [4, 8, 16], num_classes=10).eval()
    g = spec.weight_graph(net)
    assert g.kind == "cnn" and list(g.layer_sizes) == [4, 8, 16] and g.n == 28
    assert set(g.blocks) == {(0, 1), (1, 2)}  # input and the Linear head are not nodes
    assert g.blocks[(0, 1)].shape == (4, 8) and g.blocks[(0, 1)].min() > 0
    assert g.z_modules == ["features.1", "features.4", "features.8"]
    table = g.node_table()
    assert list(table["module"][:5]) == ["features.0"] * 4 + ["features.3"] and table["channel"][4] == 0
    assert spec.spectral_partition(g.adjacency, 3, seed=0).max() == 2


def test_resnet18_graph_residual_paths_and_downsample():
    net = torchvision.models.resnet18(weights=None).eval()
    g = spec.weight_graph(net)
    convs = [(n, m) for n, m in net.named_modules() if isinstance(m, nn.Conv2d)]
    assert g.layer_names == [n for n, _ in convs]  # forward order = definition order for resnet18
    assert g.n == sum(m.out_channels for _, m in convs) == 4800
    idx = {n: i for i, n in enumerate(g.layer_names)}

    def edge(a, b):
        return (idx[a], idx[b]) in g.blocks

    assert edge("conv1", "layer1.0.conv1") and edge("conv1", "layer1.1.conv1")  # identity path
    assert edge("conv1", "layer2.0.conv1") and edge("conv1", "layer2.0.downsample.0")
    assert not edge("conv1", "layer1.0.conv2") and not edge("conv1", "layer3.0.conv1")  # cut by convs
    assert edge("layer2.0.downsample.0", "layer2.1.conv1") and edge("layer2.0.downsample.0", "layer3.0.conv1")
    assert edge("layer2.0.conv2", "layer3.0.downsample.0") and not edge("layer2.0.downsample.0", "layer2.0.conv2")
    assert not edge("layer2.0.downsample.0", "layer4.0.conv1")
    assert g.z_modules[idx["layer2.0.downsample.0"]] == "layer2.0.downsample.1"
    assert g.blocks[(idx["layer1.1.conv2"], idx["layer2.0.downsample.0"])].shape == (64, 128)
    # 1x1 downsample blocks: both kernel norms agree
    gi = spec.weight_graph(net, conv_norm="induced_l1")
    for key, blk in g.blocks.items():
        if g.layer_names[key[1]].endswith("downsample.0"):
            np.testing.assert_allclose(gi.blocks[key], blk)
        else:
            assert np.all(gi.blocks[key] <= blk + 1e-12)
    assert g.adjacency.nnz == 2 * sum(int((b > 0).sum()) for b in g.blocks.values())
    assert g.isolated.sum() == 0


# ---------------------------------------------------------------------------------------------------- activations
def test_streamed_spearman_r2_equals_scipy():
    rng = np.random.default_rng(0)
    x = np.round(rng.normal(size=(97, 9)) @ rng.normal(size=(9, 9)), 1)  # rounding makes ties
    x[:, 4] = 3.0  # constant unit: dropped (zero row/column)
    metric = spec.ActivationCorrelation(9, max_samples=97)
    for chunk in np.array_split(x, 5):
        metric.update(torch.as_tensor(chunk))
    got = metric.compute().numpy()
    live = [i for i in range(9) if i != 4]
    with np.errstate(invalid="ignore"):
        rho = scipy.stats.spearmanr(x[:, live]).statistic
    want = rho ** 2
    np.fill_diagonal(want, 0)
    np.testing.assert_allclose(got[np.ix_(live, live)], want, atol=1e-10)
    assert np.all(got[4] == 0) and np.all(got[:, 4] == 0)
    assert np.allclose(got, got.T) and got.min() >= 0 and got.max() <= 1
    # strictly increasing per-unit transforms leave A unchanged; rows beyond max_samples are ignored
    capped = spec.ActivationCorrelation(9, max_samples=60)
    capped.update(torch.as_tensor(np.exp(x[:40])))
    capped.update(torch.as_tensor(np.exp(np.vstack([x[40:60], 50 * np.ones((30, 9))]))))
    assert capped.samples().shape == (60, 9)
    ref = spec.rank_correlation_squared(torch.as_tensor(x[:60]))
    np.testing.assert_allclose(capped.compute().numpy(), ref.numpy(), atol=1e-6)
    pearson = spec.rank_correlation_squared(torch.as_tensor(x[:, live]), corr="pearson").numpy()
    want_p = np.corrcoef(x[:, live], rowvar=False) ** 2
    np.fill_diagonal(want_p, 0)
    np.testing.assert_allclose(pearson, want_p, atol=1e-10)


def test_planted_activation_groups_are_recovered():
    rng = np.random.default_rng(1)
    latent = rng.normal(size=(400, 3))
    cols, truth = [], []
    for g in range(3):
        for _ in range(8):
            f = rng.choice([np.exp, np.tanh, lambda v: v ** 3])
            cols.append(f(latent[:, g] + 0.3 * rng.normal(size=400)))
            truth.append(g)
    a = spec.rank_correlation_squared(torch.as_tensor(np.stack(cols, 1))).numpy()
    labels = spec.spectral_partition(a, 3, seed=0, n_init=5)
    assert adjusted_rand_score(truth, labels) == 1.0


def test_activation_graph_hooks_bn_outputs_of_a_cnn_and_mlp_hidden_units():
    torch.manual_seed(0)
    net = SmallCNN(3, [4, 8], num_classes=5).train()
    data = [(torch.randn(16, 3, 12, 12), torch.zeros(16)) for _ in range(3)]
    ag = spec.activation_graph(net, data, max_samples=40)
    assert net.training  # mode restored
    assert ag.adjacency.shape == (12, 12) and ag.samples.shape == (40, 12)
    assert ag.layer_names == ["features.0", "features.3"]
    with torch.no_grad():
        net.eval()
        z = net.features[1](net.features[0](data[0][0]))
    np.testing.assert_allclose(ag.samples[:16, :4], z.abs().mean((2, 3)).numpy(), rtol=1e-5, atol=1e-6)
    mlp_graph = spec.activation_graph(iid_mlp(0), [torch.randn(50, 64)], max_samples=50)
    assert list(mlp_graph.layer_sizes) == [32, 32, 32] and mlp_graph.adjacency.shape == (96, 96)


# ---------------------------------------------------------------------------------------------------- statistics
def test_percentiles_count_ties_against_significance():
    null = [1.0, 2.0, 2.0, 3.0]
    assert spec.percentile_left(2.0, null) == pytest.approx(4 / 5)  # 1 + (1.0, 2.0, 2.0)
    assert spec.percentile_left(0.0, null) == pytest.approx(1 / 5)
    assert spec.percentile_right(2.0, null) == pytest.approx(4 / 5)  # 1 + (2.0, 2.0, 3.0)
    assert spec.percentile_right(5.0, null) == pytest.approx(1 / 5)
    assert spec.percentile_left(2.0, [2.0] * 19) == 1.0  # a value tied with its whole null is not special
    # a discrete statistic under the null (values exchangeable, many ties) stays calibrated: P(p <= 0.05) <= 0.05
    rng = np.random.default_rng(0)
    draws = rng.integers(0, 3, size=(4000, 20)).astype(float)
    p = np.array([spec.percentile_left(d[0], d[1:]) for d in draws])
    assert (p <= 0.05).mean() <= 0.05


def test_fisher_matches_scipy_and_null_calibration():
    p = np.array([0.05, 0.2, 0.5, 0.01, 0.9])
    res = spec.fisher_combine(p)
    want = scipy.stats.combine_pvalues(p, method="fisher")
    assert res.statistic == pytest.approx(want.statistic) and res.pvalue == pytest.approx(want.pvalue)
    assert res.fisher_stat == pytest.approx(np.mean(-np.log(p)))
    assert spec.fisher_combine([0.37]).pvalue == pytest.approx(0.37)
    pct = np.array([1, 4, 10, 2, 18]) / 20
    shifted = spec.fisher_combine(pct, n_random=19)
    assert shifted.pvalue == pytest.approx(scipy.stats.combine_pvalues(pct - 1 / 40, method="fisher").pvalue)
    with pytest.raises(ValueError):
        spec.fisher_combine([0.01], n_random=19)  # not a percentile of 19 random sets
    # §6 null calibration: percentiles uniform on {1/20..20/20}, m = 10, 4000 draws
    draws = np.random.default_rng(0).integers(1, 21, size=(4000, 10)) / 20
    fp = spec.fisher_combine(draws, n_random=19, axis=1).pvalue
    assert fp.shape == (4000,)
    assert abs(fp.mean() - 0.51) < 0.02 and 0.02 < (fp < 0.05).mean() < 0.045


def test_bates_and_benjamini_hochberg():
    assert spec.bates_cdf(0.2, 5) == pytest.approx(1 / 120)
    assert spec.bates_cdf(0.5, 5) == pytest.approx(0.5)
    assert spec.bates_cdf(0.3, 1) == pytest.approx(0.3)
    assert spec.bates_cdf(0.5, 40) == pytest.approx(0.5)
    p = [0.001, 0.008, 0.039, 0.041, 0.042, 0.06, 0.074, 0.205]
    crit, sig = spec.benjamini_hochberg(p, 0.05)
    assert crit == 0.008 and sig.tolist() == [True, True] + [False] * 6
    assert spec.benjamini_hochberg([0.01, 0.02, 0.03, 0.04, 0.05])[0] == 0.05
    crit, sig = spec.benjamini_hochberg([0.2, 0.5, 0.9])
    assert crit == 0.0 and not sig.any()


def test_seed_sequence_children_and_input_validation():
    assert spec.seed_sequence_ints(7, 3) == spec.seed_sequence_ints(7, 3)
    assert len(set(spec.seed_sequence_ints(7, 3))) == 3
    assert spec.default_n_init(2000) == 25 and spec.default_n_init(2001) == 100
    a = np.zeros((5, 5))
    a[0, 1] = a[1, 0] = a[2, 3] = a[3, 2] = 1.0
    labels = spec.spectral_partition(a, 2, seed=0)
    assert labels[4] == -1 and adjusted_rand_score([0, 0, 1, 1], labels[:4]) == 1.0
    with pytest.raises(ValueError):
        spec.spectral_partition(a, 4, seed=0)  # k must be < non-isolated nodes
    with pytest.raises(ValueError):
        spec.spectral_partition(np.triu(np.ones((4, 4)), 1), 2)  # not symmetric
