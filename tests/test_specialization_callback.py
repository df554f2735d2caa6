"""The specialization callback in training and in analyze.py, with a planted modular network."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import TINY

from featurelens.analysis import specialization as spec
from featurelens.analyze import analyze
from featurelens.errors import ConfigError
from featurelens.models import build_model
from featurelens.results import read_results
from featurelens.train import train

SPEC = ["analysis=[specialization]", "analysis.specialization.k=4", "analysis.specialization.n_shuffles=4",
        "analysis.specialization.act_samples=64"]


def test_training_run_analyses_epoch_0_and_the_last_epoch(cfg_factory):
    base = [o for o in TINY if not o.startswith("analysis.")]
    cfg = cfg_factory(*SPEC, "trainer.max_epochs=3", name="train", base=base)
    train(cfg)
    out = Path(cfg.paths.output_dir) / "analysis/specialization"
    records = read_results(out / "results.jsonl")
    assert [r["epoch"] for r in records] == [0, 3]  # every_n_epochs: null
    for r in records:
        assert 0 <= r["specialization/weights/ncut"] <= 4
        assert 0 < r["specialization/weights/ncut_percentile"] <= 1
        assert len(r["specialization/weights/shuffled_ncuts"]) == 4
        assert -1 <= r["specialization/ari_weights_vs_activations"] <= 1
    assert "specialization/weights/ari_prev_epoch" in records[1]
    # the logged partition is the one the analysis module gives for the checkpointed weights
    ckpt = torch.load(Path(cfg.paths.output_dir) / "checkpoints/last.ckpt", weights_only=False)
    net = build_model("small_cnn", 10, 3, channels=[4, 8])
    net.load_state_dict({k.removeprefix("net."): v for k, v in ckpt["state_dict"].items() if k.startswith("net.")})
    expected = spec.clusterability(net.eval(), 4, 4, 0)
    assert records[1]["specialization/weights/ncut"] == pytest.approx(expected["ncut"], abs=1e-9)
    assert (np.load(out / "labels_weights_epoch3.npy") == expected["labels"]).all()
    for name in ("nodes.csv", "shuffles.csv", "cluster_sizes.png", "ncut_shuffles.png"):
        assert (out / name).is_file(), name


def _planted_mlp() -> torch.nn.Module:
    """784-64-64-64-10 with 4 modules (196 inputs, 16 units per layer, logits 3,3,2,2), no cross weights."""
    net = build_model("mlp", 10, 1, image_size=28, hidden=[64, 64, 64])
    linears = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
    sizes = [[196] * 4, [16] * 4, [16] * 4, [16] * 4, [3, 3, 2, 2]]
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for lin, ins, outs in zip(linears, sizes[:-1], sizes[1:], strict=True):
            lin.weight.zero_()
            i0 = o0 = 0
            for i, o in zip(ins, outs, strict=True):
                lin.weight[o0:o0 + o, i0:i0 + i] = torch.rand(o, i, generator=gen) + 0.1
                i0, o0 = i0 + i, o0 + o
    return net


def test_planted_modular_mlp_is_recovered_by_analyze(cfg_factory, tmp_path):
    weights = tmp_path / "planted.pth"
    torch.save(_planted_mlp().state_dict(), weights)
    cfg = cfg_factory("model=mlp", "model.hidden=[64,64,64]", f"model.weights={weights}", "data=digits",
                      "logger=none", "analysis=specialization", "analysis.specialization.k=4",
                      "analysis.specialization.n_shuffles=5", "analysis.specialization.parts=[weights]",
                      name="planted", config_name="analyze")
    record = analyze(cfg)["specialization"]
    assert record["specialization/weights/ncut"] < 1e-6
    assert record["specialization/weights/ncut_percentile"] == pytest.approx(1 / 6)  # below every shuffle
    assert record["specialization/weights/ncut_z"] < -5


def test_all_parts_run_on_a_checkpoint(cfg_factory):
    base = [o for o in TINY if not o.startswith("analysis.")]
    cfg = cfg_factory(*SPEC, "model.channels=[8,16]", "trainer.max_epochs=1", name="train", base=base)
    train(cfg)
    an = cfg_factory(f"ckpt_path={cfg.paths.output_dir}/checkpoints/last.ckpt", "logger=none", *SPEC,
                     "analysis.specialization.parts=[weights,activations,importance,coherence,visualisation]",
                     "analysis.specialization.coherence.min_size=2", "analysis.specialization.vis.steps=4",
                     "analysis.specialization.vis.relu_redirect_steps=2", "analysis.specialization.vis.n_random=3",
                     "analysis.specialization.vis.max_sets=2", "analysis.specialization.fold_bn=both",
                     "analysis.specialization.local=true", name="all", config_name="analyze")
    record = analyze(an)["specialization"]
    p = "specialization/weights/"
    assert record[p + "importance/n_eligible"] >= 1
    assert 0 < record[p + "importance/fisher_p_mean"] <= 1
    assert record[p + "coherence/dataset/n_sets"] >= 1 and 0 < record[p + "coherence/dataset/fisher_p"] <= 1
    assert record[p + "coherence/vis_score/n_sets"] >= 1
    out = Path(an.paths.output_dir) / "analysis/specialization"
    table = pd.read_csv(out / "subclusters_epoch1.csv")
    assert set(table.part) == {"importance", "coherence_dataset", "coherence_vis"}
    assert set(table.partition) == {"weights", "activations", "weights_local", "activations_local"}
    assert {str(v) for v in table[table.partition.str.startswith("weights")].bn_folded} == {"True"}  # every table
    # BN folding is reported, and with fold_bn=both the unfolded graph gets its own n-cut against shuffles
    assert record["specialization/fold_bn"] == 1  # logged as a number
    assert 0 <= record["specialization/weights_unfolded/ncut"] <= 4
    assert len(record["specialization/weights_unfolded/shuffled_ncuts"]) == 4
    # the activation n-cut has a shuffle baseline too, and both report the spread over clustering seeds
    assert 0 < record["specialization/activations/ncut_percentile"] <= 1
    assert record["specialization/weights/ncut"] <= record["specialization/weights/ncut_seed_mean"] + 1e-12
    # local partitions: per layer at most as many clusters as the global partition has there
    layer = pd.read_csv(out / "nodes.csv").layer.to_numpy()
    glob, local = np.load(out / "labels_weights_epoch1.npy"), np.load(out / "labels_weights_local_epoch1.npy")
    for i in np.unique(layer):
        n_global = len(set(glob[layer == i].tolist()) - {-1})
        assert min(n_global, 1) <= len(set(local[layer == i].tolist()) - {-1}) <= n_global  # k_l subgraph clusters
    assert np.load(out / "labels_activations_local_epoch1.npy").max() >= 1
    # lesions run on the test split (spec §2.6): the unlesioned accuracy is the test set's mean class accuracy
    from featurelens.analyze import load_model
    from featurelens.runtime import build

    net, data_cfg, _, _ = load_model(an)
    dm = build(data_cfg)
    dm.setup("fit")
    correct, total = torch.zeros(10), torch.zeros(10)
    with torch.no_grad():
        for x, y in dm.loader(dm.test_set):
            pred = net.eval()(x).argmax(1)
            correct += torch.bincount(y[pred == y], minlength=10)
            total += torch.bincount(y, minlength=10)
    test_acc = float((correct[total > 0] / total[total > 0]).mean())
    assert table[table.part == "importance"].acc_before.unique() == pytest.approx([test_acc])
    assert 0 < record["specialization/activations/importance/fisher_p_mean"] <= 1
    assert ((table.p_mean.dropna() >= 0.05) & (table.p_mean.dropna() <= 1)).all()
    assert (out / "vis_grid_weights.png").is_file() and (out / "vis_grid_activations.png").is_file()
    for partition in ("weights", "activations"):  # the logged aggregates are the documented ones (spec §2.6)
        rows, key = table[table.partition == partition], f"specialization/{partition}/coherence/"
        vis = rows[rows.part == "coherence_vis"].effect_vis_score.dropna()
        assert record[key + "vis_score/effect"] == pytest.approx(2 * vis.mean())  # t/(t + r): 1 = like random
        entropy_ratio = rows[rows.part == "coherence_dataset"].effect
        assert record[key + "dataset/effect"] == pytest.approx(entropy_ratio[np.isfinite(entropy_ratio)].mean())


@pytest.mark.parametrize("override", ["analysis.specialization.parts=[lesions]", "analysis.specialization.k=1",
                                      "analysis.specialization.shuffle_method=rows"])
def test_bad_specialization_values_are_rejected(cfg_factory, override):
    from featurelens.runtime import instantiate_all

    cfg = cfg_factory("analysis=specialization", override, base=[])
    with pytest.raises(ConfigError, match=override.split("=")[0].split(".")[-1]):
        instantiate_all(cfg.analysis)


def test_re_analysing_an_epoch_replaces_its_shuffle_rows(tmp_path):
    """A run resumed into its own directory analyses the interrupted epoch again: no duplicated rows
    (shuffles.csv is written from the history, in which the callback keeps one record per epoch)."""
    from featurelens.analysis.specialization import Specialization, SpecializationResult

    analysis = Specialization(k=2, n_shuffles=2)
    details = {"nodes": [], "labels": {}, "subclusters": [], "vis_grids": {}}
    history: list[dict] = []
    for epoch, ncuts in ((1, [0.5, 0.6]), (2, [0.7, 0.8]), (2, [0.9, 1.0])):
        result = SpecializationResult(epoch, {"weights/shuffled_ncuts": ncuts, "activations/shuffled_ncuts": [1.5]},
                                      details)
        history = [r for r in history if r["epoch"] != epoch] + [result.record()]
        analysis.report(result, tmp_path, final=False, history=history)
    rows = pd.read_csv(tmp_path / "shuffles.csv")
    assert rows.groupby(["epoch", "partition"]).size().to_dict() == {(1, "activations"): 1, (1, "weights"): 2,
                                                                     (2, "activations"): 1, (2, "weights"): 2}
    assert rows[rows.epoch == 2].ncut.tolist() == [0.9, 1.0, 1.5]  # the later analysis wins
