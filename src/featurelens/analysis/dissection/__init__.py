"""Network dissection (Bau et al. 2017; ``shared/spec/dissection.md``).

``measure``: the streaming thresholds, tallies, IoUs, unit labels and baselines (plain torch + torchmetrics);
``method``: the registered analysis :class:`Dissection` (its config, its run over a concept set, its typed
result); ``report``: its files and figures.
"""

from featurelens.analysis.dissection.measure import *  # noqa: F403  (the method's building blocks)
from featurelens.analysis.dissection.measure import __all__ as _measure_all
from featurelens.analysis.dissection.method import Dissection, DissectionConfig, DissectionResult

__all__ = ["Dissection", "DissectionConfig", "DissectionResult", *_measure_all]
