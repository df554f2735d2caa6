"""Lightning callbacks that run the analyses in ``featurelens.analysis``: the generic one for registered
analyses, and the subclasses of those not yet registered."""

from featurelens.callbacks.base import AnalysisCallback, AnalysisContext

__all__ = ["AnalysisCallback", "AnalysisContext"]
