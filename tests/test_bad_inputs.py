"""Every bad input a user can give stops the command with one `featurelens: error:` line naming it, exit code 2,
no traceback, nothing written over: a table of cases run through the real command-line entry points."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY, make_cfg
from hydra.core.global_hydra import GlobalHydra
from PIL import Image

from featurelens import analyze as analyze_cli
from featurelens import train as train_cli
from featurelens.data.synthbroden import cached_synthbroden
from featurelens.train import train

QUICK = [o for o in TINY if not o.startswith("analysis.")] + ["analysis=none", "test=false"]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """A real checkpoint of the tiny model and files that only look like one."""
    root = tmp_path_factory.mktemp("inputs")
    cfg = make_cfg(root / "run", [*QUICK, "trainer.max_epochs=1"])
    train(cfg)
    GlobalHydra.instance().clear()
    ckpt = root / "run" / "checkpoints" / "last.ckpt"
    data = ckpt.read_bytes()
    (root / "empty.ckpt").write_bytes(b"")
    (root / "truncated.ckpt").write_bytes(data[: len(data) // 2])
    (root / "notes.txt").write_text("these are not weights\n")
    torch.save({"conv.weight": torch.zeros(2)}, root / "state_dict.pt")
    broden = root / "broden"
    shutil.copytree(cached_synthbroden(root / "data", 8, 16, 0, "png"), broden)
    (broden / "images" / "synth" / "synth_000000.png").write_bytes(b"\x89PNG\r\n\x1a\n but the rest is garbage")
    return {"ckpt": ckpt, "empty": root / "empty.ckpt", "truncated": root / "truncated.ckpt",
            "text": root / "notes.txt", "state_dict": root / "state_dict.pt", "broden": broden}


def _run(entry, argv: list[str], tmp_path: Path, monkeypatch, capsys) -> tuple[int, str]:
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)  # as a user runs it
    monkeypatch.setattr(sys, "argv", ["prog", *argv, f"hydra.run.dir={tmp_path}/out", "hydra/job_logging=none",
                                      "hydra/hydra_logging=none"])
    GlobalHydra.instance().clear()
    with pytest.raises(SystemExit) as exit_info:
        entry.main()
    GlobalHydra.instance().clear()
    return exit_info.value.code, capsys.readouterr().err


TRAIN_CASES = [
    ("trainer.max_epochs=0", "trainer.max_epochs=0: must be a positive integer"),
    ("trainer.max_epochs=abc", "trainer.max_epochs='abc'"),
    ("optimizer.lr=-0.1", "optimizer.lr=-0.1: must be a finite number > 0"),
    ("optimizer.lr=abc", "optimizer.lr='abc'"),
    ("optimizer.weight_decay=-1", "optimizer.weight_decay=-1"),
    ("optimizer.head_lr_scale=0", "optimizer.head_lr_scale=0: must be a finite number > 0"),
    ("optimizer.head_lr_scale=0.5 model.head_module=null", "optimizer.head_lr_scale=0.5 needs model.head_module"),
    ("optimizer.head_lr_scale=0.5 model.head_module=fc", "model.head_module='fc' (for optimizer.head_lr_scale=0.5)"),
    ("data.batch_size=0", "data.batch_size=0"),
    ("data.batch_size=1.5", "data.batch_size=1.5"),
    ("data.num_workers=-1", "data.num_workers=-1"),
    ("data.image_size=7", "data.image_size=7: the shapes are rendered at 8 px or more"),
    ("data.image_size=abc", "data.image_size='abc'"),
    ("data.n_train=0", "data.n_train=0"),
    ("data.flip_aug=maybe", "data.flip_aug='maybe': must be true or false"),
    ("data.num_classes=5", "data.num_classes=5 but shapes has 10 classes"),
    ("seed=abc", "seed='abc': must be an integer"),
    ("seed=-1", "seed=-1"),
    ("init.method=he", "valid: ['default'"),
    ("init=kaiming init.linear_mode=fan_sideways", "init.linear_mode='fan_sideways' is unknown; valid: ['fan_in'"),
    ("model.input_size=big", "model.input_size='big'"),
    ("model.channels=abc", "model.channels='abc': must be a non-empty list of positive integers"),
    ("model.channels=[]", "model.channels=[]"),
    ("model.dropout=1.5", "model.dropout=1.5"),
    ("model.batch_norm=3", "model.batch_norm=3"),
    ("model=resnet18 model.cifar_stem=maybe", "model.cifar_stem='maybe': must be true, false or auto"),
    ("divergence_factor=0.5", "divergence_factor=0.5"),
    ("model.recipe.warmup_epochs=-1", "model.recipe.warmup_epochs=-1"),
    ("analysis=chirality analysis.chirality.every_n_epochs=0", "analysis.chirality.every_n_epochs=0"),
    ("+trainer.sync_batchnorm=true", "set trainer.sync_batchnorm=false"),
    ("trainer.precision=bogus", "trainer: "),
    ("model=alexnet model.input_size=null", "model=alexnet cannot take 16-px inputs"),
    ("init=kaiming model.weights=IMAGENET1K_V1", "use init=default"),
    ("data=imagefolder data.root=/no/such/folder data.num_classes=3", "data.root='/no/such/folder': no such folder"),
    ("model.weights=/no/such.pth", "model.weights='/no/such.pth': no such file"),
    ("model.weights={text}", "is not a readable torch file"),
    ("model.weights={state_dict}", "does not match small_cnn"),
    ("ckpt_path=/no/such.ckpt", "no such checkpoint file"),
    ("ckpt_path={empty}", "the file is empty (0 bytes)"),
    ("ckpt_path={truncated}", "is not a readable torch file, truncated or of another kind"),
    ("ckpt_path={text}", "is not a readable torch file"),
    ("ckpt_path={state_dict}", "is not a featurelens checkpoint"),
    ("ckpt_path={ckpt} model=mlp", "holds a small_cnn with 3 input channels and 10 classes, but this run builds a mlp"),
    ("ckpt_path={ckpt} model.channels=[4,4]",
     "tensors differ (e.g. classifier.weight: (10, 8) in the checkpoint, (10, 4) here)"),
    # Hydra cannot compose these; its list of valid choices is kept on the one line
    ("model=vgg99", "Could not find 'model/vgg99' Available options in 'model': alexnet, mlp, resnet18"),
    ("trainer.max_epoch=3", "Could not override 'trainer.max_epoch'"),
    ("experiment=nope", "Could not find 'experiment/nope'"),
    ("model=[", "model=[: no viable alternative"),
]

ANALYZE_CASES = [
    ("ckpt_path={empty}", "the file is empty (0 bytes)"),
    ("ckpt_path={truncated}", "is not a readable torch file"),
    ("ckpt_path={ckpt} data=digits", "holds a small_cnn with 3 input channels and 10 classes, but data=digits has "
                                     "data.channels=1"),
    ("ckpt_path={ckpt} device=tpu", "device='tpu': use auto, cpu, cuda or cuda:N"),
    ("analysis=chirality", "ckpt_path=null and no model given"),
    ("ckpt_path={ckpt} analysis=dissection analysis.dissection.broden_dir={broden}", "unreadable image"),
]


def _fill(case: str, files: dict[str, Path]) -> list[str]:
    return case.format(**{k: str(v) for k, v in files.items()}).split()


def _expand(case: str, files: dict[str, Path]) -> list[str]:
    """The case's overrides after the tiny base run's; a case choosing another model or data drops the base's
    settings of that group (a group option replaces the whole node)."""
    extra = _fill(case, files)
    groups = {o.split("=")[0] for o in extra if o.split("=")[0] in ("model", "data")}
    return [*(o for o in QUICK if o.split(".")[0] not in groups), *extra]


@pytest.mark.parametrize(("case", "needle"), TRAIN_CASES)
def test_train_rejects_bad_input_with_one_line(case, needle, files, tmp_path, monkeypatch, capsys):
    before = {p: p.stat().st_mtime_ns for p in files["ckpt"].parent.iterdir()}
    code, err = _run(train_cli, _expand(case, files), tmp_path, monkeypatch, capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert "Traceback" not in err
    assert [line for line in lines if line.startswith("featurelens: error:")] == lines[-1:], err
    assert needle in lines[-1]
    assert {p: p.stat().st_mtime_ns for p in files["ckpt"].parent.iterdir()} == before  # nothing overwritten


@pytest.mark.parametrize(("case", "needle"), ANALYZE_CASES)
def test_analyze_rejects_bad_input_with_one_line(case, needle, files, tmp_path, monkeypatch, capsys):
    code, err = _run(analyze_cli, ["logger=none", *_fill(case, files)], tmp_path, monkeypatch, capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert "Traceback" not in err
    assert lines[-1].startswith("featurelens: error:") and needle in lines[-1], err


def test_a_bug_keeps_its_traceback(files, tmp_path, monkeypatch, capsys):
    """Only user-facing conditions become one line: an internal error still shows where it happened."""
    def broken(*args, **kwargs):
        raise KeyError("an internal bug")

    monkeypatch.setattr(train_cli, "build_loggers", broken)
    code, err = _run(train_cli, QUICK, tmp_path, monkeypatch, capsys)
    assert code == 1 and "Traceback" in err and "KeyError: 'an internal bug'" in err
    assert "featurelens: error:" not in err


def test_unreadable_imagefolder_images_are_skipped_with_a_warning(tmp_path):
    from featurelens.data.datamodule import TolerantImageFolder

    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        for i in range(2):
            Image.new("RGB", (8, 8), (40 * i, 90, 200)).save(tmp_path / cls / f"{i}.png")
    (tmp_path / "a" / "0.png").write_bytes(b"not a png")
    ds = TolerantImageFolder(str(tmp_path))
    with pytest.warns(UserWarning, match=r"skipping unreadable image .*a/0\.png"):
        image, label = ds[0]
    assert image.size == (8, 8) and label == 0  # the next readable image, a/1.png, stands in
    assert ds[3][1] == 1
