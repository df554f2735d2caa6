"""Thin Lightning callbacks around the analyses in ``featurelens.analysis``."""

from featurelens.callbacks.base import AnalysisCallback, AnalysisContext
from featurelens.callbacks.chirality import ChiralityCallback

__all__ = ["AnalysisCallback", "AnalysisContext", "ChiralityCallback"]
