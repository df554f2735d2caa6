"""The one shape every analysis has, without Lightning, Hydra or W&B.

An analysis is a subclass of :class:`Analysis`, registered with :func:`register`:

- ``Config``: a dataclass, the single source of the analysis' parameters, their defaults and their checks
  (``__post_init__`` raises :class:`~featurelens.errors.ConfigError` naming the key); ``featurelens.runtime``
  registers it in Hydra's ConfigStore, so ``analysis=<name>`` composes it and ``--cfg job`` shows it;
- ``prepare(data)``: slow set-up done once before training (optional);
- ``run(model, data, epoch=, shard=, final=)``: the whole method, returning a :class:`Result`; it keeps what
  the next epoch needs (e.g. the previous sets) in ``state_dict()``, which the training callback checkpoints;
- ``report(result, out_dir, final=, history=)``: writes its figures and files and returns a :class:`Report` of
  what a logger can show too (``history``: the run's records so far, this one last, for figures over epochs);
- ``summarize(history)``: end-of-run scalars from the records (optional);
- ``tables(jobs, grouped_by, out)``: the sweep tables ``scripts/make_tables.py`` writes from the jobs' records.

``data`` is anything with ``batches(split, batch_size=None, shard=(0, 1), n_per_class=None, seed=0)`` yielding
``(images, labels)`` batches of the model's inputs (``split="train"``: the training images without
augmentation, up to ``n_per_class`` of each class; ``"val"``: the images it scores) and ``probe_set(n, seed)``
returning a fixed ``(images, labels)`` tensor pair of up to ``n`` validation images; analyses that feed images
of their own (dissection's concept set) read ``normalisation()``, ``input_size`` and ``channels`` through
:func:`model_input`.
``featurelens.data.ImageDataModule`` is one; :class:`Loaders` makes one of plain iterables (a notebook's
DataLoaders).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from featurelens.errors import ConfigError

log = logging.getLogger("featurelens")


class Data(Protocol):
    def batches(self, split: str, batch_size: int | None = None, shard: tuple[int, int] = (0, 1),
                n_per_class: int | None = None, seed: int = 0) -> Iterable[tuple[torch.Tensor, torch.Tensor]]: ...

    def probe_set(self, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]: ...


def model_device(model: nn.Module) -> torch.device:
    """Where ``model`` computes: its first parameter's (or buffer's) device; CPU for a model without either."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


@contextlib.contextmanager
def timed(what: str) -> Iterator[None]:
    """Log ``what`` when it starts and, with its time, when it ends: an analysis' long steps (no bar of their
    own) say what they are doing, so a run is never silent for minutes."""
    log.info("%s ...", what)
    start = time.perf_counter()
    yield
    log.info("%s: done in %.1f s", what, time.perf_counter() - start)


IMAGENET_NORMALISATION = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])


def model_input(data: Any, device: torch.device | str = "cpu") -> Callable[[torch.Tensor], torch.Tensor]:
    """[0, 1] RGB images (a concept set, generated images) -> the model's input: its channel count (grey by the
    ITU-R 601 weights), its input width (``data.input_size``; None: as given) and ``data.normalisation()``."""
    mean, std = (torch.tensor(v, device=device).view(1, -1, 1, 1) for v in data.normalisation())
    size, channels = getattr(data, "input_size", None), getattr(data, "channels", 3)

    def prep(x: torch.Tensor) -> torch.Tensor:
        x = x.to(device)
        if channels == 1 and x.shape[1] == 3:
            x = 0.299 * x[:, :1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]
        if size is not None and (x.shape[-1] != size or x.shape[-2] != size):
            x = F.interpolate(x, size=(int(size), int(size)), mode="bilinear", align_corners=False, antialias=True)
        return (x - mean) / std

    return prep


@dataclass
class Loaders:
    """Plain iterables of ``(images, labels)`` batches as an analysis' data: ``train`` for what it selects or
    fits on, ``val`` for what it scores (default: ``train``). Images are the model's inputs (already resized and
    normalised); images an analysis brings itself (dissection's concept set) are resized to ``input_size`` (None:
    kept) and normalised with ``mean``/``std`` (default: ImageNet's, as torchvision's pretrained models expect).
    ``n_per_class`` keeps the first images of each class in the iterable's order, and the probe set is the first
    ``n`` images of ``val`` (``seed`` is not used); batch size and order are the iterables' own, and one process
    reads everything (``shard`` ignored)."""

    train: Iterable | None = None
    val: Iterable | None = None
    mean: list[float] | None = None
    std: list[float] | None = None
    input_size: int | None = None
    channels: int = 3
    class_names: list[str] | None = None  # shown in figures and tables where given

    def normalisation(self) -> tuple[list[float], list[float]]:
        mean, std = IMAGENET_NORMALISATION
        return list(self.mean or mean), list(self.std or std)

    def batches(self, split: str, batch_size: int | None = None, shard: tuple[int, int] = (0, 1),
                n_per_class: int | None = None, seed: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if split not in ("train", "val"):
            raise ValueError(f"split={split!r}; valid: ['train', 'val']")
        source = self.val if split == "val" and self.val is not None else self.train
        if source is None:
            raise ConfigError("this analysis reads (images, labels) batches: give train= (and optionally val=)")
        seen: dict[int, int] = {}
        for x, y in source:
            y = torch.as_tensor(y)
            if n_per_class is not None:
                keep = torch.zeros(len(y), dtype=torch.bool)
                for i, c in enumerate(y.tolist()):
                    keep[i] = seen.get(c, 0) < n_per_class
                    seen[c] = seen.get(c, 0) + int(keep[i])
                if not keep.any():
                    continue
                x, y = x[keep], y[keep]
            yield x, y

    def probe_set(self, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys, have = [], [], 0
        for x, y in self.batches("val"):
            xs.append(x[: n - have])
            ys.append(y[: n - have])
            have += len(xs[-1])
            if have >= n:
                break
        if not xs:
            raise ValueError("the probe set needs at least one (images, labels) batch")
        return torch.cat(xs), torch.cat(ys)


@dataclass
class Report:
    """What of :meth:`Analysis.report`'s output a logger may show as well: the tables (name -> (columns, rows)),
    figures (name -> png path), galleries (name -> images, each captioned by its file name) and histograms
    (name -> (counts, bin edges))."""

    tables: dict[str, tuple[list[str], list[list[Any]]]] = field(default_factory=dict)
    figures: dict[str, Path] = field(default_factory=dict)
    galleries: dict[str, list[Path]] = field(default_factory=dict)
    histograms: dict[str, tuple[Any, Any]] = field(default_factory=dict)


@dataclass
class Result:
    """One analysed epoch: ``values`` holds every number (floats are the logged scalars) and list the method
    produced, under the keys the results file stores them by (``<name>/<key>``)."""

    name: ClassVar[str] = "analysis"
    epoch: int
    values: dict[str, Any]

    def scalars(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.values.items() if isinstance(v, int | float) and not isinstance(v, bool)}

    def record(self) -> dict[str, Any]:
        """The epoch and the values as the results file and the loggers name them: ``<analysis>/<key>``."""
        return {"epoch": self.epoch, **{f"{self.name}/{k}": v for k, v in self.values.items()}}

    def to_frame(self):
        """The scalars as a one-row ``pandas.DataFrame`` (analyses with a main table return that instead)."""
        import pandas as pd

        return pd.DataFrame([{"epoch": self.epoch, **self.scalars()}])


class Analysis:
    """Base class of the registered analyses; see the module docstring."""

    name: ClassVar[str] = "analysis"
    Config: ClassVar[type] = object
    #: the keys of the result values that the per-epoch log line shows; in W&B they form the ``<name>`` section,
    #: the other scalars the ``<name>_detail`` one
    headline: ClassVar[tuple[str, ...]] = ()
    #: scalar keys (fnmatch patterns) that describe the setup and never change over epochs (e.g. a feature
    #: dimension): the loggers get them as config (hyperparameters), not as series
    constants: ClassVar[tuple[str, ...]] = ()
    #: True: every rank runs on its shard of the data and the torchmetrics states are summed across ranks;
    #: False: the values depend only on the weights, so rank 0 runs it alone
    sharded: ClassVar[bool] = False
    #: the training schedule's default: every n-th epoch (None: epoch 0 and the last epoch only)
    every_n_epochs: ClassVar[int | None] = 1
    #: Config fields whose default differs under Hydra (an interpolation of the composed config)
    hydra_defaults: ClassVar[dict[str, str]] = {}

    def __init__(self, config: Any = None, **params: Any):
        if config is not None and params:
            raise TypeError("give a config or keyword parameters, not both")
        self.config = config if config is not None else self.Config(**params)

    def prepare(self, data: Data) -> None:
        """Whatever slow set-up the analysis needs, done before training starts, outside any process group
        (the linking cVAE, trained and cached once per data config); a no-op by default."""

    def run(self, model: nn.Module, data: Data, *, epoch: int = 0, shard: tuple[int, int] = (0, 1),
            final: bool = True) -> Result:
        """The method on ``model`` at ``epoch`` (``final``: the run's last analysed epoch)."""
        raise NotImplementedError

    def report(self, result: Result, out_dir: Path, *, final: bool = True, history: list[dict] | None = None
               ) -> Report:
        return Report()

    def summarize(self, history: list[dict[str, Any]]) -> dict[str, float]:
        """End-of-run scalars from the run's records (``<name>/summary/<key>``)."""
        return {}

    @staticmethod
    def tables(jobs: list[Any], grouped_by: Callable[..., str], out: Path) -> list[Path]:
        """The sweep tables from ``jobs`` (the finished jobs with this analysis' records, as
        :class:`featurelens.tables.SweepJob`; ``grouped_by(columns, shown=())`` says in words what the rows
        are grouped by); returns the files written."""
        return []

    def state_dict(self) -> dict[str, Any]:
        """What the next epoch's ``run`` needs from this one (checkpointed with the training run)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (a resumed run)."""


REGISTRY: dict[str, type[Analysis]] = {}


def register(cls: type[Analysis]) -> type[Analysis]:
    """Class decorator: make ``cls`` available as ``analysis=<cls.name>`` and ``featurelens.run(cls.name, …)``."""
    if not (dataclasses.is_dataclass(cls.Config) and isinstance(cls.Config, type)):
        raise TypeError(f"{cls.__name__}.Config must be a dataclass")
    REGISTRY[cls.name] = cls
    return cls


def get(name: str) -> type[Analysis]:
    """The registered analysis called ``name``; a :class:`ConfigError` lists the valid names otherwise."""
    if name not in REGISTRY:
        raise ConfigError(f"analysis {name!r} is not registered; valid: {sorted(REGISTRY)}")
    return REGISTRY[name]
