"""Thin Lightning callbacks around the analyses in ``featurelens.analysis``."""

from featurelens.callbacks.base import AnalysisCallback, AnalysisContext
from featurelens.callbacks.chirality import ChiralityCallback
from featurelens.callbacks.class_filters import ClassFiltersCallback

__all__ = ["AnalysisCallback", "AnalysisContext", "ChiralityCallback", "ClassFiltersCallback"]
