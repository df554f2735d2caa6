"""The callbacks, debug and hparams_search config groups, run as a user would (issue 14 item 5)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, TINY

from featurelens.results import read_results
from featurelens.train import train

NO_BAR = [o for o in TINY if not o.startswith("callbacks.")]


def _epochs(cfg) -> list[int]:
    return [r["epoch"] for r in read_results(Path(cfg.paths.output_dir) / "analysis/chirality/results.jsonl")]


def test_callbacks_none_trains_without_checkpoints(cfg_factory):
    cfg = cfg_factory("callbacks=none", "trainer.max_epochs=1", base=NO_BAR)
    assert not cfg.callbacks
    assert train(cfg)["epochs"] == 1
    assert not (Path(cfg.paths.output_dir) / "checkpoints").exists() and _epochs(cfg) == [0, 1]


def test_early_stopping_by_name_stops_and_the_analyses_take_the_stop_as_the_last_epoch(cfg_factory):
    """min_delta=1 on val/acc: the first epoch sets the best, the second cannot beat it by 1, patience 0 stops."""
    cfg = cfg_factory("callbacks=early_stopping", "callbacks.early_stopping.patience=0",
                      "callbacks.early_stopping.min_delta=1.0", "trainer.max_epochs=5", "analysis=[chirality]")
    assert train(cfg)["epochs"] == 2
    assert _epochs(cfg) == [0, 1, 2]
    summary = Path(cfg.paths.output_dir) / "analysis/chirality/summary.json"
    assert summary.exists()  # the run's end was reached: the analyses finished


@pytest.mark.parametrize("debug", ["fdr", "limit", "overfit", "profiler"])
def test_every_debug_config_runs(cfg_factory, debug):
    base = [o for o in TINY if o != "logger=none" and not (debug == "overfit" and o.startswith("analysis."))]
    cfg = cfg_factory(f"debug={debug}", "trainer.max_epochs=1", base=base)  # the debug config turns W&B off
    assert cfg.task_name == "debug" and not cfg.logger and cfg.extras.ignore_warnings is False
    metrics = train(cfg)
    assert metrics["epochs"] == 1 and "test/acc" in metrics


def test_overfitting_three_batches_drives_the_training_loss_down(cfg_factory):
    """The small CNN at its default width memorises 3 batches of 16 (0.35 measured; ln 10 = 2.3 at chance)."""
    cfg = cfg_factory("debug=overfit", "trainer.max_epochs=30", "optimizer=adam", "model.recipe.adam.lr=0.003",
                      "data.batch_size=16", base=[o for o in TINY if not o.startswith(("analysis.", "model.channels"))])
    assert cfg.trainer.overfit_batches == 3 and not cfg.analysis
    assert train(cfg)["train/loss_epoch"] < 0.8


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("hydra_plugins.hydra_optuna_sweeper") is None,
                    reason="hydra-optuna-sweeper is not installed")
def test_hparams_search_runs_an_optuna_study(tmp_path):
    run = subprocess.run([sys.executable, str(ROOT / "train.py"), "hparams_search=optuna", "hydra.sweeper.n_trials=2",
                          *(o for o in TINY if not o.startswith("analysis.")), "trainer.max_epochs=1", "analysis=none",
                          f"hydra.sweep.dir={tmp_path}"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Best parameters" in run.stderr + run.stdout
    best = (tmp_path / "optimization_results.yaml").read_text()  # data.batch_size is fixed by TINY's override
    assert "optimizer.lr" in best and "data.batch_size" not in best
    assert len(list(tmp_path.glob("*/metrics.json"))) == 2
