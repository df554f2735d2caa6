"""End-to-end training runs on the embedded shapes data: outputs, analysis timing, seeds, resume, NaN."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import TINY

from featurelens.errors import NonFiniteLossError
from featurelens.results import read_results
from featurelens.train import train


def _records(run_dir: Path) -> list[dict]:
    return read_results(run_dir / "analysis" / "chirality" / "results.jsonl")


def test_default_run_writes_every_output(cfg_factory):
    cfg = cfg_factory()
    metrics = train(cfg)
    run = Path(cfg.paths.output_dir)
    assert {"val/acc", "test/acc", "train/loss"} <= set(metrics)
    assert json.loads((run / "metrics.json").read_text())["epochs"] == 2
    assert (run / "checkpoints" / "last.ckpt").is_file() and (run / "checkpoints" / "best.ckpt").is_file()
    records = _records(run)
    # epoch 0 before any step, then once per epoch; the sanity check adds nothing
    assert [r["epoch"] for r in records] == [0, 1, 2]
    assert records[0]["step"] == 0 and records[1]["step"] > 0
    for r in records:
        assert 0 < r["chirality/model"] < 1
        assert {"chirality/layer/features.0/c", "chirality/model_pooled", "chirality/hist/features.0"} <= set(r)
    # feature-map chirality runs at epoch 0, every 5th and the last epoch (fmap.every_n_epochs=5)
    assert ["chirality/flip_consistency" in r for r in records] == [True, False, True]
    assert "val/acc" in records[1] and "val/acc" not in records[0]
    out = run / "analysis" / "chirality"
    for name in ("chirality_vs_epoch.png", "rho_hist_first_last.png", "c_norm_by_layer.png", "conv1_by_rho.png",
                 "table_epoch0.csv", "table_epoch2.csv", "summary.json"):
        assert (out / name).is_file(), name


def test_same_seed_same_results(cfg_factory):
    runs = []
    for name in ("a", "b"):
        cfg = cfg_factory("trainer.deterministic=true", name=name)
        train(cfg)
        runs.append(Path(cfg.paths.output_dir))
    assert _records(runs[0]) == _records(runs[1])
    m0, m1 = (json.loads((r / "metrics.json").read_text()) for r in runs)
    assert m0 == m1


def test_killed_run_resumes_without_duplicated_or_lost_epochs(cfg_factory):
    cfg = cfg_factory("trainer.max_epochs=3", "+callbacks.crash._target_=conftest.CrashAt",
                      "+callbacks.crash.epoch=2", name="killed")
    with pytest.raises(SystemExit):
        train(cfg)
    run = Path(cfg.paths.output_dir)
    assert [r["epoch"] for r in _records(run)] == [0, 1, 2]
    last = run / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["epoch"] == 1  # saved at the end of the 2nd epoch

    resumed = cfg_factory("trainer.max_epochs=3", f"ckpt_path={last}", name="resumed")
    train(resumed)
    records = _records(Path(resumed.paths.output_dir))
    assert [r["epoch"] for r in records] == [0, 1, 2, 3]
    assert records[:3] == _records(run)  # the restored history is carried into the new run's file


def test_nan_loss_stops_with_clear_error_and_keeps_last_good_checkpoint(cfg_factory):
    cfg = cfg_factory("trainer.max_epochs=3", "+callbacks.poison._target_=conftest.PoisonAt",
                      "+callbacks.poison.epoch=1", name="diverged")
    with pytest.raises(NonFiniteLossError, match="training loss became nan at epoch 1"):
        train(cfg)
    ckpt = torch.load(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["epoch"] == 0
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())


def test_offline_wandb_run_is_written_without_login(cfg_factory, offline_wandb):
    run_dir = offline_wandb(cfg_factory("logger=wandb", "trainer.max_epochs=1", name="wb"))
    runs = list(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(runs) == 1 and runs[0].stat().st_size > 0


def test_mlp_run_warns_once_and_logs_no_chirality(cfg_factory):
    base = [o for o in TINY if not o.startswith("model")]
    cfg = cfg_factory("model=mlp", "model.hidden=[16]", "trainer.max_epochs=1", name="mlp", base=base)
    with pytest.warns(UserWarning, match="no eligible"):
        train(cfg)
    records = _records(Path(cfg.paths.output_dir))
    assert [r["epoch"] for r in records] == [0, 1]
    assert not any(k.startswith("chirality/model") for r in records for k in r)
