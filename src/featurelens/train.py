"""Training entry point: ``python train.py [overrides]`` (Hydra) or ``train(cfg)`` from Python."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf

from featurelens.analysis.chirality import compatible_width
from featurelens.module import Classifier
from featurelens.results import write_json
from featurelens.runtime import build, build_loggers, instantiate_all, run_task, validate_config

log = logging.getLogger("featurelens")
CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")  # the repository's conf/ (editable install)


def build_net(model_cfg: dict[str, Any], data_cfg: DictConfig) -> tuple[torch.nn.Module, dict[str, Any], int]:
    """Build the net and resolve the width it sees (``model.input_size``: auto, null or an int).

    Returns the net, the model config to store in the checkpoint (``image_size`` = that width) and the width.
    """
    model_cfg = dict(model_cfg)
    size = model_cfg.pop("input_size", None)
    if isinstance(size, int):
        model_cfg["image_size"] = size
    net = build(model_cfg)
    if size == "auto":
        size = compatible_width(net, data_cfg.image_size, in_channels=data_cfg.channels)
        if size != data_cfg.image_size:
            log.info("model sees %d px inputs (data is %d px): the nearest width whose strided ops commute "
                     "with the mirror (model.input_size=auto)", size, data_cfg.image_size)
    size = size or data_cfg.image_size
    model_cfg["image_size"] = size
    return net, model_cfg, size


def train(cfg: DictConfig) -> dict[str, float]:
    """Seed, build everything from ``cfg``, fit (resuming from ``cfg.ckpt_path``), test; returns the metrics."""
    pl.seed_everything(cfg.seed, workers=True)
    validate_config(cfg)
    out_dir = Path(cfg.paths.output_dir)

    net, model_cfg, input_size = build_net(OmegaConf.to_container(cfg.model, resolve=True), cfg.data)
    build(cfg.init)(net)
    datamodule = build(cfg.data, input_size=input_size)
    data_cfg = OmegaConf.to_container(cfg.data, resolve=True)
    module = Classifier(
        model_cfg,
        optimizer=OmegaConf.to_container(cfg.optimizer, resolve=True),
        scheduler=OmegaConf.to_container(cfg.scheduler, resolve=True) if cfg.get("scheduler") else None,
        data_info={**data_cfg, "input_size": input_size},
        run_info={"seed": cfg.seed, "init": OmegaConf.to_container(cfg.init, resolve=True),
                  "flip_aug": cfg.data.get("flip_aug")},
        net=net,
    )
    loggers = build_loggers(cfg)
    callbacks = instantiate_all(cfg.get("callbacks")) + instantiate_all(cfg.get("analysis"))
    trainer: pl.Trainer = build(cfg.trainer, callbacks=callbacks, logger=loggers or False)

    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    if cfg.get("test"):
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        trainer.test(module, datamodule=datamodule, ckpt_path=best or None, verbose=False)
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")})
    metrics["epochs"] = trainer.current_epoch
    if trainer.is_global_zero:
        write_json(out_dir / "metrics.json", metrics)
        log.info("metrics: %s", json.dumps({k: round(v, 4) for k, v in metrics.items()}))
        log.info("outputs in %s", out_dir)
    return metrics


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> float | None:
    return run_task(train, cfg)


if __name__ == "__main__":
    main()
