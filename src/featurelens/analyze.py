"""Analyse a finished model without training: ``python analyze.py ckpt_path=PATH`` (see conf/analyze.yaml).

The model comes from a featurelens checkpoint (its stored model and data configs), or from a model config
with torchvision weights or a local weights file. Each analysis writes the same results file, figures and
W&B run as during training, under ``<run_dir>/analysis/<name>/``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf

from featurelens.analysis.class_filters import ClassFilters, ClassFiltersResult, FinetuneConfig, decomposed_model
from featurelens.checkpoints import check_same_data, read_checkpoint
from featurelens.errors import ConfigError
from featurelens.module import Classifier
from featurelens.results import write_json
from featurelens.runner import AnalysisContext, AnalysisRunner
from featurelens.runtime import build, build_loggers, entry_point, validate_config
from featurelens.train import build_net

log = logging.getLogger("featurelens")


def load_model(cfg: DictConfig) -> tuple[torch.nn.Module, dict[str, Any], int, int]:
    """The net, the data config to probe it with, and the completed epochs and steps it was trained for."""
    if cfg.get("ckpt_path"):
        ckpt = read_checkpoint(cfg.ckpt_path)
        hp = ckpt["hyper_parameters"]
        module = Classifier(**hp)
        module.load_state_dict(ckpt["state_dict"])
        data_cfg = dict(hp.get("data_info") or {})
        if cfg.get("data"):
            data_cfg = {**OmegaConf.to_container(cfg.data, resolve=True), "input_size": data_cfg.get("input_size")}
            check_same_data(ckpt, data_cfg, f"ckpt_path={cfg.ckpt_path!r}")
        return module.net, data_cfg, int(ckpt.get("epoch", -1)) + 1, int(ckpt.get("global_step", 0))
    if not cfg.get("model"):
        raise ConfigError("ckpt_path=null and no model given: pass ckpt_path=<file.ckpt>, or model=<arch> "
                          "with model.weights=<torchvision weight name or local file>")
    if not cfg.get("data"):
        raise ConfigError("model= without ckpt_path needs data=<name> for the probe images (e.g. data=shapes)")
    net, _, input_size = build_net(OmegaConf.to_container(cfg.model, resolve=True), cfg.data)
    if not cfg.model.get("weights"):
        log.warning("model.weights=null: analysing a randomly initialised %s", cfg.model.arch)
    return net, {**OmegaConf.to_container(cfg.data, resolve=True), "input_size": input_size}, 0, 0


def finetune_decomposed(model: torch.nn.Module, result: ClassFiltersResult, finetune: FinetuneConfig, out_dir: Path,
                        ctx: AnalysisContext) -> list[float]:
    """Fine-tune the class-filter decomposed model (the spec's decomposed softmax) as its own fit: the head is a
    ``MaskedLinear`` from W and b with the default-k mask of ``result`` fixed (``finetune.head_only`` freezes the
    backbone). Returns the val accuracy per epoch, also in ``<out_dir>/finetune.json``."""
    net = decomposed_model(model, result.values["head"], result.mask, finetune.head_only)
    module = Classifier({"num_classes": result.values["num_classes"]},
                        {"_target_": "torch.optim.Adam", "_partial_": True, "lr": finetune.lr}, net=net)
    recorder = _FinetuneRecorder(out_dir)
    trainer = pl.Trainer(max_epochs=finetune.epochs, logger=ctx.loggers or False, enable_checkpointing=False,
                         default_root_dir=str(out_dir / "finetune"), callbacks=[recorder], num_sanity_val_steps=0,
                         accelerator="auto", devices=1)
    trainer.fit(module, datamodule=ctx.data)
    return recorder.accuracies


class _FinetuneRecorder(pl.Callback):
    """Logs ``class_filters/ft/acc_decomposed`` after every fine-tuning epoch and keeps a JSON copy."""

    def __init__(self, out_dir: Path):
        self.out_dir, self.accuracies = out_dir, []

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or "val/acc" not in trainer.callback_metrics:
            return
        acc = float(trainer.callback_metrics["val/acc"])
        self.accuracies.append(acc)
        for lg in trainer.loggers:
            lg.log_metrics({"class_filters/ft/acc_decomposed": acc, "class_filters/ft/epoch": len(self.accuracies)},
                           step=trainer.global_step)
        if trainer.is_global_zero:
            write_json(self.out_dir / "finetune.json", {"val_acc_per_epoch": self.accuracies})


def analyze(cfg: DictConfig) -> dict[str, Any]:
    """Run every configured analysis once on the model; returns {analysis name: record}."""
    validate_config(cfg)
    pl.seed_everything(cfg.seed, workers=True)
    out_dir = Path(cfg.paths.output_dir)
    net, data_cfg, epoch, step = load_model(cfg)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cfg.get("device", "auto") == "auto"
                          else cfg.device)
    net = net.to(device)
    data_cfg = {k: v for k, v in data_cfg.items() if k != "_target_"}
    datamodule = build({"_target_": "featurelens.data.ImageDataModule", **data_cfg})
    runners = [AnalysisRunner.from_node(node) for node in (cfg.get("analysis") or {}).values()
               if isinstance(node, DictConfig) and "analysis" in node]
    if not runners:
        raise ConfigError("analysis=none: nothing to run; choose e.g. analysis=chirality")
    loggers = build_loggers(cfg, {"n_params": sum(p.numel() for p in net.parameters())})
    records = {}
    for runner in runners:
        ctx = AnalysisContext(out_dir, epoch, step, final=True, loggers=loggers, data=datamodule)
        records[runner.name] = runner.run_once(net, ctx)
        analysis = runner.analysis
        if isinstance(analysis, ClassFilters) and analysis.config.finetune.enabled:
            accs = finetune_decomposed(net, runner.result, analysis.config.finetune, runner.out_dir, ctx)
            log.info("%s: fine-tuned decomposed model, val acc per epoch %s", runner.name, accs)
        log.info("%s: results in %s", runner.name, runner.out_dir)
    for lg in loggers:
        lg.finalize("success")
    write_json(out_dir / "metrics.json", {k: v for r in records.values() for k, v in r.items()
                                          if isinstance(v, int | float)})
    return records


main = entry_point(analyze, "analyze")

if __name__ == "__main__":
    main()
