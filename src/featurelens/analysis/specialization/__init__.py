"""Local specialization (Hod, Filan, Casper et al. 2022; ``shared/spec/specialization.md``).

``measure``: the weight and activation graphs, spectral partitions, n-cut, shuffles and the statistics of
the papers (plain numpy/scipy/torch); ``method``: the registered analysis :class:`Specialization`;
``report``: its files and figures. Lesions and dataset coherence are in ``featurelens.analysis.importance``,
feature visualisation in ``featurelens.analysis.featvis``.
"""

from featurelens.analysis.specialization.measure import *  # noqa: F403  (the method's building blocks)
from featurelens.analysis.specialization.measure import __all__ as _measure_all
from featurelens.analysis.specialization.method import Specialization, SpecializationConfig, SpecializationResult

__all__ = ["Specialization", "SpecializationConfig", "SpecializationResult", *_measure_all]
