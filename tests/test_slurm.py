"""A sweep submitted to a real SLURM cluster through Hydra's submitit launcher (issue 15 item 1).

``bash scripts/slurm_local.sh start`` installs SLURM from the system packages and starts a one-node cluster on
this machine; ``.ci/run`` does that when it can and then sets ``FEATURELENS_SLURM_PARTITION``. Without it the
test is skipped, saying so."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT
from omegaconf import OmegaConf

from featurelens.results import read_results

PARTITION = os.environ.get("FEATURELENS_SLURM_PARTITION")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    not PARTITION or shutil.which("sbatch") is None,
    reason="no local SLURM cluster (bash scripts/slurm_local.sh start, then FEATURELENS_SLURM_PARTITION=featurelens;"
           " .ci/run does both where it can)")]


def test_a_sweep_runs_as_slurm_array_jobs_through_the_submitit_launcher(tmp_path):
    sweep = tmp_path / "sweep"
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    args = ["-m", "hydra/launcher=slurm", f"hydra.launcher.partition={PARTITION}", "hydra.launcher.cpus_per_task=1",
            "hydra.launcher.mem_gb=2", "hydra.launcher.gpus_per_node=null", "hydra.launcher.timeout_min=20",
            "model=small_cnn,mlp", "trainer.max_epochs=1", "data.image_size=16", "data.n_train=128", "data.n_val=64",
            "data.n_test=64", "data.batch_size=32", "logger=none", "callbacks.progress_bar.refresh_rate=0",
            "analysis.chirality.fmap.n_probe=16", f"hydra.sweep.dir={sweep}"]
    res = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], capture_output=True, text=True,
                         cwd=tmp_path, env=env, timeout=1200)
    assert res.returncode == 0, res.stderr[-3000:]
    # the launcher submitted one SLURM array of two tasks to the partition, and each task ran its job
    scripts = list(sweep.glob(".submitit/*/*_submission.sh"))
    assert scripts, sorted(str(p) for p in sweep.rglob("*"))[:20]
    text = scripts[0].read_text()
    assert f"#SBATCH --partition={PARTITION}" in text and "#SBATCH --array=0-1" in text
    logs = sorted(sweep.glob(".submitit/*_*/*_log.out"))
    assert len(logs) == 2
    jobs = sorted(p.parent for p in sweep.glob("*/metrics.json"))
    assert [j.name.split("_")[0] for j in jobs] == ["0", "1"]
    assert {OmegaConf.load(job / ".hydra/config.yaml").model.arch for job in jobs} == {"small_cnn", "mlp"}
    for job in jobs:
        assert [r["epoch"] for r in read_results(job / "analysis/class_filters/results.jsonl")] == [0, 1]
    tables = subprocess.run([sys.executable, str(ROOT / "scripts/make_tables.py"), str(sweep), "--out",
                             str(tmp_path / "tables"), "--keep-untrained"], capture_output=True, text=True,
                            timeout=300)
    assert tables.returncode == 0, tables.stderr
    assert (tmp_path / "tables" / "report.html").is_file()
