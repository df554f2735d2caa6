"""Every config option composes and builds; bad values stop before any work with a one-line message."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import CONF, ROOT
from hydra.utils import instantiate
from omegaconf import OmegaConf

from featurelens.api import REGISTRY
from featurelens.checkpoints import check_same_model
from featurelens.errors import ConfigError
from featurelens.models import build_model
from featurelens.models.builders import uses_cifar_stem
from featurelens.runtime import validate_config
from featurelens.train import build_net


def _options(group: str) -> list[str]:
    """The group's yaml options, and for ``analysis`` the registered analyses (from Hydra's ConfigStore)."""
    registered = list(REGISTRY) if group == "analysis" else []
    return sorted({p.stem for p in (Path(CONF) / group).glob("*.yaml")} | set(registered))


@pytest.mark.parametrize("group", ["init", "data", "optimizer", "scheduler", "trainer", "logger", "analysis",
                                   "callbacks", "debug", "hparams_search"])
def test_every_group_option_composes(cfg_factory, group):
    for option in _options(group):
        extra = ["data.root=/tmp", "data.num_classes=3"] if option == "imagefolder" else []
        cfg = cfg_factory(f"{group}={option}", *extra, base=[])
        job = OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
        assert job.get(group) is None or isinstance(job[group], dict)  # debug, hparams_search: @package _global_
        if group == "init":
            assert cfg.init.method in (option, {"kaiming": "kaiming_normal", "xavier": "xavier_normal"}.get(option))


# input width for 32-px data chosen by model.input_size=auto (chirality spec §2.5 table)
EXPECTED_WIDTH = {"alexnet": 63, "vgg11": 32, "vgg16": 32, "vgg16_bn": 32, "resnet18": 33, "resnet34": 33,
                  "resnet50": 33, "mlp": 32, "small_cnn": 32}


@pytest.mark.parametrize("model", _options("model"))
def test_every_model_builds_and_runs_at_its_resolved_width(cfg_factory, model):
    cfg = cfg_factory(f"model={model}", base=[])
    net, model_cfg, width = build_net(OmegaConf.to_container(cfg.model, resolve=True), cfg.data)
    assert width == EXPECTED_WIDTH[model]
    instantiate(cfg.init)(net)
    with torch.no_grad():
        out = net.eval()(torch.randn(2, cfg.data.channels, width, width))
    assert out.shape == (2, cfg.data.num_classes)
    assert instantiate(model_cfg).state_dict().keys() == net.state_dict().keys()  # the checkpoint rebuilds it


def test_grey_data_adapts_the_first_conv(cfg_factory):
    cfg = cfg_factory("model=resnet18", "data=digits", "model.cifar_stem=false", base=[])
    net, _, width = build_net(OmegaConf.to_container(cfg.model, resolve=True), cfg.data)
    assert net.conv1.in_channels == 1 and net.conv1.kernel_size == (7, 7)
    assert net(torch.randn(2, 1, width, width)).shape == (2, 10)


@pytest.mark.parametrize(("overrides", "cifar"), [
    ((), True),                                      # 32-px shapes from scratch
    (("data=digits",), True),                        # 8 px
    (("model.input_size=64",), True),                # the widest the CIFAR stem is chosen for
    (("model.input_size=65",), False),
    (("data.image_size=96",), False),
    (("model.cifar_stem=false",), False),
    (("data.image_size=96", "model.cifar_stem=true"), True),
])
def test_cifar_stem_auto_follows_the_input_width(cfg_factory, overrides, cifar):
    """``model.cifar_stem=auto`` (the ResNets' default): the 3×3 stride-1 stem without max-pool on inputs of at
    most 64 px, torchvision's stem above; the checkpoint's model config holds the choice, not ``auto``."""
    cfg = cfg_factory("model=resnet18", *overrides, base=[])
    net, model_cfg, width = build_net(OmegaConf.to_container(cfg.model, resolve=True), cfg.data)
    assert net.conv1.kernel_size == ((3, 3) if cifar else (7, 7))
    assert isinstance(net.maxpool, torch.nn.Identity) == cifar
    assert model_cfg["cifar_stem"] is cifar
    stem = torch.nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
    with torch.no_grad():  # the CIFAR stem hands layer1 the full width, torchvision's a quarter of it
        out = stem.eval()(torch.zeros(1, cfg.data.channels, width, width))
    assert out.shape[-1] == (width if cifar else (width + 3) // 4)


@pytest.mark.parametrize(("in_channels", "cifar"), [(3, False), (3, True), (1, True)])
def test_a_local_weights_file_loads_whole_whatever_its_stem_channels_and_classes(tmp_path, in_channels, cifar):
    """``model.weights=<file>`` with ``cifar_stem=auto``: the model takes the file's stem, first conv and head, so
    every tensor loads; then conv1 and the head follow the data (here 3 channels and 4 classes)."""
    trained = build_model("resnet18", 10, in_channels, cifar_stem=cifar)
    torch.save(trained.state_dict(), tmp_path / "net.pth")
    net = build_model("resnet18", 4, 3, image_size=224, weights=str(tmp_path / "net.pth"), cifar_stem="auto")
    assert net.conv1.kernel_size == ((3, 3) if cifar else (7, 7)) and net.fc.out_features == 4
    kept = {k: v for k, v in trained.state_dict().items() if not k.startswith(("fc.", "conv1."))}
    assert all(torch.equal(net.state_dict()[k], v) for k, v in kept.items())
    if in_channels == 3:
        assert torch.equal(net.conv1.weight, trained.conv1.weight)
    else:  # the grey conv1 spread over RGB: a grey image gives the grey net's response
        grey = torch.randn(1, 1, 8, 8)
        torch.testing.assert_close(net.conv1(grey.repeat(1, 3, 1, 1)), trained.conv1(grey))
    if cifar:
        with pytest.raises(ConfigError, match="holds a ResNet with the CIFAR stem .* use model.cifar_stem=auto"):
            build_model("resnet18", 4, weights=str(tmp_path / "net.pth"), cifar_stem=False)


def test_weights_of_another_shape_name_the_tensor_and_both_shapes(tmp_path):
    torch.save(build_model("small_cnn", 10, channels=[4, 8]).state_dict(), tmp_path / "net.pth")
    with pytest.raises(ConfigError, match=r"features.0.weight is \[4, 3, 3, 3\] there and \[8, 3, 3, 3\] here"):
        build_model("small_cnn", 10, channels=[8, 8], weights=str(tmp_path / "net.pth"))


@pytest.mark.parametrize("trained_cifar", [False, True])
def test_a_checkpoint_of_the_other_stem_names_the_setting_that_builds_it(trained_cifar):
    """Resuming a ResNet checkpoint trained with the other stem (e.g. before ``cifar_stem=auto`` was the
    default) says which ``model.cifar_stem`` rebuilds it."""
    trained = build_model("resnet18", 10, cifar_stem=trained_cifar)
    cfg = {"arch": "resnet18", "in_channels": 3, "num_classes": 10}
    ckpt = {"hyper_parameters": {"model_cfg": cfg},
            "state_dict": {f"net.{k}": v for k, v in trained.state_dict().items()}}
    with pytest.raises(ConfigError, match=rf"conv1.weight: .*; use the model settings the checkpoint was trained with "
                                          rf"\(model.cifar_stem={str(trained_cifar).lower()} builds"):
        check_same_model(ckpt, build_model("resnet18", 10, cifar_stem=not trained_cifar), cfg, "ckpt_path='x'")
    check_same_model(ckpt, build_model("resnet18", 10, cifar_stem=trained_cifar), cfg, "ckpt_path='x'")


def test_auto_takes_the_cifar_stem_only_for_small_resnets():
    assert uses_cifar_stem("auto", "resnet50", 64) and not uses_cifar_stem("auto", "resnet50", 65)
    assert not uses_cifar_stem("auto", "vgg16", 32) and not uses_cifar_stem("auto", "resnet18", None)


@pytest.mark.parametrize(("model", "p"), [("vgg16", 0.0), ("vgg11", 0.5), ("vgg16_bn", 0.5), ("alexnet", 0.5)])
def test_classifier_dropout_follows_model_dropout(cfg_factory, model, p):
    """VGG-16 from scratch drops its classifier dropout (issue 10: with torchvision's 0.5 it stays at chance)."""
    def dropouts(*overrides: str) -> list[float]:
        cfg = cfg_factory(f"model={model}", *overrides, base=[])
        net, _, _ = build_net(OmegaConf.to_container(cfg.model, resolve=True), cfg.data)
        return [m.p for m in net.modules() if isinstance(m, torch.nn.Dropout)]

    assert dropouts() == [p, p]
    assert dropouts("model.dropout=0.25") == [0.25, 0.25]


def test_vgg16_trains_with_adafactor_unless_an_optimizer_is_chosen(cfg_factory):
    """Plain VGG-16's recipe (issue 10): Adafactor by default; optimizer=sgd and an experiment's optimizer win."""
    def optimizer(*overrides: str) -> str:
        return cfg_factory(*overrides, base=[]).optimizer._target_

    assert optimizer("model=vgg16") == "torch.optim.Adafactor"
    assert optimizer("model=vgg16", "optimizer=sgd") == "torch.optim.SGD"
    assert optimizer("model=vgg16", "experiment=chirality_init") == "torch.optim.SGD"
    assert {optimizer(f"model={m}") for m in _options("model") if m != "vgg16"} == {"torch.optim.SGD"}


def test_dropout_on_a_resnet_is_a_config_error():
    with pytest.raises(ConfigError, match="model.dropout=0.1: resnet18 has no dropout layer"):
        build_model("resnet18", 10, dropout=0.1)


@pytest.mark.parametrize(("override", "needle"), [
    ("trainer.max_epochs=0", "trainer.max_epochs=0"),
    ("optimizer.lr=-0.1", "optimizer.lr=-0.1"),
    ("data.batch_size=0", "data.batch_size=0"),
    ("data.num_workers=-1", "data.num_workers=-1"),
    ("init.method=he", "valid: ['default'"),
    ("model.input_size=big", "model.input_size='big'"),
    ("ckpt_path=/no/such.ckpt", "no such checkpoint"),
    ("analysis.chirality.every_n_epochs=0", "analysis.chirality.every_n_epochs=0"),
    ("+trainer.sync_batchnorm=true", "set trainer.sync_batchnorm=false"),
])
def test_bad_values_are_rejected_by_name(cfg_factory, override, needle):
    cfg = cfg_factory(override, base=[])
    with pytest.raises(ConfigError) as err:
        validate_config(cfg)
    assert needle in str(err.value)


def test_missing_imagefolder_root_is_rejected_when_images_are_read(cfg_factory, tmp_path):
    from featurelens.runtime import build

    cfg = cfg_factory("data=imagefolder", f"data.root={tmp_path}/nowhere", "data.num_classes=3", base=[])
    validate_config(cfg)  # a linking run on a generator reads no image
    with pytest.raises(ConfigError, match="nowhere'?: no such folder"):
        build(cfg.data).setup("fit")
    (tmp_path / "nowhere" / "train").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"has no \['val'\] folder"):
        build(cfg.data).setup("fit")


def test_pretrained_weights_with_a_reinit_is_rejected(cfg_factory):
    cfg = cfg_factory("model=resnet18", "model.weights=IMAGENET1K_V1", "init=kaiming", base=[])
    with pytest.raises(ConfigError, match="use init=default"):
        validate_config(cfg)


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}  # as a user runs it
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args, "logger=none",
                           f"hydra.run.dir={cwd}/run"], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=300)


def test_cli_bad_value_exits_with_one_line_and_no_traceback(tmp_path):
    res = _cli("trainer.max_epochs=0", cwd=tmp_path)
    assert res.returncode == 2
    assert "featurelens: error: trainer.max_epochs=0: must be a positive integer" in res.stderr
    assert "Traceback" not in res.stderr + res.stdout


def test_cli_unknown_option_lists_the_valid_choices(tmp_path):
    res = _cli("model=vgg99", cwd=tmp_path)
    assert res.returncode != 0
    assert "Could not find 'model/vgg99'" in res.stderr and "resnet18" in res.stderr
    assert "Traceback" not in res.stderr


def test_analysis_package_never_imports_lightning():
    for path in (ROOT / "src" / "featurelens" / "analysis").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n.split(".")[0] in ("pytorch_lightning", "lightning") for n in names), path


def test_sweep_dir_names_put_group_choices_first_and_stay_short():
    from featurelens.runtime import safe_dirname

    long = "analysis.chirality.fmap.n_probe=64,data.root=/a/b,init=kaiming,model.channels=[4,8],model=vgg16,seed=1"
    name = safe_dirname(long, max_len=60)
    assert name.startswith("init=kaiming,model=vgg16,seed=1,") and len(name) == 60 and "/" not in name
    assert safe_dirname(long, max_len=60) != safe_dirname(long.replace("seed=1", "seed=2"), max_len=60)
    assert safe_dirname("model.channels=[4,8],init=xavier") == "init=xavier,model.channels=[4,8]"


# what each experiment's header (and the README) says it sweeps: models and data
EXPERIMENTS = {
    "chirality_init": ({"alexnet", "vgg16_bn", "resnet18", "resnet50"}, "cifar10"),
    "chirality_init_smoke": ({"resnet18"}, "shapes"),
    "class_filters_depth_sweep": ({"resnet18", "resnet34", "resnet50"}, "cifar10"),
    "class_filters_k_sweep": ({"resnet18"}, "cifar10"),
    "class_filters_smoke": ({"small_cnn"}, "shapes"),
    "dissection_resnet": ({"resnet18"}, "cifar10"),
    "dissection_smoke": ({"small_cnn"}, "shapes"),
    "linking_digits": ({"small_cnn", "mlp"}, "digits"),
    "linking_shapes": ({"small_cnn"}, "shapes"),
    "specialization_small": ({"mlp", "small_cnn"}, "mnist"),
    "specialization_smoke": ({"mlp", "small_cnn"}, "digits"),
    "specialization_vgg": ({"vgg16_bn"}, "cifar10"),
}
DISPLAY = {"alexnet": "AlexNet", "vgg16_bn": "VGG-16-BN", "resnet18": "ResNet-18", "resnet34": "ResNet-34",
           "resnet50": "ResNet-50", "small_cnn": "small CNN", "mlp": "MLP", "cifar10": "CIFAR-10",
           "shapes": "shapes", "digits": "digits", "mnist": "MNIST"}


@pytest.mark.parametrize(("name", "cifar_stem"), [("chirality_init", False), ("chirality_init_smoke", False),
                                                  ("class_filters_k_sweep", True), ("dissection_resnet", True)])
def test_experiments_pin_the_resnet_stem_they_describe(cfg_factory, name, cifar_stem):
    """The chirality sweeps keep torchvision's 7×7 stem (the spec's conv counts and baselines) on 32-px data,
    where ``auto`` would take the CIFAR stem."""
    assert cfg_factory(f"experiment={name}", base=[]).model.cifar_stem is cifar_stem


def test_every_experiment_is_listed_here():
    assert set(_options("experiment")) == set(EXPERIMENTS)


@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_every_experiment_composes_its_whole_sweep_grid(cfg_factory, name):
    """Every value of the experiment's sweep grid composes, resolves and validates (each value once, the other
    keys at their first value); the models and data it sweeps are those its header names (and the README
    lists the experiment)."""
    from featurelens.runtime import _split_overrides

    base = cfg_factory(f"experiment={name}", base=[])
    params = OmegaConf.to_container(base.hydra.sweeper.params)
    grid = {k: [f"{k}={v}" for v in _split_overrides(str(values))] for k, values in params.items()}
    first = {k: values[0] for k, values in grid.items()}
    jobs = {tuple({**first, k: v}.values()) for k, values in grid.items() for v in values}
    models, datasets = set(), set()
    for job in sorted(jobs):
        cfg = cfg_factory(f"experiment={name}", *job, base=[])
        OmegaConf.to_container(cfg, resolve=True)
        validate_config(cfg)
        models.add(cfg.model.arch)
        datasets.add(cfg.data.name)
    want_models, want_data = EXPERIMENTS[name]
    assert models == want_models and datasets == {want_data}
    text = (Path(CONF) / "experiment" / f"{name}.yaml").read_text()
    header = " ".join(line.lstrip("#").strip() for line in text.splitlines() if line.startswith("#")).lower()
    for shown in (*want_models, want_data):
        assert DISPLAY[shown].lower() in header, (name, shown)
    assert f"`{name}`" in (ROOT / "README.md").read_text()


@pytest.mark.parametrize("name", ["shapes", "digits"])
def test_the_normalisation_of_embedded_data_needs_no_resized_splits(cfg_factory, name):
    from featurelens.runtime import build

    cfg = cfg_factory(f"data={name}", base=[])
    lazy = build(cfg.data, input_size=112)
    mean, std = lazy.normalisation()
    assert lazy.train_set is None  # nothing resized to 112 px was built
    full = build(cfg.data, input_size=112)
    full.setup("fit")
    assert (mean, std) == (full.mean, full.std) and len(mean) == cfg.data.channels


@pytest.mark.parametrize(("script", "example"), [("train.py", "python train.py -m model=vgg16,resnet50"),
                                                  ("analyze.py", "python analyze.py ckpt_path=")])
def test_help_describes_the_app_its_groups_and_examples_without_the_config_dump(script, example):
    res = subprocess.run([sys.executable, str(ROOT / script), "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    text = res.stdout
    assert example in text and "Config groups" in text and "README.md" in text
    assert "model: alexnet, mlp, resnet18" in text and "analysis: chirality, class_filters" in text
    assert len(text.splitlines()) < 40 and "_target_" not in text  # no config dump
