"""Training entry point: ``python train.py [overrides]`` (Hydra) or ``train(cfg)`` from Python."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.errors import InstantiationException
from lightning_fabric.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig, OmegaConf

from featurelens.analysis.chirality import compatible_width
from featurelens.callbacks import AnalysisCallback
from featurelens.checkpoints import AtomicCheckpointIO, check_same_model, read_checkpoint
from featurelens.errors import ConfigError
from featurelens.models.builders import has_cifar_stem
from featurelens.module import Classifier
from featurelens.report_page import write_run_report
from featurelens.results import write_json
from featurelens.runtime import build, build_loggers, entry_point, instantiate_all, validate_config

log = logging.getLogger("featurelens")


def build_net(model_cfg: dict[str, Any], data_cfg: DictConfig) -> tuple[torch.nn.Module, dict[str, Any], int]:
    """Build the net and resolve the width it sees (``model.input_size``: auto, null or an int).

    Returns the net, the model config to store in the checkpoint (``image_size`` = that width) and the width.
    """
    model_cfg = dict(model_cfg)
    model_cfg.pop("recipe", None)  # the architecture's training defaults, read by the optimizer/scheduler configs
    size = model_cfg.pop("input_size", None)
    if isinstance(size, int):
        model_cfg["image_size"] = size
    net = build(model_cfg)
    arch = model_cfg.get("arch")
    if "cifar_stem" in model_cfg:  # the checkpoint keeps the stem built, not "auto"
        model_cfg["cifar_stem"] = has_cifar_stem(net.state_dict())
    if size == "auto":
        try:
            size = compatible_width(net, data_cfg.image_size, in_channels=data_cfg.channels)
        except ValueError as e:
            raise ConfigError(f"model={arch} with data.image_size={data_cfg.image_size}: {e}; set "
                              "model.input_size to a width the model accepts, or null") from None
        if size != data_cfg.image_size:
            log.info("model sees %d px inputs (data is %d px): the nearest width whose strided ops commute "
                     "with the mirror (model.input_size=auto)", size, data_cfg.image_size)
    size = size or data_cfg.image_size
    try:  # one tiny forward pass: does the model take inputs of this width at all?
        with torch.no_grad():
            net.eval()(torch.zeros(1, data_cfg.channels, size, size))
    except RuntimeError as e:
        raise ConfigError(f"model={arch} cannot take {size}-px inputs ({str(e).splitlines()[0]}); use "
                          "model.input_size=auto or a larger width") from None
    finally:
        net.train()
    model_cfg["image_size"] = size
    return net, model_cfg, size


def log_results_artifact(loggers: list, out_dir: Path) -> None:
    """``logger.wandb.log_model``: besides Lightning's checkpoint artifacts (type ``model``), the run's results
    (``analysis/``, ``metrics.json``, ``report.html``) as a W&B artifact of type ``results``."""
    import wandb
    from pytorch_lightning.loggers import WandbLogger

    for lg in loggers:
        if isinstance(lg, WandbLogger):
            artifact = wandb.Artifact(f"results-{lg.experiment.id}", type="results",
                                      description="featurelens analysis records, figures, tables and report page")
            artifact.add_file(str(write_run_report(out_dir)))
            artifact.add_file(str(out_dir / "metrics.json"))
            if (out_dir / "analysis").is_dir():
                artifact.add_dir(str(out_dir / "analysis"), name="analysis")
            lg.experiment.log_artifact(artifact)


def train(cfg: DictConfig) -> dict[str, float]:
    """Seed, build everything from ``cfg``, fit (resuming from ``cfg.ckpt_path``), test; returns the metrics."""
    validate_config(cfg)
    pl.seed_everything(cfg.seed, workers=True)
    out_dir = Path(cfg.paths.output_dir)

    net, model_cfg, input_size = build_net(OmegaConf.to_container(cfg.model, resolve=True), cfg.data)
    build(cfg.init)(net)
    datamodule = build(cfg.data, input_size=input_size, order_seed=cfg.seed)
    data_cfg = OmegaConf.to_container(cfg.data, resolve=True)
    module = Classifier(
        model_cfg,
        optimizer=OmegaConf.to_container(cfg.optimizer, resolve=True),
        scheduler=OmegaConf.to_container(cfg.scheduler, resolve=True) if cfg.get("scheduler") else None,
        data_info={**data_cfg, "input_size": input_size},
        run_info={"seed": cfg.seed, "init": OmegaConf.to_container(cfg.init, resolve=True),
                  "flip_aug": cfg.data.get("flip_aug")},
        net=net,
        divergence_factor=cfg.get("divergence_factor"),
    )
    if cfg.get("ckpt_path"):  # a resume: the checkpoint must hold this run's model, checked before any work
        check_same_model(read_checkpoint(cfg.ckpt_path), net, model_cfg, f"ckpt_path={cfg.ckpt_path!r}")
    loggers = build_loggers(cfg, {"n_params": sum(p.numel() for p in net.parameters())})
    callbacks = instantiate_all(cfg.get("callbacks")) + instantiate_all(cfg.get("analysis"))
    for cb in callbacks:  # slow set-up (a cVAE to train) before the fit, not inside a callback under DDP
        if isinstance(cb, AnalysisCallback):
            cb.runner.analysis.prepare(datamodule)
    try:
        trainer: pl.Trainer = build(cfg.trainer, callbacks=callbacks, logger=loggers or False,
                                    plugins=[AtomicCheckpointIO()])
    except InstantiationException as e:  # Lightning's own checks of the trainer settings
        if isinstance(e.__cause__, ValueError | MisconfigurationException):
            raise ConfigError(f"trainer: {str(e.__cause__).strip().splitlines()[0]}") from None
        raise

    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    if cfg.get("test"):
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        trainer.test(module, datamodule=datamodule, ckpt_path=best or None, verbose=False)
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")})
    metrics["epochs"] = trainer.current_epoch
    if trainer.is_global_zero:
        write_json(out_dir / "metrics.json", metrics)
        if OmegaConf.select(cfg, "logger.wandb.log_model"):
            log_results_artifact(loggers, out_dir)
        log.info("metrics: %s", json.dumps({k: round(v, 4) for k, v in metrics.items()}))
        log.info("outputs in %s", out_dir)
    return metrics


main = entry_point(train, "config")

if __name__ == "__main__":
    main()
