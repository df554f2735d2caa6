"""Feature chirality (Ji et al. 2023; ``shared/spec/chirality.md``).

``measure``: kernel and feature-map chirality, the random-init baselines and the mirror-compatible widths
(plain torch); ``method``: the registered analysis :class:`Chirality` (its config, its run, its typed result);
``report``: its tables and figures.
"""

from featurelens.analysis.chirality.measure import *  # noqa: F403  (the measures)
from featurelens.analysis.chirality.measure import __all__ as _measure_all
from featurelens.analysis.chirality.method import Chirality, ChiralityConfig, ChiralityResult, FmapConfig

__all__ = ["Chirality", "ChiralityConfig", "ChiralityResult", "FmapConfig", *_measure_all]
