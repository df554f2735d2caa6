"""Generators of the linking analysis (linking spec §6, §9.7): the cVAE, its checkpoints, the StyleGAN-XL adapter."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import ROOT

from featurelens.errors import ConfigError
from featurelens.models.generators.base import PART_NAMES, Generator
from featurelens.models.generators.cvae import CondVAEGenerator, load_training_data, part_masks, train_cvae
from featurelens.models.generators.store import cache_path, load_cvae, load_generator, save_cvae
from featurelens.models.generators.stylegan_xl import StyleGANXLAdapter

TINY_GEN = {"name": "cvae", "ckpt": None, "z_dim": 4, "w_dim": 8, "base_channels": 16, "epochs": 1,
            "batch_size": 16, "seed": 0}
SHAPES16 = {"name": "shapes", "image_size": 16, "channels": 3, "num_classes": 10, "seed": 0, "n_train": 40}


@pytest.fixture(scope="module")
def tiny_shapes():
    return load_training_data(SHAPES16)


@pytest.fixture(scope="module")
def tiny_gen(tiny_shapes):
    x, y, m = tiny_shapes
    return train_cvae(x, y, m, z_dim=4, w_dim=8, base_channels=16, epochs=1, batch_size=16, progress=False)


def _conformance(gen, n: int = 3) -> None:
    """Linking spec §9.7 for any generator."""
    assert isinstance(gen, Generator)
    for c in (0, gen.num_classes - 1):
        w = gen.sample_w(n, c, psi=0.7, seed=5)
        assert w.shape == (n, gen.w_dim)
        assert torch.equal(w, gen.sample_w(n, c, psi=0.7, seed=5))  # deterministic in the seed
        assert not torch.equal(w, gen.sample_w(n, c, psi=0.7, seed=6))
        assert torch.equal(gen.sample_w(n, c, psi=0.0, seed=5), gen.w_avg(c).expand(n, -1))  # psi=0: exactly w_avg
        w1 = gen.sample_w(n, c, psi=1.0, seed=5)  # psi=1: untruncated; psi interpolates toward w_avg
        torch.testing.assert_close(w, gen.w_avg(c) + 0.7 * (w1 - gen.w_avg(c)))
        x = gen.synthesize(w)
        assert x.shape == (n, gen.channels if hasattr(gen, "channels") else 3, gen.resolution, gen.resolution)
        assert x.dtype == torch.float32 and x.min() >= 0 and x.max() <= 1
        assert not any(p.requires_grad for p in gen.parameters()) and not gen.training  # frozen
    with pytest.raises(ValueError, match="out of range"):
        gen.sample_w(1, gen.num_classes)


# ---------------------------------------------------------------------------- cVAE
def test_cvae_conforms_and_has_part_masks(tiny_gen, tiny_shapes):
    _conformance(tiny_gen)
    assert tiny_gen.num_ws == 1 and tiny_gen.w_avg(0).shape == (8,)
    images, masks = tiny_gen.synthesize_with_masks(tiny_gen.sample_w(2, 3, seed=0))
    assert images.shape == (2, 3, 16, 16) and masks.shape == (2, 16, 16) and masks.dtype == torch.int64
    assert 0 <= masks.min() and masks.max() < len(PART_NAMES)
    _, _, m = tiny_shapes  # training masks: all three parts occur
    assert set(m.unique().tolist()) == {0, 1, 2}


def test_w_avg_is_the_mean_of_the_mapping(tiny_gen):
    z = torch.randn(4096, tiny_gen.z_dim, generator=torch.Generator().manual_seed(0))
    expected = tiny_gen.map(z, torch.full((4096,), 2)).mean(0)
    torch.testing.assert_close(tiny_gen.w_avg(2), expected)


def test_part_masks_follow_the_main_shape():
    import numpy as np

    shape_mask = np.array([[0, 1, 1, 2]])
    rim = np.array([[True, True, False, True]])
    assert part_masks(shape_mask, rim).tolist() == [[0, 2, 1, 0]]  # distractors (2) are background


def test_shapes_training_images_are_the_train_split(tmp_path):
    from featurelens.data.shapes import load_or_make_shapes

    x, y, _ = load_training_data({**SHAPES16, "n_train": 12})
    images, labels = load_or_make_shapes(tmp_path, "train", 12, 16, 0)
    assert torch.equal(y, torch.from_numpy(labels))
    assert torch.equal(x, torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255)


def test_no_masks_without_a_mask_head():
    gen = CondVAEGenerator(num_classes=3, resolution=8, channels=1, z_dim=2, w_dim=4, base_channels=16)
    with pytest.raises(RuntimeError, match="no mask head"):
        gen.synthesize_with_masks(torch.zeros(1, 4))


@pytest.mark.parametrize("resolution", [12, 4, 28, 0])
def test_bad_resolution_names_the_value_and_the_choices(resolution):
    with pytest.raises(ValueError, match=rf"resolution={resolution}.*valid: \[8, 16, 32, 64"):
        CondVAEGenerator(resolution=resolution)


def test_digits_trains_without_masks():
    x, y, m = load_training_data({"name": "digits", "image_size": 8}, n_train=30)
    assert x.shape == (30, 1, 8, 8) and m is None and 0 <= x.min() and x.max() <= 1
    gen = train_cvae(x, y, None, z_dim=2, w_dim=4, base_channels=16, epochs=1, batch_size=16, progress=False)
    _conformance(gen)
    assert not gen.has_masks


def test_unsupported_dataset_is_a_config_error():
    with pytest.raises(ConfigError, match=r"cifar10.*shapes.*digits"):
        load_training_data({"name": "cifar10", "image_size": 32})


# ---------------------------------------------------------------------------- checkpoints
def test_checkpoint_round_trip_samples_identically(tiny_gen, tmp_path):
    path = save_cvae(tiny_gen, tmp_path / "g.pt")
    assert not list(tmp_path.glob("*.tmp"))
    ckpt = torch.load(path, weights_only=True)  # a plain dict: no code runs on load
    assert set(ckpt) >= {"config", "state_dict", "w_avg"}
    gen = load_cvae(path)
    _conformance(gen)
    for c in (0, 7):
        w = gen.sample_w(4, c, psi=0.7, seed=11)
        assert torch.equal(w, tiny_gen.sample_w(4, c, psi=0.7, seed=11))
        assert torch.equal(gen.synthesize(w), tiny_gen.synthesize(w))
        assert torch.equal(gen.w_avg(c), tiny_gen.w_avg(c))


def test_explicit_checkpoint_is_checked_against_the_data(tiny_gen, tmp_path):
    path = save_cvae(tiny_gen, tmp_path / "g.pt")
    gen = load_generator({**TINY_GEN, "ckpt": str(path)}, SHAPES16)
    assert torch.equal(gen.sample_w(2, 1, seed=3), tiny_gen.sample_w(2, 1, seed=3))
    with pytest.raises(ConfigError, match=r"num_classes=10 but data.num_classes=5"):
        load_generator({**TINY_GEN, "ckpt": str(path)}, {**SHAPES16, "num_classes": 5})
    with pytest.raises(ConfigError, match=r"resolution=16 but data.image_size=32"):
        load_generator({**TINY_GEN, "ckpt": str(path)}, {**SHAPES16, "image_size": 32})
    with pytest.raises(ConfigError, match=r"channels=3 but data.channels=1"):
        load_generator({**TINY_GEN, "ckpt": str(path)}, {**SHAPES16, "channels": 1})


def test_missing_or_foreign_checkpoint_says_how_to_make_one(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(ConfigError, match=rf"{missing}.*no such file.*scripts/train_generator.py data="):
        load_generator({**TINY_GEN, "ckpt": str(missing)}, SHAPES16)
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ConfigError, match="not a featurelens cVAE checkpoint"):
        load_generator({**TINY_GEN, "ckpt": str(tmp_path / "other.pt")}, SHAPES16)


def test_unknown_generator_lists_the_choices():
    with pytest.raises(ConfigError, match=r"generator.name='gan'.*\['cvae', 'stylegan_xl'\]"):
        load_generator({"name": "gan"}, SHAPES16)


def test_cache_trains_once_then_loads(tmp_path, caplog):
    gen_cfg = {**TINY_GEN, "cache_dir": str(tmp_path / "cache")}
    data = {**SHAPES16, "n_train": 20}
    path = cache_path(gen_cfg, data)
    assert path.parent == tmp_path / "cache" / "generators" and not path.exists()
    with caplog.at_level("INFO"):
        first = load_generator(gen_cfg, data)
    assert path.is_file() and "training one" in caplog.text
    second = load_generator(gen_cfg, data)
    assert torch.equal(first.synthesize(first.sample_w(2, 4, seed=1)), second.synthesize(second.sample_w(2, 4, seed=1)))
    # the key follows the data config and the hyperparameters
    assert cache_path({**gen_cfg, "w_dim": 9}, data) != path
    assert cache_path(gen_cfg, {**data, "seed": 1}) != path
    assert cache_path(gen_cfg, {**data, "image_size": 32}) != path
    with pytest.raises(ConfigError, match=r"data.image_size=28.*valid: \[8, 16, 32"):
        load_generator(gen_cfg, {"name": "digits", "image_size": 28, "channels": 1, "num_classes": 10})
    with pytest.raises(ConfigError, match=r"data.name='cifar10'.*shapes.*digits"):
        load_generator(gen_cfg, {**data, "name": "cifar10"})


# ---------------------------------------------------------------------------- StyleGAN-XL adapter
FAKE_NET = '''
import torch
from torch import nn


class Mapping(nn.Module):
    def __init__(self, z_dim, c_dim, w_dim, num_ws, per_class_avg):
        super().__init__()
        self.num_ws = num_ws
        self.fc = nn.Linear(z_dim + c_dim, w_dim)
        if per_class_avg:
            self.register_buffer("w_avg", torch.randn(c_dim, w_dim))

    def forward(self, z, c, truncation_psi=1, truncation_cutoff=None, update_emas=False):
        assert truncation_psi == 1
        w = self.fc(torch.cat([z, c], dim=1))
        return w.unsqueeze(1).repeat(1, self.num_ws, 1)


class Synthesis(nn.Module):
    def __init__(self, w_dim, num_ws, res):
        super().__init__()
        self.num_ws, self.res = num_ws, res
        self.fc = nn.Linear(w_dim, 3 * res * res)

    def forward(self, ws, noise_mode="random", force_fp32=False):
        assert noise_mode == "none" and force_fp32 and ws.shape[1] == self.num_ws
        return torch.tanh(3 * self.fc(ws[:, -1])).view(len(ws), 3, self.res, self.res)


class G(nn.Module):
    def __init__(self, per_class_avg=True):
        super().__init__()
        self.z_dim, self.w_dim, self.c_dim, self.num_ws, self.img_resolution = 6, 5, 4, 3, 8
        self.mapping = Mapping(6, 4, 5, 3, per_class_avg)
        self.synthesis = Synthesis(5, 3, 8)
'''

FAKE_LEGACY = '''
import torch

import dnnlib  # the real legacy.py imports it too
from fake_net import G


def load_network_pkl(f):
    per_class_avg = f.read() == b"per-class"
    torch.manual_seed(0)
    return {"G": None, "D": None, "G_ema": G(per_class_avg)}
'''


def _fake_checkout(tmp_path: Path) -> Path:
    checkout = tmp_path / "stylegan-xl"
    (checkout / "dnnlib").mkdir(parents=True)
    (checkout / "dnnlib" / "__init__.py").write_text("")
    (checkout / "fake_net.py").write_text(textwrap.dedent(FAKE_NET))
    (checkout / "legacy.py").write_text(textwrap.dedent(FAKE_LEGACY))
    (tmp_path / "per_class.pkl").write_bytes(b"per-class")
    (tmp_path / "global.pkl").write_bytes(b"global")
    return checkout


@pytest.fixture
def fake_checkout(tmp_path):
    saved = list(sys.path)
    yield _fake_checkout(tmp_path)
    sys.path[:] = saved
    for name in ("legacy", "dnnlib", "fake_net"):
        sys.modules.pop(name, None)


@pytest.mark.parametrize("pkl", ["per_class.pkl", "global.pkl"])
@pytest.mark.parametrize("quantize", [True, False])
def test_stylegan_xl_adapter_with_a_fake_checkout(fake_checkout, pkl, quantize):
    gen = load_generator({"name": "stylegan_xl", "checkout": str(fake_checkout),
                          "pkl": str(fake_checkout.parent / pkl), "quantize_uint8": quantize},
                         {"name": "imagefolder", "num_classes": 4})
    assert isinstance(gen, StyleGANXLAdapter)
    assert (gen.z_dim, gen.w_dim, gen.num_classes, gen.num_ws, gen.resolution) == (6, 5, 4, 3, 8)
    _conformance(gen)
    if pkl == "per_class.pkl":  # truncation goes toward mapping.w_avg[c]
        assert torch.equal(gen.w_avg(2), gen.G.mapping.w_avg[2])
    # z comes from numpy's RandomState(seed), as in the reference
    import numpy as np

    z = torch.from_numpy(np.random.RandomState(9).randn(2, 6)).float()
    c = torch.nn.functional.one_hot(torch.tensor([1, 1]), 4).float()
    torch.testing.assert_close(gen.sample_w(2, 1, psi=1.0, seed=9), gen.G.mapping(z, c)[:, 0])
    x = gen.synthesize(gen.sample_w(2, 1, seed=0))
    if quantize:  # the reference's w_to_img: ((x + 1) * 255/2).clamp(0, 255) truncated to uint8, then k/255
        gen.quantize_uint8 = False
        exact = gen.synthesize(gen.sample_w(2, 1, seed=0))
        assert torch.equal(x * 255, (x * 255).round())
        assert torch.equal((x * 255).round(), torch.floor(exact * 255))  # truncated, not rounded


def test_a_stylegan_xl_linking_run_needs_no_image_folder(fake_checkout, cfg_factory, tmp_path):
    """Linking never reads real images: the image-folder root may be empty (issue 11)."""
    from featurelens.analyze import analyze
    from featurelens.models import build_model

    weights = tmp_path / "clf.pth"
    torch.save(build_model("small_cnn", 4, 3, channels=[4, 8]).state_dict(), weights)
    link = "analysis.linking."
    cfg = cfg_factory("logger=none", "model=small_cnn", "model.channels=[4,8]", f"model.weights={weights}",
                      "data=imagefolder", f"data.root={tmp_path / 'no_images'}", "data.num_classes=4",
                      "data.image_size=8", "generator=stylegan_xl", f"generator.checkout={fake_checkout}",
                      f"generator.pkl={fake_checkout.parent / 'per_class.pkl'}", "analysis=linking",
                      f"{link}classes=[0,1]", f"{link}pairs.n_per_class=4", f"{link}pairs.heldout_per_class=2",
                      f"{link}min_pairs=2", f"{link}cf.max_steps=2", f"{link}sweep.units_per_epoch=2",
                      f"{link}sweep.samples=1", f"{link}ref_set.samples_per_class=2", name="sgxl",
                      config_name="analyze")
    record = analyze(cfg)["linking"]
    assert record["linking/n_per_class"] == 4 and record["linking/min_pairs"] == 2
    assert not (tmp_path / "no_images").exists()


def test_stylegan_xl_checks_the_class_count_and_resolution(fake_checkout):
    pkl = str(fake_checkout.parent / "per_class.pkl")
    with pytest.raises(ConfigError, match=r"c_dim=4 classes but data.num_classes=1000"):
        StyleGANXLAdapter(fake_checkout, pkl, num_classes=1000)
    with pytest.raises(ConfigError, match=r"8px images but 256px"):
        StyleGANXLAdapter(fake_checkout, pkl, resolution=256)


def test_stylegan_xl_refuses_urls_and_missing_files(tmp_path):
    with pytest.raises(ConfigError, match=r"generator.pkl='https://.*only local paths"):
        StyleGANXLAdapter(tmp_path, "https://example.org/imagenet256.pkl")
    with pytest.raises(ConfigError, match=r"generator.checkout='file:///x'.*only local paths"):
        StyleGANXLAdapter("file:///x", tmp_path / "a.pkl")
    with pytest.raises(ConfigError, match=rf"generator.checkout='{tmp_path / 'none'}': no such directory"):
        StyleGANXLAdapter(tmp_path / "none", tmp_path / "a.pkl")
    with pytest.raises(ConfigError, match=rf"generator.pkl='{tmp_path / 'a.pkl'}': no such file"):
        StyleGANXLAdapter(tmp_path, tmp_path / "a.pkl")
    with pytest.raises(ConfigError, match=r"generator.checkout=null"):
        load_generator({"name": "stylegan_xl", "checkout": None, "pkl": None}, {})
    (tmp_path / "a.pkl").write_bytes(b"")
    with pytest.raises(ConfigError, match="no legacy.py"):
        StyleGANXLAdapter(tmp_path, tmp_path / "a.pkl")


@pytest.mark.skipif(not (os.environ.get("FEATURELENS_STYLEGAN_XL_CHECKOUT") and
                         os.environ.get("FEATURELENS_STYLEGAN_XL_PKL")),
                    reason="set FEATURELENS_STYLEGAN_XL_CHECKOUT and FEATURELENS_STYLEGAN_XL_PKL to a real checkout")
def test_real_stylegan_xl():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = StyleGANXLAdapter(os.environ["FEATURELENS_STYLEGAN_XL_CHECKOUT"], os.environ["FEATURELENS_STYLEGAN_XL_PKL"],
                            device=device)
    w = gen.sample_w(1, 0, psi=0.7, seed=0)
    assert torch.equal(w, gen.sample_w(1, 0, psi=0.7, seed=0))
    assert torch.equal(gen.sample_w(1, 0, psi=0.0, seed=0), gen.w_avg(0)[None])
    x = gen.synthesize(w)
    assert x.shape == (1, 3, gen.resolution, gen.resolution) and x.dtype == torch.float32
    assert 0 <= x.min() and x.max() <= 1


# ---------------------------------------------------------------------------- the Hydra script
def test_train_generator_script(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env["FEATURELENS_DATA"], env["FEATURELENS_CACHE"] = str(tmp_path / "data"), str(tmp_path / "cache")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    args = [sys.executable, str(ROOT / "scripts" / "train_generator.py"), "data=shapes", "data.image_size=16",
            "data.n_train=32", "generator.epochs=1", "generator.base_channels=16", "n_preview=2",
            f"hydra.run.dir={tmp_path / 'run'}"]
    res = subprocess.run(args, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    path = Path(res.stdout.strip().splitlines()[-1])
    assert path.is_file() and path.parent == tmp_path / "cache" / "generators"
    assert (tmp_path / "run" / "samples.png").is_file()
    gen = load_cvae(path)
    assert (gen.resolution, gen.num_classes, gen.has_masks) == (16, 10, True)
    # what analyses load with generator.ckpt=null is this very file (conf/generator/cvae.yaml = the defaults)
    gen_cfg = {"name": "cvae", "ckpt": None, "epochs": 1, "base_channels": 16, "cache_dir": str(tmp_path / "cache")}
    data_cfg = {"name": "shapes", "image_size": 16, "channels": 3, "num_classes": 10, "seed": 0, "n_train": 32}
    assert cache_path(gen_cfg, data_cfg) == path
    bad = subprocess.run([*args[:2], "data=digits", f"hydra.run.dir={tmp_path / 'run2'}", "generator.epochs=1"],
                         capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert bad.returncode == 2 and "data.image_size=28" in bad.stderr
