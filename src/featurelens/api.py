"""featurelens as a library: a registered analysis on any ``nn.Module`` and any data, without Hydra, Lightning
or W&B (a notebook, a script)::

    import featurelens
    result = featurelens.run("class_filters", model, train=train_loader, val=val_loader, k=5)
    result.values["acc_decomposed"], result.sets, result.to_frame()

``train``/``val`` are iterables of ``(images, labels)`` batches of the model's inputs (see
:class:`featurelens.analysis.base.Loaders`); ``data=`` takes an object with ``batches(...)`` instead, e.g. a
``featurelens.data.ImageDataModule``. Keyword parameters are the analysis' ``Config`` fields.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from torch import nn

import featurelens.analysis.chirality  # noqa: F401  (registers the analysis)
import featurelens.analysis.class_filters  # noqa: F401
import featurelens.analysis.dissection  # noqa: F401
import featurelens.analysis.linking  # noqa: F401
import featurelens.analysis.specialization  # noqa: F401
from featurelens.analysis.base import REGISTRY, Data, Loaders, Result, get
from featurelens.analysis.hooks import analysis_mode

__all__ = ["REGISTRY", "analyses", "get", "run"]


def analyses() -> list[str]:
    """The names of the registered analyses."""
    return sorted(REGISTRY)


def run(name: str, model: nn.Module, data: Data | None = None, *, train: Iterable | None = None,
        val: Iterable | None = None, broden: str | Path | None = None, mean: list[float] | None = None,
        std: list[float] | None = None, input_size: int | None = None, out_dir: str | Path | None = None,
        epoch: int = 0, **params: Any) -> Result:
    """Run analysis ``name`` once on ``model`` (in eval mode, without gradients; the model's own train/eval
    flags and the global RNG are as before afterwards) and return its typed result; with ``out_dir`` its
    report (files, figures) is written there too.

    ``broden``: a Broden-format directory (dissection's ``broden_dir``); ``mean``/``std``/``input_size``: how
    images the analysis brings itself (a concept set) become the model's input (default: ImageNet's
    normalisation, the images' own size)."""
    cls = get(name)
    if broden is not None:
        params["broden_dir"] = str(broden)
    if data is None:
        data = Loaders(train, val, mean, std, input_size)
    analysis = cls(**params)
    with analysis_mode(model):
        result = analysis.run(model, data, epoch=epoch)
        if out_dir is not None:
            analysis.report(result, Path(out_dir))
    return result
