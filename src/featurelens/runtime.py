"""What ``train.py`` and ``analyze.py`` share: config checks, loggers, callbacks, and the task wrapper."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import hashlib
import logging
import math
import os
import re
import signal
import sys
import threading
import traceback
import typing
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
import hydra._internal.utils as hydra_utils  # run_and_report: how Hydra reports a config it cannot compose
import torch
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException, InstantiationException, OverrideParseException
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning_fabric.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue, OmegaConfBaseException
from pytorch_lightning.loggers import Logger

from featurelens.api import REGISTRY
from featurelens.data import DATASETS
from featurelens.errors import ConfigError, DiskFullError, RunError
from featurelens.models import ARCHS, INIT_METHODS
from featurelens.report_page import write_run_report
from featurelens.runner import detail_key

log = logging.getLogger("featurelens")
CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")  # the repository's conf/ (editable install)


def register_configs() -> None:
    """Make every registered analysis an option of the ``analysis`` group: ``analysis=<name>`` composes its
    ``Config`` dataclass (the one place of its defaults; typed, so a bad type or unknown key fails at compose
    time) under ``analysis.<name>``, with the schedule (``every_n_epochs``) and the generic callback as target."""
    store = ConfigStore.instance()
    for name, cls in REGISTRY.items():
        node = dataclasses.make_dataclass(f"{cls.Config.__name__}Node", [
            ("_target_", str, "featurelens.callbacks.AnalysisCallback"), ("_convert_", str, "all"),
            ("analysis", str, name), ("every_n_epochs", int | None, cls.every_n_epochs),
            *((key, typing.get_type_hints(cls.Config)[key], value) for key, value in cls.hydra_defaults.items())],
            bases=(cls.Config,))
        store.store(group="analysis", name=name, node={name: node})


register_configs()


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


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _int_list(value: Any) -> bool:
    return isinstance(value, ListConfig | list) and len(value) > 0 and all(_positive_int(v) for v in value)


MIN_SHAPES_SIZE = 8  # the shapes renderer draws scenes of at least 8 px


def _validate_model(m: DictConfig) -> None:
    _check(m.get("arch") in ARCHS, "model.arch", m.get("arch"), f"valid: {list(ARCHS)}")
    size = m.get("input_size")
    _check(size in (None, "auto") or _positive_int(size), "model.input_size", size, "use auto, null or a positive int")
    for key in ("channels", "hidden"):
        if m.get(key) is not None:
            _check(_int_list(m[key]), f"model.{key}", m[key], "must be a non-empty list of positive integers")
    if "pool_every" in m:
        _check(_positive_int(m.pool_every), "model.pool_every", m.pool_every, "must be a positive integer")
    if "dropout" in m:
        _check(_number(m.dropout) and 0 <= m.dropout < 1, "model.dropout", m.dropout, "must be a number in [0, 1)")
    if "batch_norm" in m:
        _check(isinstance(m.batch_norm, bool), "model.batch_norm", m.batch_norm, "must be true or false")
    if "cifar_stem" in m:
        _check(isinstance(m.cifar_stem, bool) or m.cifar_stem == "auto", "model.cifar_stem", m.cifar_stem,
               "must be true, false or auto")


def _validate_data(d: DictConfig) -> None:
    _check(d.get("name") in DATASETS, "data.name", d.get("name"), f"valid: {list(DATASETS)}")
    for key in ("batch_size", "image_size", "channels", "num_classes"):
        _check(_positive_int(d.get(key)), f"data.{key}", d.get(key), "must be a positive integer")
    if d.name == "shapes":
        _check(d.image_size >= MIN_SHAPES_SIZE, "data.image_size", d.image_size,
               f"the shapes are rendered at {MIN_SHAPES_SIZE} px or more")
    _check(isinstance(d.get("num_workers", 0), int) and d.get("num_workers", 0) >= 0, "data.num_workers",
           d.get("num_workers"), "must be an integer >= 0")
    for key in ("n_train", "n_val", "n_test"):
        if key in d:
            _check(_positive_int(d[key]), f"data.{key}", d[key], "must be a positive integer")
    if "crop_padding" in d:
        _check(isinstance(d.crop_padding, int) and d.crop_padding >= 0, "data.crop_padding", d.crop_padding,
               "must be an integer >= 0")
    if "flip_aug" in d:
        _check(isinstance(d.flip_aug, bool), "data.flip_aug", d.flip_aug, "must be true or false")


def _validate_training(cfg: DictConfig) -> None:
    _check(_positive_int(cfg.trainer.get("max_epochs")), "trainer.max_epochs", cfg.trainer.get("max_epochs"),
           "must be a positive integer")
    if cfg.trainer.get("sync_batchnorm") and cfg.trainer.get("accelerator") == "cpu":
        raise ConfigError("trainer.sync_batchnorm=true needs GPUs; with trainer.accelerator=cpu "
                          "set trainer.sync_batchnorm=false")
    if "optimizer" in cfg:
        lr = cfg.optimizer.get("lr")
        _check(_number(lr) and lr > 0, "optimizer.lr", lr, "must be a finite number > 0")
        wd = cfg.optimizer.get("weight_decay", 0.0)
        _check(_number(wd) and wd >= 0, "optimizer.weight_decay", wd, "must be a finite number >= 0")
        scale = cfg.optimizer.get("head_lr_scale", 1)
        _check(_number(scale) and scale > 0, "optimizer.head_lr_scale", scale, "must be a finite number > 0")
        if scale != 1 and not (cfg.get("model") or {}).get("head_module"):
            raise ConfigError(f"optimizer.head_lr_scale={scale} needs model.head_module (the head's module name); "
                              "model.head_module is not set")
    if cfg.get("scheduler") and "warmup_epochs" in cfg.scheduler:
        w = cfg.scheduler.warmup_epochs
        _check(_number(w) and w >= 0, "model.recipe.warmup_epochs", w, "must be a number of epochs >= 0")
    if "divergence_factor" in cfg:
        f = cfg.divergence_factor
        _check(f is None or (_number(f) and f > 1), "divergence_factor", f, "use null (off) or a number > 1")


def validate_config(cfg: DictConfig) -> None:
    """Reject bad values before any work, naming the key, the value and what is allowed."""
    seed = cfg.get("seed")
    _check(isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed < 2**32, "seed", seed,
           "must be an integer in [0, 2**32)")
    if "model" in cfg and cfg.model is not None:
        _validate_model(cfg.model)
    if "init" in cfg:
        _check(cfg.init.get("method") in INIT_METHODS, "init.method", cfg.init.get("method"),
               f"valid: {list(INIT_METHODS)}")
        if cfg.init.method != "default" and cfg.model.get("weights"):
            raise ConfigError(f"init={cfg.init.method} would overwrite model.weights={cfg.model.weights!r}; "
                              "use init=default with pretrained weights")
    if "data" in cfg and cfg.data is not None:
        _validate_data(cfg.data)
    if "trainer" in cfg:
        _validate_training(cfg)
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


def build_loggers(cfg: DictConfig, facts: dict[str, Any] | None = None) -> list[Logger]:
    """Loggers of ``cfg.logger``, each given the composed config plus ``facts`` (e.g. the parameter count) and
    the git commit. W&B: a sweep's runs are grouped by the experiment (or the swept keys) and the sweep's date
    and time, and named by their overrides with the swept ones first; the experiment and the analyses are tags;
    analysis scalars are plotted against ``epoch`` (the analysed epoch: 0 = init, n = after n epochs)."""
    hc = HydraConfig.get() if HydraConfig.initialized() else None
    nodes = {k: v for k, v in (cfg.get("logger") or {}).items() if isinstance(v, DictConfig) and "_target_" in v}
    hparams = {**OmegaConf.to_container(cfg, resolve=True), **(facts or {}), "git_commit": git_commit()} \
        if nodes else {}
    loggers = []
    for key, node in nodes.items():
        extra: dict[str, Any] = {}
        if key == "wandb":
            extra = _wandb_run(cfg, node, hc)
            Path(node.save_dir).mkdir(parents=True, exist_ok=True)
        logger = instantiate(node, **extra)
        logger.log_hyperparams(hparams)
        if key == "wandb":
            logger.experiment.define_metric("epoch")
            for name in cfg.get("analysis") or {}:
                for glob in (f"{name}/*", detail_key(name, "*")):
                    logger.experiment.define_metric(glob, step_metric="epoch")
        loggers.append(logger)
    return loggers


def git_commit() -> str | None:
    """The commit of the featurelens checkout this runs from (``+dirty`` with uncommitted changes), None if it
    is not a git checkout."""
    import subprocess

    root = Path(CONF_DIR).parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


def swept_keys(hc: Any) -> list[str]:
    """The keys a sweep varies: the sweep overrides of its command line (``multirun.yaml`` in the sweep dir)
    and its sweeper's ``params`` (an experiment's grid)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    keys = list((hc.sweeper.get("params") or {}).keys())
    launched = Path(hc.sweep.dir) / "multirun.yaml"
    if launched.exists():
        task = OmegaConf.load(launched).hydra.overrides.task
        keys += [o.key_or_group for o in OverridesParser.create().parse_overrides(list(task)) if o.is_sweep_override()]
    return list(dict.fromkeys(keys))


def _wandb_run(cfg: DictConfig, node: DictConfig, hc: Any) -> dict[str, Any]:
    """The W&B run's name, group and tags where the config leaves them to featurelens."""
    experiment = hc.runtime.choices.get("experiment") if hc is not None else None
    extra: dict[str, Any] = {"tags": list(dict.fromkeys([*(node.get("tags") or []), *([experiment] if experiment
                                                          else []), *(cfg.get("analysis") or {})]))}
    if hc is None:
        return extra
    if hc.mode != RunMode.MULTIRUN:
        if node.get("name") is None:
            extra["name"] = Path(hc.runtime.output_dir).name
        return extra
    swept = swept_keys(hc)
    if node.get("group") is None:
        sweep = Path(hc.sweep.dir)
        extra["group"] = f"{experiment or ','.join(swept) or 'sweep'} {sweep.parent.name} {sweep.name}"
    if node.get("name") is None:
        given = [o for o in hc.overrides.task if not o.startswith(("hydra.", "+hydra."))]
        first = [o for o in given if o.lstrip("+~").split("=", 1)[0] in swept]
        extra["name"] = " ".join([*first, *(o for o in given if o not in first)]) or Path(hc.runtime.output_dir).name
    return extra


# Known third-party output with nothing for a user to act on, hidden while ``extras.ignore_warnings`` is on:
# (category, message regex) of warnings, and (logger name, message prefix) of log records.
NOISE_WARNINGS = ((FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated"),)  # Lightning on torch 2.14
NOISE_LOGS = (("pytorch_lightning.utilities.rank_zero", "💡 Tip:"),)  # Lightning's litlogger advert


class _DropPrefix(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


def apply_extras(cfg: DictConfig) -> None:
    """``cfg.extras``: hide the known third-party noise (``ignore_warnings``) and log what this run is
    (``print_config``: the composed config choices, the analyses on and the output dir)."""
    extras = cfg.get("extras") or {}
    if extras.get("ignore_warnings", True):
        for category, pattern in NOISE_WARNINGS:
            warnings.filterwarnings("ignore", message=pattern, category=category)
        for name, prefix in NOISE_LOGS:
            target = logging.getLogger(name)
            if not any(isinstance(f, _DropPrefix) and f.prefix == prefix for f in target.filters):
                target.addFilter(_DropPrefix(prefix))
    if extras.get("print_config", True):
        log.info("%s", run_summary(cfg))


def run_summary(cfg: DictConfig) -> str:
    """A few lines naming the run: the config group choices and overrides, the analyses, the output dir."""
    lines = []
    if HydraConfig.initialized():
        hc = HydraConfig.get()
        # Hydra lists the choices last-composed first
        choices = {k: v for k, v in reversed(hc.runtime.choices.items()) if not k.startswith("hydra") and v is not None}
        lines.append("config: " + " ".join(f"{k}={v}" for k, v in choices.items()))
        if hc.overrides.task:
            lines.append("overrides: " + " ".join(hc.overrides.task))
    training = "trainer" in cfg
    def schedule(node: DictConfig) -> str:
        every = node.get("every_n_epochs", 1)
        return " (epoch 0 and the last)" if every is None else f" (every {every} epochs)"

    analyses = [name + (schedule(node) if training else "") for name, node in (cfg.get("analysis") or {}).items()
                if isinstance(node, DictConfig) and "_target_" in node]
    lines.append("analyses: " + (", ".join(analyses) or "none"))
    if training:
        lines.append(f"seed {cfg.get('seed')}, {cfg.trainer.get('max_epochs')} epochs")
    lines.append(f"outputs: {cfg.paths.output_dir}")
    return "\n  ".join(lines)


_IN_TASK = False  # True while run_task runs a job: errors outside it come from Hydra composing the config


def _one_line(message: str) -> str:
    """A one-line version of an error message; an exception re-raised from a DataLoader worker keeps only
    the original error's own message (the last line of the worker's traceback)."""
    if "Original Traceback" in message:
        message = message.strip().splitlines()[-1].split(": ", 1)[-1]
    return " ".join(line.strip() for line in message.strip().splitlines() if line.strip())


def user_error(e: BaseException) -> ConfigError | RunError | None:
    """The user-facing condition behind ``e`` (bad config or input, diverged run, full disk), or None for a
    bug, which keeps its traceback."""
    if isinstance(e, ConfigError | RunError):
        return e
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFullError(f"no space left writing {e.filename or 'a file'} ({e.strerror}); the last complete "
                             "checkpoint is intact: free some space, then resume with ckpt_path=<run dir>/"
                             "checkpoints/last.ckpt")
    if isinstance(e, InterpolationResolutionError | MissingMandatoryValue):
        return ConfigError(_one_line(str(e)))
    if isinstance(e, InstantiationException) and e.__cause__ is not None:
        return user_error(e.__cause__)
    return None


class Interrupted(KeyboardInterrupt):
    """SIGTERM (a scheduler's preemption, ``kill``) raised where the run is, like Ctrl-C's KeyboardInterrupt:
    mid-batch or mid-analysis, so the run stops at once instead of after the current analysis."""


def _raise_interrupted(signum: int, _frame: Any) -> None:
    raise Interrupted(signal.Signals(signum).name)


def _interrupted(e: BaseException) -> str | None:
    """The signal that stopped the run, if ``e`` is how it surfaced: the KeyboardInterrupt itself, or the
    ``sys.exit(1)`` Lightning turns it into after its graceful shutdown."""
    seen: BaseException | None = e
    while seen is not None:
        if isinstance(seen, KeyboardInterrupt):
            return str(seen) if isinstance(seen, Interrupted) else "SIGINT"
        seen = seen.__context__
    return None


def _stopped(sig: str, out_dir: Path) -> str:
    """The one line that says a run was interrupted, where its last checkpoint is and how to resume."""
    last = out_dir / "checkpoints" / "last.ckpt"
    where = (f"the last checkpoint, of the last finished epoch, is {last}; resume with ckpt_path={last}"
             if last.exists() else "no epoch finished, so there is no checkpoint to resume from")
    return f"interrupted by {sig}: {where}; analysis records up to the last analysed epoch are in {out_dir}"


def run_task(task: Callable[[DictConfig], dict], cfg: DictConfig) -> float | None:
    """Run ``task(cfg)``; turn user-facing errors into one-line messages and always close the W&B run.

    In a ``-m`` sweep a failing job is logged, marked with a ``FAILED`` file in its directory and the sweep
    goes on; a single run exits with status 2 (bad config or input) or 1 (diverged, disk full, or a bug,
    which keeps its traceback). SIGTERM and Ctrl-C stop the run (a sweep too) where it is, with one line naming
    the last checkpoint, a ``FAILED`` file, and the shell's exit status for the signal (143, 130). Either way
    the job's ``report.html`` is rewritten last, with its final metrics or the reason it stopped.
    """
    global _IN_TASK
    multirun = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    out_dir = Path(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized() else Path.cwd()
    _IN_TASK = True
    main_thread = threading.current_thread() is threading.main_thread()  # where signal handlers can be set
    previous = signal.signal(signal.SIGTERM, _raise_interrupted) if main_thread else None
    try:
        apply_extras(cfg)
        metrics = task(cfg)
        value = metrics.get(cfg.get("optimized_metric", ""))
        return float(value) if value is not None else None
    except (KeyboardInterrupt, SystemExit) as e:
        sig = _interrupted(e)
        if sig is None:
            raise
        message = _stopped(sig, out_dir)
        with contextlib.suppress(OSError):
            (out_dir / "FAILED").write_text(f"Interrupted: {message}\n")
        log.error(message)
        print(f"featurelens: {message}", file=sys.stderr)
        sys.exit(128 + signal.Signals[sig].value)
    except Exception as e:
        known = user_error(e)
        message = f"{type(known).__name__}: {_one_line(str(known))}\n" if known else traceback.format_exc()
        with contextlib.suppress(OSError):  # the disk may be full
            (out_dir / "FAILED").write_text(message)
        if multirun:
            log.error("job %s failed: %s; the sweep continues", out_dir.name, message.strip().splitlines()[-1])
            return None
        if known is None:
            raise
        print(f"featurelens: error: {_one_line(str(known))}", file=sys.stderr)
        sys.exit(2 if isinstance(known, ConfigError) else 1)
    finally:
        _IN_TASK = False
        if rank_zero_only.rank == 0:  # the report page with the final metrics or the reason it failed
            with contextlib.suppress(OSError):
                write_run_report(out_dir)
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
        if "wandb" in sys.modules:
            import wandb

            if wandb.run is not None:
                wandb.finish()


def _hydra_message(e: Exception) -> str:
    """Hydra's message for a config it could not compose, on one line: a list under a heading ending in ":"
    (e.g. the available options of a group) joined by commas, the config search path left out, and an
    OmegaConf cause's first line appended."""
    parts: list[str] = []
    in_list = False
    for line in (raw.strip() for raw in str(e).split("Config search path", 1)[0].splitlines()):
        if not line:
            in_list = False
        elif in_list:
            parts[-1] += (" " if parts[-1].endswith(":") else ", ") + line
        else:
            parts.append(line)
            in_list = line.endswith(":")
    if isinstance(e, OverrideParseException):
        parts.insert(0, f"{e.override}:")
    cause = e.__cause__
    if isinstance(cause, OmegaConfBaseException) and str(cause).strip():
        parts.append(f"({str(cause).strip().splitlines()[0]})")
    return " ".join(parts)


def entry_point(task: Callable[[DictConfig], dict], config_name: str) -> Callable[[], float | None]:
    """The command-line entry of ``task``: Hydra's main over ``conf/<config_name>.yaml``, with every config
    Hydra cannot compose (unknown option or key, bad override syntax) reported as one line, exit code 2."""

    @hydra.main(version_base="1.3", config_path=CONF_DIR, config_name=config_name)
    def hydra_main(cfg: DictConfig) -> float | None:
        return run_task(task, cfg)

    def report(func: Callable[[], Any]) -> Any:
        try:
            return func()
        except (HydraException, OmegaConfBaseException) as e:
            if _IN_TASK or os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            print(f"featurelens: error: {_hydra_message(e)}", file=sys.stderr)
            sys.exit(2)

    @functools.wraps(hydra_main)
    def main() -> float | None:
        original = hydra_utils.run_and_report
        hydra_utils.run_and_report = lambda func: original(lambda: report(func))
        try:
            return hydra_main()
        finally:
            hydra_utils.run_and_report = original

    return main
