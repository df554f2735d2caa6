"""End-to-end training runs on the embedded shapes data: outputs, analysis timing, seeds, resume, NaN."""

from __future__ import annotations

import copy
import errno
import json
import logging
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TINY
from omegaconf import OmegaConf

from featurelens.errors import DiskFullError, DivergedError, NonFiniteLossError
from featurelens.models import build_model, init_weights
from featurelens.results import read_results
from featurelens.train import train


def _records(run_dir: Path) -> list[dict]:
    return read_results(run_dir / "analysis" / "chirality" / "results.jsonl")


def test_default_run_writes_every_output(cfg_factory, caplog):
    cfg = cfg_factory()
    with caplog.at_level(logging.INFO, logger="featurelens"):
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
    # one log line per analysis and epoch, with its headline values and time
    lines = [r.getMessage() for r in caplog.records]
    for name, key in (("chirality", "model"), ("class_filters", "acc_decomposed")):
        done = [line for line in lines if line.startswith(f"{name} epoch ")]
        assert [line.split(":")[0] for line in done] == [f"{name} epoch {e}" for e in (0, 1, 2)], lines
        assert all(f"{key}=" in line and line.endswith(" s)") for line in done), done
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


def test_offline_wandb_run_reads_by_section_with_constants_in_the_config_and_artifacts(cfg_factory, offline_wandb):
    """Issue 14 item 3, read back from the offline run file (written without a login): the headline values in
    the analysis' own section, the rest in ``<name>_detail``, both against the epoch; setup constants in the
    config and end-of-run values in the summary, neither as a series; checkpoint and results artifacts."""
    import json

    from conftest import wandb_records

    run_dir = offline_wandb(cfg_factory("logger=wandb", "trainer.max_epochs=3", "logger.wandb.log_model=true",
                                        name="wb"))  # 3 trained epochs: chirality's end-of-run Spearman rho
    rec = wandb_records(run_dir)
    rows = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            for r in rec["history"]]
    media = {k.removesuffix("/_type") for r in rows for k in r if k.endswith("/_type")}  # figures and tables
    logged = {k for r in rows for k in r if not k.startswith(tuple(f"{m}/" for m in media)) and k not in media}
    assert {"chirality/model", "chirality/model_pooled", "class_filters/acc_full", "class_filters/acc_decomposed",
            "class_filters/jaccard_mean"} <= logged  # the headline sections
    assert {k for k in logged if k.startswith(("chirality/", "class_filters/"))} == {
        "chirality/model", "chirality/model_pooled", "class_filters/acc_full", "class_filters/acc_decomposed",
        "class_filters/jaccard_mean"}
    assert {"chirality_detail/model_paramw", "chirality_detail/layer/features.0/c",
            "class_filters_detail/k5/acc_decomposed"} <= logged
    assert [r["epoch"] for r in rows if "chirality/model" in r] == [0, 1, 2, 3]
    axes = {(m.metric.glob_name or m.metric.name): m.metric.step_metric for m in rec["metric"]}
    assert axes["chirality/*"] == axes["chirality_detail/*"] == axes["class_filters_detail/*"] == "epoch"
    constants = ("class_filters/dim", "class_filters/k", "chirality/layer/features.0/n_slices")
    config = {item.key: json.loads(item.value_json) for r in rec["config"] for item in r.config.update}
    assert config["class_filters/dim"] == 8 and config["class_filters/k"] == 5
    assert config["chirality/layer/features.0/n_slices"] == 4 * 3  # 4 kernels x 3 input channels
    series = [*constants, *(c.replace("/", "_detail/", 1) for c in constants)]
    assert not any(name in logged for name in series)
    summary = {i.key or "/".join(i.nested_key) for r in rec.get("summary", []) for i in r.summary.update}
    ends = json.loads((run_dir / "analysis/chirality/summary.json").read_text())
    assert "chirality/summary/spearman_acc" in ends and {k for k in ends if k != "epochs"} <= summary
    assert not any("/summary/" in k for k in logged)
    kinds = {r.artifact.type for r in rec["artifact"]}
    assert {"model", "results"} <= kinds
    (results,) = [r.artifact for r in rec["artifact"] if r.artifact.type == "results"]
    names = {e.path for e in results.manifest.contents}
    assert {"report.html", "metrics.json", "analysis/chirality/results.jsonl"} <= names


def test_mlp_run_warns_once_and_logs_no_chirality(cfg_factory):
    base = [o for o in TINY if not o.startswith("model")]
    cfg = cfg_factory("model=mlp", "model.hidden=[16]", "trainer.max_epochs=1", name="mlp", base=base)
    with pytest.warns(UserWarning, match="no eligible"):
        train(cfg)
    records = _records(Path(cfg.paths.output_dir))
    assert [r["epoch"] for r in records] == [0, 1]
    assert not any(k.startswith("chirality/model") for r in records for k in r)


def _cli_run(run_dir: Path, *overrides: str, kill_epoch: int = 99, base: list[str] = TINY,
             signal: str = "SIGKILL") -> subprocess.CompletedProcess:
    """train.py in a fresh process; every run carries the same callbacks (the kill only fires in one), since on
    this CPU even a different callback list moves the float results in the last bits."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests")}
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *base, "trainer.max_epochs=3",
                           "trainer.deterministic=true", f"hydra.run.dir={run_dir}",
                           "+callbacks.kill._target_=conftest.KillAt", f"+callbacks.kill.epoch={kill_epoch}",
                           "+callbacks.kill.batch=2", f"+callbacks.kill.signal={signal}", *overrides],
                          capture_output=True, text=True, env=env, timeout=600)


def _run_files(run_dir: Path, partial: bool = False) -> dict[str, str]:
    """Every result a run leaves, by path: metrics, analysis records and tables (figures left out)."""
    files = {} if partial else {"metrics.json": (run_dir / "metrics.json").read_text()}
    for p in sorted((run_dir / "analysis").rglob("*")):
        if p.suffix in (".jsonl", ".csv", ".json"):
            files[str(p.relative_to(run_dir))] = p.read_text()
    return files


RESUMED_ANALYSES = ["analysis=[chirality,class_filters,dissection,specialization]",
                    "analysis.dissection.synthbroden.n_images=24", "analysis.dissection.batch_size=16",
                    "analysis.specialization.k=3", "analysis.specialization.n_shuffles=2",
                    "analysis.specialization.act_samples=40"]


def _kill_and_resume(tmp_path: Path, *overrides: str, base: list[str] = TINY) -> dict[str, str]:
    """A 3-epoch run, the same run killed (-9) mid epoch 2 and resumed from its last checkpoint: asserts that
    every record and side file of the two halves equals the uninterrupted run's; returns them by path."""
    full = _cli_run(tmp_path / "full", *overrides, base=base)
    assert full.returncode == 0, full.stderr[-3000:]
    killed = _cli_run(tmp_path / "killed", *overrides, kill_epoch=2, base=base)
    assert killed.returncode == -signal.SIGKILL
    last = tmp_path / "killed" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["epoch"] == 1
    resumed = _cli_run(tmp_path / "resumed", *overrides, f"ckpt_path={last}", base=base)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # the resumed run's own dir holds the whole records history; tables of epochs before the kill stay in the first
    want = _run_files(tmp_path / "full")
    got = {**_run_files(tmp_path / "killed", partial=True), **_run_files(tmp_path / "resumed")}
    assert got.keys() == want.keys()
    for name in want:
        assert got[name] == want[name], name
    return want


@pytest.mark.slow
def test_kill_9_mid_epoch_then_resume_equals_the_uninterrupted_run(tmp_path):
    files = _kill_and_resume(tmp_path, *RESUMED_ANALYSES)
    assert {name.split("/")[1] for name in files if name.startswith("analysis/")} == {
        "chirality", "class_filters", "dissection", "specialization"}
    records = read_results(tmp_path / "resumed" / "analysis" / "class_filters" / "results.jsonl")
    first_resumed = records[2]
    assert first_resumed["epoch"] == 2
    assert {"train/acc", "train/loss_epoch", "val/acc", "class_filters/stability"} <= set(first_resumed)
    # specialization analyses epochs 0 and 3: the resumed run compares epoch 3 with the checkpointed epoch-0 labels
    spec = read_results(tmp_path / "resumed" / "analysis" / "specialization" / "results.jsonl")
    assert [r["epoch"] for r in spec] == [0, 3] and "specialization/weights/ari_prev_epoch" in spec[1]


@pytest.mark.slow
def test_kill_9_then_resume_equals_the_uninterrupted_run_for_linking(tmp_path):
    """Linking on digits (a 1-epoch cVAE, cached after the first run): the classifier learns enough in one
    epoch for pairs to pass the keep filter, so the resumed epochs fit maps and write every side file."""
    base = [o for o in TINY if not o.startswith(("analysis.", "data."))]
    files = _kill_and_resume(tmp_path, "data=digits", "data.image_size=16", "data.batch_size=64",
                             "generator.epochs=1", "model.channels=[8,16]", "analysis=[linking]",
                             "analysis.linking.pairs.n_per_class=12", "analysis.linking.pairs.heldout_per_class=4",
                             "analysis.linking.min_pairs=4", "analysis.linking.cf.max_steps=5",
                             "analysis.linking.sweep.units_per_epoch=4", "analysis.linking.sweep.samples=2",
                             "analysis.linking.ref_set.samples_per_class=3", "analysis.linking.classes=[0,1,2]",
                             base=[o for o in base if o != "model.channels=[4,8]"])
    assert {"analysis/linking/counterfactuals.csv", "analysis/linking/selective_units.csv",
            "analysis/linking/unit_summary.csv"} <= set(files)
    records = read_results(tmp_path / "resumed" / "analysis" / "linking" / "results.jsonl")
    assert [r["epoch"] for r in records] == [0, 1, 2, 3] and records[2]["linking/r2_heldout"] is not None


@pytest.mark.slow
@pytest.mark.parametrize("sig, status", [("SIGTERM", 143), ("SIGINT", 130)])
def test_sigterm_and_ctrl_c_stop_the_run_at_once_with_one_line_and_the_last_checkpoint(tmp_path, sig, status):
    run = tmp_path / "run"
    stopped = _cli_run(run, "analysis=[chirality]", kill_epoch=1, signal=sig)
    last = run / "checkpoints" / "last.ckpt"
    assert stopped.returncode == status, stopped.stderr[-3000:]
    assert f"featurelens: interrupted by {sig}: the last checkpoint, of the last finished epoch, is {last}; " \
           f"resume with ckpt_path={last}" in stopped.stderr
    assert "Traceback" not in stopped.stderr
    assert (run / "FAILED").read_text().startswith(f"Interrupted: interrupted by {sig}")
    assert torch.load(last, weights_only=False)["epoch"] == 0  # epoch 1 stopped at its third batch
    assert [r["epoch"] for r in _records(run)] == [0, 1]  # nothing analysed after the signal
    resumed = _cli_run(tmp_path / "resumed", "analysis=[chirality]", f"ckpt_path={last}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [r["epoch"] for r in _records(tmp_path / "resumed")] == [0, 1, 2, 3]


def test_train_metrics_in_a_record_are_that_epochs(cfg_factory):
    cfg = cfg_factory("trainer.max_epochs=2", "logger=csv")
    train(cfg)
    run = Path(cfg.paths.output_dir)
    import pandas as pd

    logged = pd.read_csv(next(run.glob("csv/version_*/metrics.csv"))).dropna(subset=["train/acc"])
    records = _records(run)
    assert "train/acc" not in records[0]  # epoch 0: before any training
    for epoch in (1, 2):
        assert records[epoch]["train/acc"] == pytest.approx(logged[logged.epoch == epoch - 1]["train/acc"].item())


def test_huge_lr_stops_with_a_clear_error_and_a_resumable_checkpoint(cfg_factory):
    cfg = cfg_factory("trainer.max_epochs=3", "optimizer.lr=1e6", "model.recipe.warmup_epochs=0", name="huge")
    with pytest.raises(DivergedError, match=r"at epoch 0, step \d+ .*optimizer SGD\(lr=1000000.0"):
        train(cfg)
    assert not (Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt").exists()  # nothing good to keep


def test_exploding_loss_stops_the_run_and_keeps_the_last_good_epoch(cfg_factory):
    cfg = cfg_factory("trainer.max_epochs=3", "+callbacks.blowup._target_=conftest.ScaleWeightsAt",
                      "+callbacks.blowup.epoch=1", name="exploded")
    with pytest.raises(DivergedError, match=r"loss .* at epoch 1, .* exceeds 20 x .*lower optimizer.lr") as err:
        train(cfg)
    assert not isinstance(err.value, NonFiniteLossError)
    last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["epoch"] == 0
    resumed = cfg_factory("trainer.max_epochs=3", f"ckpt_path={last}", name="after")
    assert train(resumed)["epochs"] == 3


def test_disk_full_stops_with_a_clear_error_and_the_last_checkpoint_intact(cfg_factory, monkeypatch):
    cfg = cfg_factory("trainer.max_epochs=3", name="full_disk")
    import featurelens.checkpoints as checkpoints

    real_save, calls = torch.save, []

    def save_until_full(obj, fh, *args, **kwargs):
        calls.append(1)
        if len(calls) > 2:  # best.ckpt and last.ckpt of epoch 0 fit; then the disk is full
            fh.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device", str(fh.name))
        return real_save(obj, fh, *args, **kwargs)

    monkeypatch.setattr(checkpoints.torch, "save", save_until_full)
    with pytest.raises(OSError) as err:
        train(cfg)
    from featurelens.runtime import user_error

    known = user_error(err.value)
    assert isinstance(known, DiskFullError) and "free some space, then resume with ckpt_path=" in str(known)
    monkeypatch.setattr(checkpoints.torch, "save", real_save)
    last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["epoch"] == 0  # the complete checkpoint of epoch 0 survived
    assert not list(last.parent.glob(".*.tmp"))
    resumed = cfg_factory("trainer.max_epochs=3", f"ckpt_path={last}", name="after_full")
    assert train(resumed)["epochs"] == 3


@pytest.mark.parametrize("model", ["small_cnn", "mlp"])
@pytest.mark.parametrize("init", ["default", "normal", "uniform", "xavier_normal", "xavier_uniform", "kaiming_normal",
                                  "kaiming_uniform", "orthogonal"])
def test_every_init_trains_two_epochs_without_diverging(cfg_factory, model, init):
    """The small nets with every init of the init group and their own recipes (the torchvision models are
    checked by hand on the README's sweep; too slow for this suite)."""
    base = [o for o in TINY if not o.startswith(("model", "analysis"))]
    size = ["model.channels=[8,16]"] if model == "small_cnn" else ["model.hidden=[32,32]"]
    cfg = cfg_factory(f"model={model}", *size, f"init={init}", "analysis=none", "test=false", base=base)
    metrics = train(cfg)  # a diverging run raises DivergedError
    assert metrics["epochs"] == 2 and torch.isfinite(torch.tensor(metrics["val/loss"]))


@pytest.mark.parametrize("method", ["kaiming_normal", "kaiming_uniform"])
def test_kaiming_draws_conv_layers_with_mode_and_linear_layers_with_linear_mode(method):
    """A fan_out draw of a 4096 -> 10 head has std sqrt(2/10): initial losses of 30-100 on VGG-16 (issue 10)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(8, 64, 3), torch.nn.Flatten(), torch.nn.Linear(4096, 10))
    init_weights(net, method, mode="fan_out", nonlinearity="relu")
    assert float(net[0].weight.std()) == pytest.approx(math.sqrt(2 / (64 * 9)), rel=0.05)
    assert float(net[2].weight.std()) == pytest.approx(math.sqrt(2 / 4096), rel=0.05)
    init_weights(net, method, mode="fan_in", linear_mode="fan_out", nonlinearity="relu")
    assert float(net[0].weight.std()) == pytest.approx(math.sqrt(2 / (8 * 9)), rel=0.05)
    assert float(net[2].weight.std()) == pytest.approx(math.sqrt(2 / 10), rel=0.05)


def test_one_validation_epoch_above_the_bound_is_not_divergence_two_in_a_row_are():
    """Eval-mode BN statistics can lag fast-moving weights for an epoch (ResNet-50 at warm-up: val loss 4224
    at epoch 0 with a training loss of 3-5): the validation check needs two epochs in a row."""
    from featurelens.module import Classifier

    module = Classifier({"num_classes": 10}, {"_target_": "torch.optim.SGD", "lr": 0.1},
                        net=torch.nn.Linear(4, 10))
    module.loss_ref = math.log(10)
    bound = 20 * math.log(10)
    module._check_loss(bound * 10, "validation", patience=2)  # first epoch over: a warning sign only
    module._check_loss(1.0, "validation", patience=2)  # recovered: the count restarts
    module._check_loss(bound * 10, "validation", patience=2)
    with pytest.raises(DivergedError, match=r"validation loss .* \(2 epochs in a row\)"):
        module._check_loss(bound * 2, "validation", patience=2)
    with pytest.raises(DivergedError):  # a training step above the bound stops at once
        module._check_loss(bound * 2, "training")
    checkpoint: dict = {}
    module.on_save_checkpoint(checkpoint)
    assert checkpoint["featurelens"]["val_over_bound"] == 2  # survives a resume


def test_bn_settle_steps_is_where_the_running_statistics_forget_their_start():
    from featurelens.module import bn_settle_steps

    assert bn_settle_steps(build_model("small_cnn", 10, channels=[4])) == 44  # 0.9^44 = 0.0097 < 0.01 < 0.9^43
    assert bn_settle_steps(torch.nn.Sequential(torch.nn.BatchNorm2d(3, momentum=0.5))) == 7
    assert bn_settle_steps(torch.nn.Sequential(torch.nn.BatchNorm2d(3, momentum=None))) == 0
    assert bn_settle_steps(build_model("mlp", 10, 3, image_size=8, hidden=[16])) == 0


def test_a_short_bn_run_is_not_stopped_by_its_unsettled_eval_mode_loss(cfg_factory):
    """ResNet-18 on 4 steps an epoch (as ``debug=limit`` runs it): its eval-mode validation loss was 664 at epochs
    0 and 1, 250x the bound, with running statistics still mostly their initial values, and the run stopped as
    diverged; before ``bn_settle_steps`` (44) training steps the validation loss is not held to the bound."""
    base = [o for o in TINY if not o.startswith(("model", "analysis"))]
    cfg = cfg_factory("model=resnet18", "init=orthogonal", "analysis=none", "test=false", "logger=csv", base=base)
    metrics = train(cfg)
    assert metrics["epochs"] == 2 and metrics["val/loss"] > 20 * math.log(10)  # above the bound, not stopped


def test_head_lr_scale_gives_the_head_its_own_learning_rate():
    """ResNet-50's recipe trains its 2048-feature head at 0.01 x lr (README, Sweeps): two parameter groups."""
    from featurelens.module import Classifier

    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 10))
    sgd = {"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.1, "momentum": 0.9}
    model_cfg = {"num_classes": 10, "arch": "toy", "head_module": "2"}
    scaled = Classifier(model_cfg, {**sgd, "head_lr_scale": 0.01}, net=net).configure_optimizers()["optimizer"]
    body, head = scaled.param_groups
    assert [p.shape for p in body["params"]] == [(8, 4), (8,)] and body["lr"] == 0.1
    assert [p.shape for p in head["params"]] == [(10, 8), (10,)] and head["lr"] == pytest.approx(0.001)
    assert head["momentum"] == 0.9
    plain = Classifier(model_cfg, {**sgd, "head_lr_scale": 1}, net=net).configure_optimizers()["optimizer"]
    assert len(plain.param_groups) == 1 and len(plain.param_groups[0]["params"]) == 4


@pytest.mark.parametrize(("optimizer", "ratio"), [("adafactor", [1.0, 1.0, 1.0]), ("sgd", [1 / 16, 16.0, 1.0])])
def test_adafactor_moves_each_layer_by_the_same_share_whatever_the_init_s_scale(cfg_factory, optimizer, ratio):
    """Why plain VGG-16 trains with Adafactor (README, Sweeps): a bias-free ReLU net is the same function when
    one layer is scaled up by c and the next down by c; Adafactor's step on each layer is then the same share of
    its weights, SGD's is c**2 times smaller on the scaled-up layer (xavier starves SGD like that)."""
    from featurelens.module import Classifier

    torch.manual_seed(0)
    layers = [torch.nn.Linear(16, 16, bias=False), torch.nn.ReLU(), torch.nn.Linear(16, 16, bias=False),
              torch.nn.ReLU(), torch.nn.Linear(16, 10, bias=False)]
    plain, scaled = torch.nn.Sequential(*layers), copy.deepcopy(torch.nn.Sequential(*layers))
    with torch.no_grad():
        scaled[0].weight.mul_(4.0)
        scaled[2].weight.div_(4.0)
    x, y = torch.randn(32, 16), torch.randint(0, 10, (32,))
    assert torch.allclose(plain(x), scaled(x), atol=1e-6)
    opt_cfg = OmegaConf.to_container(cfg_factory("model=vgg16", f"optimizer={optimizer}", "optimizer.weight_decay=0",
                                                 base=[]).optimizer, resolve=True)
    shares = []
    for net in (plain, scaled):
        before = [m.weight.detach().clone() for m in net[::2]]
        opt = Classifier({"num_classes": 10}, dict(opt_cfg), net=net).configure_optimizers()["optimizer"]
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
        shares.append(torch.stack([(m.weight - w).norm() / w.norm() for m, w in zip(net[::2], before, strict=True)]))
    assert torch.allclose(shares[0], shares[1], rtol=1e-4) == (ratio == [1.0, 1.0, 1.0])
    assert torch.allclose(shares[1] / shares[0], torch.tensor(ratio), rtol=1e-4)  # SGD: grad / c over weight × c
    assert float(shares[0].min()) > 0


@pytest.mark.parametrize("ignore", [True, False])
def test_a_run_starts_with_its_summary_and_without_the_known_third_party_noise(tmp_path, ignore):
    tiny = [o for o in TINY if not o.startswith("analysis.")]
    res = subprocess.run([sys.executable, str(ROOT / "train.py"), *tiny, "trainer.max_epochs=1", "analysis=none",
                          "test=false", f"hydra.run.dir={tmp_path}", f"extras.ignore_warnings={str(ignore).lower()}"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout + res.stderr
    assert "config: optimizer=sgd model=small_cnn init=default data=shapes" in out and "analyses: none" in out
    assert "seed 0, 1 epochs" in out and f"outputs: {tmp_path}" in out
    # Lightning's litlogger advert and its LeafSpec deprecation warning: hidden only by the switch
    assert ("💡 Tip:" in out, "LeafSpec" in out) == ((False, False) if ignore else (True, True))
