"""Generator checkpoints and the one entry point that builds a generator from the config (linking spec §6).

``load_generator(gen_cfg, data_cfg)`` returns a frozen generator:

* ``name: cvae`` with ``ckpt: <file>``: load that checkpoint; its class count, resolution and channels must
  match the data config.
* ``name: cvae`` with ``ckpt: null``: look in ``<cache_dir>/generators/<hash>.pt``, the hash covering the data
  config (name, image_size, channels, num_classes, seed, n_train) and the generator's hyperparameters; train
  and cache one if it is absent (``python scripts/train_generator.py data=shapes`` does the same ahead of time).
* ``name: stylegan_xl``: a :class:`~featurelens.models.generators.stylegan_xl.StyleGANXLAdapter`.

A cVAE checkpoint is a plain dict (format tag, constructor config, ``state_dict``, ``w_avg``, training and data
settings) written with ``torch.save`` through a temporary file and ``os.replace``, and read back with
``weights_only=True``, so loading one runs no code.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

from featurelens.checkpoints import read_file
from featurelens.errors import ConfigError
from featurelens.models.generators.base import Generator, freeze
from featurelens.models.generators.cvae import CondVAEGenerator, load_training_data, train_cvae, valid_resolutions
from featurelens.results import atomic_write

log = logging.getLogger(__name__)

__all__ = ["GENERATORS", "cache_path", "ensure_cached", "load_cvae", "load_generator", "save_cvae", "train_from_config"]

GENERATORS = ("cvae", "stylegan_xl")
CKPT_FORMAT = "featurelens.cvae/1"
DATA_KEYS = ("name", "image_size", "channels", "num_classes", "seed", "n_train")
# hyperparameters of the cVAE (conf/generator/cvae.yaml) and their defaults; all of them enter the cache hash
TRAIN_DEFAULTS: dict[str, Any] = {"z_dim": 16, "w_dim": 32, "base_channels": 64, "epochs": 20, "batch_size": 64,
                                  "lr": 1e-3, "beta": 1.0, "mask_weight": 1.0, "seed": 0, "n_train": None}
MAKE_ONE = "python scripts/train_generator.py data=<name> (e.g. data=shapes)"


def _train_settings(gen_cfg: dict) -> dict[str, Any]:
    return {key: gen_cfg.get(key, default) if gen_cfg.get(key) is not None else default
            for key, default in TRAIN_DEFAULTS.items()}


def _data_key(data_cfg: dict, n_train: int | None) -> dict[str, Any]:
    key = {k: data_cfg.get(k) for k in DATA_KEYS}
    if n_train is not None:
        key["n_train"] = int(n_train)
    if key["name"] == "digits":
        key["n_train"] = n_train  # digits has no n_train: all 1,797 images unless the generator says otherwise
    return key


def cache_path(gen_cfg: dict, data_cfg: dict) -> Path:
    """``<cache_dir>/generators/<hash>.pt``, the hash covering the data config and the cVAE's hyperparameters."""
    settings = _train_settings(gen_cfg)
    data_key = _data_key(data_cfg, settings["n_train"])
    extra = {}
    if data_key["name"] == "shapes":
        from featurelens.data.shapes import GENERATOR_VERSION

        extra["shapes_version"] = GENERATOR_VERSION
    blob = json.dumps({"format": CKPT_FORMAT, "data": data_key, "train": settings, **extra}, sort_keys=True)
    digest = hashlib.sha256(blob.encode()).hexdigest()[:16]
    cache_dir = gen_cfg.get("cache_dir") or os.environ.get("FEATURELENS_CACHE") or "outputs/cache"
    return Path(str(cache_dir)).expanduser() / "generators" / f"{digest}.pt"


# ---------------------------------------------------------------------------- checkpoint files
def save_cvae(gen: CondVAEGenerator, path: str | Path, meta: dict | None = None) -> Path:
    """Write ``gen`` to ``path`` atomically (:func:`featurelens.results.atomic_write`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in gen.state_dict().items()}
    payload = {"format": CKPT_FORMAT, "config": gen.config(), "state_dict": state,
               "w_avg": gen.w_avg_table.detach().cpu().clone(), "meta": meta or {}}
    return atomic_write(path, lambda fh: torch.save(payload, fh))


def load_cvae(path: str | Path, device: str | torch.device = "cpu") -> CondVAEGenerator:
    """A frozen :class:`CondVAEGenerator` from a checkpoint written by :func:`save_cvae`."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"generator.ckpt={str(path)!r}: no such file; make one with {MAKE_ONE}")
    ckpt = read_file(path, "generator.ckpt", weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CKPT_FORMAT:
        raise ConfigError(f"generator.ckpt={str(path)!r} is not a featurelens cVAE checkpoint (format "
                          f"{ckpt.get('format') if isinstance(ckpt, dict) else type(ckpt).__name__!r}, "
                          f"expected {CKPT_FORMAT!r}); make one with {MAKE_ONE}")
    gen = CondVAEGenerator(**ckpt["config"])
    gen.load_state_dict(ckpt["state_dict"])
    gen.w_avg_table.copy_(ckpt["w_avg"])
    return freeze(gen.to(device))


def _check_matches(gen: CondVAEGenerator, data_cfg: dict, source: str) -> None:
    for attr, key in (("num_classes", "num_classes"), ("resolution", "image_size"), ("channels", "channels")):
        want = data_cfg.get(key)
        if want is not None and int(want) != getattr(gen, attr):
            raise ConfigError(f"generator {source} has {attr}={getattr(gen, attr)} but data.{key}={want}; "
                              f"use a checkpoint made for this data ({MAKE_ONE}) or set generator.ckpt=null")


# ---------------------------------------------------------------------------- training from a config
def train_from_config(gen_cfg: dict, data_cfg: dict, progress: bool = True) -> CondVAEGenerator:
    """Render or load the training images of ``data_cfg`` and train a cVAE with the settings of ``gen_cfg``."""
    settings = _train_settings(gen_cfg)
    size = data_cfg.get("image_size")
    if size not in valid_resolutions():
        raise ConfigError(f"data.image_size={size!r}: the cVAE synthesises 4*2^k px; valid: {valid_resolutions()}")
    images, labels, masks = load_training_data(data_cfg, settings["n_train"])
    if images.shape[1] != int(data_cfg.get("channels", images.shape[1])):
        raise ConfigError(f"data.channels={data_cfg.get('channels')} but {data_cfg.get('name')} images have "
                          f"{images.shape[1]} channels")
    num_classes = int(data_cfg.get("num_classes") or 10)
    if int(labels.max()) >= num_classes:
        raise ConfigError(f"data.num_classes={num_classes} but the {data_cfg.get('name')} labels go up to "
                          f"{int(labels.max())}")
    kwargs = {k: settings[k] for k in ("z_dim", "w_dim", "base_channels", "epochs", "batch_size", "lr", "beta",
                                       "mask_weight", "seed")}
    return train_cvae(images, labels, masks, num_classes=num_classes, progress=progress, **kwargs)


def _train_and_cache(gen_cfg: dict, data_cfg: dict, path: Path) -> None:
    log.info("no cached cVAE generator for data=%s at %dpx: training one (%s epochs), then caching it at %s",
             data_cfg.get("name"), data_cfg.get("image_size"), _train_settings(gen_cfg)["epochs"], path)
    start = time.perf_counter()
    gen = train_from_config(gen_cfg, data_cfg)
    minutes = (time.perf_counter() - start) / 60
    save_cvae(gen, path, meta={"data": _data_key(data_cfg, _train_settings(gen_cfg)["n_train"]),
                               "train": _train_settings(gen_cfg), "train_minutes": round(minutes, 3)})
    log.info("trained the cVAE generator in %.1f min; saved %s", minutes, path)


def ensure_cached(gen_cfg: dict, data_cfg: dict) -> Path | None:
    """The cache file of the cVAE for these configs, trained and cached first if it is not there yet (also
    inside ``no_grad``); None where no cVAE is trained: StyleGAN-XL, a given ``generator.ckpt``, or a data config
    without a cVAE recipe."""
    gen_cfg, data_cfg = dict(gen_cfg or {}), dict(data_cfg or {})
    if gen_cfg.get("name") != "cvae" or gen_cfg.get("ckpt") or data_cfg.get("name") not in ("shapes", "digits"):
        return None
    path = cache_path(gen_cfg, data_cfg)
    if not path.is_file():
        with torch.enable_grad():
            _train_and_cache(gen_cfg, data_cfg, path)
    return path


# ---------------------------------------------------------------------------- entry point
def load_generator(gen_cfg: dict, data_cfg: dict, device: str | torch.device = "cpu") -> Generator:
    """The frozen generator that ``gen_cfg`` (``conf/generator/*.yaml``) names, checked against ``data_cfg``."""
    gen_cfg, data_cfg = dict(gen_cfg or {}), dict(data_cfg or {})
    name = gen_cfg.get("name")
    if name not in GENERATORS:
        raise ConfigError(f"generator.name={name!r}; valid: {list(GENERATORS)}")
    if name == "stylegan_xl":
        from featurelens.models.generators.stylegan_xl import StyleGANXLAdapter

        return StyleGANXLAdapter(gen_cfg.get("checkout"), gen_cfg.get("pkl"),
                                 quantize_uint8=bool(gen_cfg.get("quantize_uint8", True)), device=device,
                                 num_classes=data_cfg.get("num_classes"), resolution=gen_cfg.get("resolution"))
    if data_cfg.get("name") not in ("shapes", "digits") and not gen_cfg.get("ckpt"):
        raise ConfigError(f"data.name={data_cfg.get('name')!r} has no cVAE training recipe; valid: "
                          "['shapes', 'digits'] (or pass generator.ckpt=<file>)")
    if gen_cfg.get("ckpt"):
        path = Path(str(gen_cfg["ckpt"])).expanduser()
        gen = load_cvae(path, device)
        _check_matches(gen, data_cfg, f"checkpoint {str(path)!r}")
        return gen
    path = ensure_cached(gen_cfg, data_cfg)
    log.info("loading the cached cVAE generator %s", path)
    gen = load_cvae(path, device)
    _check_matches(gen, data_cfg, f"cache {str(path)!r}")
    return gen
