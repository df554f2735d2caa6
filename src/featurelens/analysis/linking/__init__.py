"""Linking classifier features to a generator (Wehrheim et al. 2024; ``shared/spec/linking.md``).

``measure``: the linear map, the pairs, the unit sweeps and part measures, the counterfactuals (plain torch);
``method``: the registered analysis :class:`Linking` (its config, its run, its typed result); ``report``: its
files and figures.
"""

from featurelens.analysis.linking.measure import *  # noqa: F403  (the method's building blocks)
from featurelens.analysis.linking.measure import __all__ as _measure_all
from featurelens.analysis.linking.method import Linking, LinkingConfig, LinkingResult

__all__ = ["Linking", "LinkingConfig", "LinkingResult", *_measure_all]
