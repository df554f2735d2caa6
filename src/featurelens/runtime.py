"""What ``train.py`` and ``analyze.py`` share: config checks, loggers, callbacks, and the task wrapper."""

from __future__ import annotations

import hashlib
import logging
import math
import re
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import Logger

from featurelens.data import DATASETS
from featurelens.errors import ConfigError, NonFiniteLossError
from featurelens.models import ARCHS, INIT_METHODS

log = logging.getLogger("featurelens")


def _split_overrides(overrides: str) -> list[str]:
    """Split Hydra's ``override_dirname`` at the commas that separate items (not those inside [...])."""
    items, depth, current = [], 0, ""
    for ch in overrides:
        depth += {"[": 1, "(": 1, "{": 1, "]": -1, ")": -1, "}": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += ch
    return [*items, current] if current else items


def safe_dirname(overrides: str, max_len: int = 100) -> str:
    """A sweep job's dir name from its overrides: group choices (``model=vgg16``) first, no path
    separators, and names longer than ``max_len`` cut and suffixed with a hash of the whole string."""
    items = _split_overrides(overrides)
    name = ",".join(sorted(items, key=lambda item: "." in item.split("=")[0])).replace("/", "_")
    if len(name) <= max_len:
        return name
    return f"{name[: max_len - 9]}_{hashlib.md5(name.encode()).hexdigest()[:8]}"


OmegaConf.register_new_resolver("fl.dirname", safe_dirname, replace=True)


def _check(ok: bool, key: str, value: Any, rule: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r}: {rule}")


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def validate_config(cfg: DictConfig) -> None:
    """Reject bad values before any work, naming the key, the value and what is allowed."""
    if "model" in cfg and cfg.model is not None:
        _check(cfg.model.get("arch") in ARCHS, "model.arch", cfg.model.get("arch"), f"valid: {list(ARCHS)}")
        size = cfg.model.get("input_size")
        _check(size in (None, "auto") or _positive_int(size), "model.input_size", size,
               "use auto, null or a positive int")
    if "init" in cfg:
        _check(cfg.init.get("method") in INIT_METHODS, "init.method", cfg.init.get("method"),
               f"valid: {list(INIT_METHODS)}")
        if cfg.init.method != "default" and cfg.model.get("weights"):
            raise ConfigError(f"init={cfg.init.method} would overwrite model.weights={cfg.model.weights!r}; "
                              "use init=default with pretrained weights")
    if "data" in cfg and cfg.data is not None:
        d = cfg.data
        _check(d.get("name") in DATASETS, "data.name", d.get("name"), f"valid: {list(DATASETS)}")
        for key in ("batch_size", "image_size", "channels", "num_classes"):
            _check(_positive_int(d.get(key)), f"data.{key}", d.get(key), "must be a positive integer")
        _check(isinstance(d.get("num_workers", 0), int) and d.get("num_workers", 0) >= 0, "data.num_workers",
               d.get("num_workers"), "must be an integer >= 0")
        for key in ("n_train", "n_val", "n_test"):
            if key in d:
                _check(_positive_int(d[key]), f"data.{key}", d[key], "must be a positive integer")
        if d.name == "imagefolder":
            root = Path(str(d.root)).expanduser()
            _check(root.is_dir(), "data.root", str(d.root),
                   "no such folder (an imagefolder root holds train/ and val/)")
    if "trainer" in cfg:
        _check(_positive_int(cfg.trainer.get("max_epochs")), "trainer.max_epochs", cfg.trainer.get("max_epochs"),
               "must be a positive integer")
        if cfg.trainer.get("sync_batchnorm") and cfg.trainer.get("accelerator") == "cpu":
            raise ConfigError("trainer.sync_batchnorm=true needs GPUs; with trainer.accelerator=cpu "
                              "set trainer.sync_batchnorm=false")
    if "optimizer" in cfg:
        lr = cfg.optimizer.get("lr")
        _check(isinstance(lr, int | float) and math.isfinite(lr) and lr > 0, "optimizer.lr", lr,
               "must be a finite number > 0")
    for name, node in (cfg.get("analysis") or {}).items():
        if node is not None and node.get("every_n_epochs") is not None:
            _check(_positive_int(node.every_n_epochs), f"analysis.{name}.every_n_epochs", node.every_n_epochs,
                   "must be a positive integer")
    if "device" in cfg:
        dev = str(cfg.device)
        _check(dev in ("auto", "cpu") or re.fullmatch(r"cuda(:\d+)?", dev) is not None, "device", dev,
               "use auto, cpu, cuda or cuda:N")
        _check(not dev.startswith("cuda") or torch.cuda.is_available(), "device", dev,
               "no CUDA device here; use device=auto or cpu")
    ckpt = cfg.get("ckpt_path")
    if ckpt is not None:
        _check(Path(str(ckpt)).expanduser().is_file(), "ckpt_path", str(ckpt), "no such checkpoint file")


def build(node: Any, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate``, letting a ``ConfigError`` raised by the target through unwrapped."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as e:
        if isinstance(e.__cause__, ConfigError):
            raise e.__cause__ from None
        raise


def instantiate_all(node: DictConfig | None, **kwargs: Any) -> list[Any]:
    """Instantiate every entry of a dict config that has a ``_target_`` (callbacks, loggers, analyses)."""
    return [build(v, **kwargs) for v in (node or {}).values() if isinstance(v, DictConfig) and "_target_" in v]


def build_loggers(cfg: DictConfig) -> list[Logger]:
    """Loggers of ``cfg.logger``; W&B runs of a sweep are grouped by the sweep and named by their overrides."""
    hc = HydraConfig.get() if HydraConfig.initialized() else None
    loggers = []
    for key, node in (cfg.get("logger") or {}).items():
        if not (isinstance(node, DictConfig) and "_target_" in node):
            continue
        extra: dict[str, Any] = {}
        if key == "wandb":
            multirun = hc is not None and hc.mode == RunMode.MULTIRUN
            if node.get("group") is None and multirun:
                extra["group"] = Path(hc.sweep.dir).name
            if node.get("name") is None and hc is not None:
                extra["name"] = (hc.job.override_dirname or Path(hc.runtime.output_dir).name) if multirun \
                    else Path(hc.runtime.output_dir).name
            Path(node.save_dir).mkdir(parents=True, exist_ok=True)
        logger = instantiate(node, **extra)
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
        loggers.append(logger)
    return loggers


def run_task(task: Callable[[DictConfig], dict], cfg: DictConfig) -> float | None:
    """Run ``task(cfg)``; turn known errors into one-line messages and always close the W&B run.

    In a ``-m`` sweep a failing job is logged, marked with a ``FAILED`` file in its directory and the sweep
    goes on; a single run exits with status 2 (bad config or input) or 1 (diverged or crashed).
    """
    multirun = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    out_dir = Path(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized() else Path.cwd()
    try:
        metrics = task(cfg)
        value = metrics.get(cfg.get("optimized_metric", ""))
        return float(value) if value is not None else None
    except (ConfigError, NonFiniteLossError) as e:
        (out_dir / "FAILED").write_text(f"{type(e).__name__}: {e}\n")
        if multirun:
            log.error("job %s failed: %s; the sweep continues", out_dir.name, e)
            return None
        print(f"featurelens: error: {e}", file=sys.stderr)
        sys.exit(2 if isinstance(e, ConfigError) else 1)
    except Exception:
        (out_dir / "FAILED").write_text(traceback.format_exc())
        if multirun:
            log.exception("job %s failed; the sweep continues", out_dir.name)
            return None
        raise
    finally:
        if "wandb" in sys.modules:
            import wandb

            if wandb.run is not None:
                wandb.finish()
