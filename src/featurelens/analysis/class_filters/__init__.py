"""Class-specific filters and the decomposed final layer (Badola et al. 2022; ``shared/spec/class_filters.md``).

``stats``: the statistics and selections (plain torch + torchmetrics); ``method``: the registered analysis
:class:`ClassFilters` (its config, its run, its typed result); ``report``: its files, figures and sweep tables.
"""

from featurelens.analysis.class_filters.method import (
    ClassFilters,
    ClassFiltersConfig,
    ClassFiltersResult,
    FinetuneConfig,
    MaskedLinear,
    decomposed_model,
)
from featurelens.analysis.class_filters.stats import *  # noqa: F403  (the method's building blocks)
from featurelens.analysis.class_filters.stats import __all__ as _stats_all

__all__ = ["ClassFilters", "ClassFiltersConfig", "ClassFiltersResult", "FinetuneConfig", "MaskedLinear",
           "decomposed_model", *_stats_all]
