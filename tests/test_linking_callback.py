"""The linking callback in training and in analyze.py (spec linking.md §8, §9.8, §9.9)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from conftest import TINY, wandb_media

from featurelens.analysis import linking as lk
from featurelens.analysis.linking import Linking, LinkingConfig, LinkingMap
from featurelens.analyze import analyze
from featurelens.errors import ConfigError
from featurelens.models.builders import MLP
from featurelens.results import read_results
from featurelens.train import train

# digits at 16 px: a classifier that is right on most generated digits within a few epochs, and a 1-epoch cVAE
DIGITS = ["data=digits", "data.image_size=16", "data.batch_size=64", "generator.epochs=1"]
LINK = ["analysis=[linking]", "analysis.linking.pairs.n_per_class=12", "analysis.linking.pairs.heldout_per_class=4",
        "analysis.linking.min_pairs=4", "analysis.linking.cf.max_steps=5", "analysis.linking.sweep.units_per_epoch=4",
        "analysis.linking.sweep.samples=2", "analysis.linking.ref_set.samples_per_class=3",
        "analysis.linking.classes=[0,1,2]"]
KEYS = ["n_pairs", "keep_rate", "mse_train", "r2_heldout", "r2_pooled", "mse_heldout", "cycle_top1", "w_cos",
        "r_cycle_corr_unit", "r_cycle_corr_sample", "units/n_dead", "units/fidelity_rate", "units/n_selective",
        "units/leakage_median", "cf/success_rate", "cf/shift_l1_mean"]


def test_training_run_links_every_epoch(cfg_factory):
    base = [o for o in TINY if not o.startswith(("analysis.", "data."))]
    cfg = cfg_factory(*DIGITS, *LINK, "model.channels=[8,16]", "trainer.max_epochs=1", name="train", base=base)
    train(cfg)
    out = Path(cfg.paths.output_dir) / "analysis/linking"
    records = read_results(out / "results.jsonl")
    assert [r["epoch"] for r in records] == [0, 1]  # never during the sanity check
    last = records[-1]
    for key in KEYS:
        assert f"linking/{key}" in last, key
    assert 0 < last["linking/keep_rate"] <= 1 and 4 <= last["linking/n_pairs"] <= 36  # min_pairs=4: a map
    for name in ("keep_rates.csv", "activation_ranges.csv", "unit_changes.csv", "counterfactuals.csv"):
        assert (out / name).exists(), name
    lmap = LinkingMap.load(out / "linking_map.npz")
    assert lmap.coef.shape == (32, 16) and list(lmap.meta["classes"]) == [0, 1, 2]
    # the generator was trained once and cached under FEATURELENS_CACHE
    assert len(list((Path(cfg.generator.cache_dir) / "generators").glob("*.pt"))) >= 1


def test_too_few_pairs_log_nan_and_warn(cfg_factory):
    cfg = cfg_factory("logger=none", "model=small_cnn", "model.channels=[4,8]", *DIGITS, *LINK,
                      "analysis.linking.min_pairs=100000", name="few", config_name="analyze")
    with pytest.warns(UserWarning, match="min_pairs"):
        rec = analyze(cfg)["linking"]
    assert rec["linking/r2_heldout"] is None  # NaN, written as null
    assert not (Path(cfg.paths.output_dir) / "analysis/linking/linking_map.npz").exists()


@pytest.mark.parametrize("kwargs, key", [
    ({"psi": 1.5}, "psi"), ({"fit": {"alpha": -1}}, "fit.alpha"), ({"pairs": {"n_per_class": 0}}, "n_per_class"),
    ({"sweep": {"measures": ["smell"]}}, "sweep.measures"), ({"cf": {"pairs": [[0, 1, 2]]}}, "cf.pairs"),
    ({"sweep": {"n_steps": 1}}, "n_steps"),
])
def test_bad_values_name_the_key(kwargs, key):
    with pytest.raises(ConfigError, match=key):
        LinkingConfig(**kwargs)


def test_overlapping_heldout_seeds_and_missing_generator_are_config_errors(cfg_factory, tmp_path):
    cfg = cfg_factory("logger=none", "model=small_cnn", "model.channels=[4,8]", *DIGITS, *LINK,
                      "analysis.linking.pairs.heldout_base=10", name="overlap", config_name="analyze")
    with pytest.raises(ConfigError, match="overlap"):
        analyze(cfg)
    cfg = cfg_factory("logger=none", "model=small_cnn", "model.channels=[4,8]", *DIGITS, *LINK,
                      f"generator.ckpt={tmp_path}/missing.pt", name="nogen", config_name="analyze")
    with pytest.raises(ConfigError, match="missing.pt"):
        analyze(cfg)


def test_pair_counts_and_heldout_seeds_follow_the_head_width_and_the_classes():
    cb = Linking(classes=[996, 997, 998, 999])
    min_pairs, n_per_class, seed_base, heldout_base = cb._pair_counts(2048, [996, 997, 998, 999])
    assert (min_pairs, n_per_class, seed_base) == (4096, 1280, 0)  # 4 x 1280 = 5120 >= 2 d: a map is fitted
    assert heldout_base == 1000 * 20 * 1280  # right after class 999's last training seed: disjoint
    assert cb._pair_counts(128, [0, 1, 2, 3])[:2] == (256, 500)  # small heads keep 500 per class
    fixed = Linking(pairs={"n_per_class": 12, "heldout_base": 10**9}, min_pairs=4)
    assert fixed._pair_counts(2048, [0, 1]) == (4, 12, 0, 10**9)


def test_the_classifier_sees_the_central_crop_of_generated_images():
    data = SimpleNamespace(normalisation=lambda: ([0.0] * 3, [1.0] * 3), input_size=4, channels=3)
    x = torch.rand(2, 3, 8, 8)
    stylegan_like = SimpleNamespace(classifier_crop=0.5)
    torch.testing.assert_close(Linking()._view(data, stylegan_like, "cpu")(x), x[..., 2:6, 2:6])
    whole = Linking(crop=1.0)._view(data, stylegan_like, "cpu")(x)  # the option to resize the whole image
    torch.testing.assert_close(whole, torch.nn.functional.interpolate(x, size=(4, 4), mode="bilinear",
                                                                      antialias=True))
    big = torch.rand(1, 3, 256, 256)
    assert torch.equal(lk.centre_crop(big, 224 / 256), big[..., 16:240, 16:240])


def test_a_head_module_that_is_not_the_final_layer_is_a_config_error(cfg_factory):
    with pytest.raises(ValueError, match="not the final layer"):
        lk.FeatureExtractor(mlp := MLP(12, [8, 8], 3), "features.1")(torch.rand(2, 12))
    r, logits = lk.FeatureExtractor(mlp, "classifier")(torch.rand(2, 12))
    assert r.shape == (2, 8) and logits.shape == (2, 3)
    cfg = cfg_factory("logger=none", "model=mlp", "model.hidden=[8,8]", *DIGITS, *LINK,
                      "analysis.linking.head_module=features.1", name="midhead", config_name="analyze")
    with pytest.raises(ConfigError, match=r"head_module.*not the final layer"):
        analyze(cfg)


@pytest.mark.slow
def test_cpu_targets_on_a_trained_classifier_and_cvae(cfg_factory):
    """§9.9 project targets (not paper numbers), on digits: the small CNN after 8 epochs and a 10-epoch cVAE."""
    base = [o for o in TINY if not o.startswith(("analysis.", "data.", "trainer.max_epochs", "model.channels"))]
    cfg = cfg_factory(*DIGITS[:-1], "analysis=none", "trainer.max_epochs=8", name="clf",
                      base=base)
    metrics = train(cfg)
    assert metrics["val/acc"] > 0.9
    acfg = cfg_factory("logger=none", *DIGITS[:-1], "generator.epochs=10", "analysis=linking",
                       "analysis.linking.pairs.n_per_class=150", "analysis.linking.pairs.heldout_per_class=30",
                       "analysis.linking.cf.max_steps=300", "analysis.linking.sweep.units_per_epoch=16",
                       "analysis.linking.fit.mlp=true",
                       f"ckpt_path={cfg.paths.output_dir}/checkpoints/last.ckpt", name="link", config_name="analyze")
    rec = analyze(acfg)["linking"]
    assert rec["linking/keep_rate"] >= 0.5
    assert rec["linking/cycle_top1"] >= 0.5  # chance: 0.25 with 4 classes
    assert rec["linking/r2_heldout"] > 0
    assert rec["linking/units/fidelity_rate"] > 0.5
    assert 0 <= rec["linking/cf/success_rate"] <= 1
    assert rec["linking/mlp_r2"] > 0  # the non-linear baseline (the paper: linear suffices)
    torch.testing.assert_close(torch.tensor(rec["linking/n_pairs"]), torch.tensor(600.0))


def test_tables_and_figures_reach_an_offline_wandb_run(cfg_factory, offline_wandb):
    base = [o for o in TINY if not o.startswith(("analysis.", "data.", "logger"))]
    media = wandb_media(offline_wandb(cfg_factory(*DIGITS, *LINK, "logger=wandb", "model.channels=[8,16]",
                                                  "trainer.max_epochs=1", name="wb", base=base)))
    assert {"cf", "unit", "counterfactuals"} <= media, media  # the counterfactual table, sweep and path images


def test_shapes_generator_masks_give_per_part_changes(cfg_factory):
    """On shapes the cVAE decodes part masks, so the unit table has per-part columns (spec §4.3 (i))."""
    cfg = cfg_factory("logger=none", "model=small_cnn", "model.channels=[4,8]", "data=shapes", "data.image_size=16",
                      "data.n_train=256", "data.n_val=64", "data.n_test=64", "generator.epochs=1", *LINK,
                      "analysis.linking.pairs.draw_factor=40", "analysis.linking.min_pairs=2",
                      "analysis.linking.classes=null",  # an untrained classifier: whichever class it says
                      "analysis.linking.cf.pairs=[[0,1]]",
                      name="shapes", config_name="analyze")
    analyze(cfg)
    changes = pd.read_csv(Path(cfg.paths.output_dir) / "analysis/linking/unit_changes.csv")
    for part in ("background", "body", "rim"):
        assert {f"{part}/area", f"{part}/luminance", f"{part}/cx"} <= set(changes.columns), part
    # a 1-epoch mask head may paint everything as one part; that part's change is still measured (the others,
    # empty, are dropped as NaN)
    assert changes[[f"{part}/area" for part in ("background", "body", "rim")]].notna().to_numpy().any()
