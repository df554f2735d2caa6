"""analyze.py: the analyses of a finished model, from a checkpoint or a weights file, without training."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from featurelens.analyze import analyze
from featurelens.errors import ConfigError
from featurelens.results import read_results
from featurelens.train import train

ANALYZE = ["logger=none", "analysis.chirality.fmap.n_probe=16"]


@pytest.fixture
def trained(cfg_factory) -> Path:
    cfg = cfg_factory(name="train")
    train(cfg)
    return Path(cfg.paths.output_dir)


def test_checkpoint_analysis_reproduces_the_last_training_epoch(trained, cfg_factory):
    cfg = cfg_factory(f"ckpt_path={trained}/checkpoints/last.ckpt", *ANALYZE, name="an", config_name="analyze")
    record = analyze(cfg)["chirality"]
    last = read_results(trained / "analysis/chirality/results.jsonl")[-1]
    assert record["epoch"] == last["epoch"] == 2
    for key in ("chirality/model", "chirality/model_pooled", "chirality/layer/features.3/c",
                "chirality/fmap/logits", "chirality/flip_consistency"):
        assert record[key] == pytest.approx(last[key], abs=1e-12), key
    out = Path(cfg.paths.output_dir) / "analysis/chirality"
    assert [r["epoch"] for r in read_results(out / "results.jsonl")] == [2]
    assert (out / "conv1_by_rho.png").is_file() and (out / "table_epoch2.csv").is_file()


def test_local_weights_file_gives_the_same_values(trained, cfg_factory, tmp_path):
    ckpt = torch.load(trained / "checkpoints/last.ckpt", weights_only=False)
    weights = tmp_path / "net.pth"
    torch.save({k.removeprefix("net."): v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}, weights)
    cfg = cfg_factory("model=small_cnn", "model.channels=[4,8]", f"model.weights={weights}", "data=shapes",
                      "data.image_size=16", "data.n_train=128", "data.n_val=64", "data.n_test=64", *ANALYZE,
                      name="pth", config_name="analyze")
    record = analyze(cfg)["chirality"]
    last = read_results(trained / "analysis/chirality/results.jsonl")[-1]
    assert record["chirality/model"] == pytest.approx(last["chirality/model"], abs=1e-12)


def test_random_resnet18_matches_the_init_baseline(cfg_factory):
    cfg = cfg_factory("model=resnet18", "model.cifar_stem=false", "data=shapes", "data.n_train=64", "data.n_val=32",
                      "data.n_test=32", "analysis.chirality.fmap.enabled=false", "logger=none", name="r18",
                      config_name="analyze")
    record = analyze(cfg)["chirality"]
    assert record["chirality/model"] == pytest.approx(0.5530, abs=0.01)  # chirality spec §5.3


def test_missing_model_is_a_clear_error(cfg_factory):
    cfg = cfg_factory("logger=none", name="none", config_name="analyze")
    with pytest.raises(ConfigError, match="pass ckpt_path"):
        analyze(cfg)


@pytest.mark.parametrize("device, message", [("tpu", "use auto, cpu, cuda or cuda:N"),
                                             ("cuda", "no CUDA device here")])
def test_bad_device_is_a_clear_error(cfg_factory, device, message):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    cfg = cfg_factory("logger=none", "model=small_cnn", "data=shapes", f"device={device}", name=device,
                      config_name="analyze")
    with pytest.raises(ConfigError, match=message):
        analyze(cfg)
