"""python scripts/train_generator.py [data=shapes|digits] [generator.epochs=N ...] [out=file.pt] [force=true]

Train the cVAE generator of the linking analysis (linking spec §6) and save it where ``generator=cvae
generator.ckpt=null`` finds it (``<cache_dir>/generators/<hash>.pt``), or at ``out=``. Prints the path.
A cached generator for the same data and settings is reused unless ``force=true``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from featurelens.errors import ConfigError
from featurelens.models.generators.store import cache_path, load_cvae, save_cvae, train_from_config
from featurelens.runtime import entry_point

log = logging.getLogger("featurelens")


def train_generator(cfg: DictConfig) -> dict:
    """Train (or reuse) the cVAE of ``cfg.generator`` on ``cfg.data``; returns the path and the training time."""
    gen_cfg = OmegaConf.to_container(cfg.generator, resolve=True)
    data_cfg = OmegaConf.to_container(cfg.data, resolve=True)
    if gen_cfg.get("name") != "cvae":
        raise ConfigError(f"generator={gen_cfg.get('name')!r}: only generator=cvae is trained here")
    path = Path(str(cfg.out)).expanduser() if cfg.get("out") else cache_path(gen_cfg, data_cfg)
    minutes = 0.0
    if path.is_file() and not cfg.get("force") and not cfg.get("out"):
        log.info("the cache already holds this generator: %s (force=true retrains it)", path)
        gen = load_cvae(path)
    else:
        start = time.perf_counter()
        gen = train_from_config(gen_cfg, data_cfg)
        minutes = (time.perf_counter() - start) / 60
        save_cvae(gen, path, meta={"data": data_cfg, "train": gen_cfg, "train_minutes": round(minutes, 3)})
        log.info("trained the cVAE in %.1f min", minutes)
    n_preview = int(cfg.get("n_preview") or 0)
    if n_preview > 0:
        from torchvision.utils import save_image

        with torch.no_grad():
            w = torch.cat([gen.sample_w(n_preview, c, psi=0.7, seed=c) for c in range(gen.num_classes)])
            images = gen.synthesize(w)
        preview = Path(cfg.paths.output_dir) / "samples.png"
        preview.parent.mkdir(parents=True, exist_ok=True)
        save_image(images, preview, nrow=n_preview)  # one row per class; cVAE samples are blurry
        log.info("samples (psi=0.7, one row per class): %s", preview)
    print(path)
    return {"path": str(path), "train_minutes": minutes}


main = entry_point(train_generator, "train_generator")


if __name__ == "__main__":
    main()
