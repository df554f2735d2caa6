"""Thin Lightning callbacks around the analyses in ``featurelens.analysis``."""

from featurelens.callbacks.base import AnalysisCallback, AnalysisContext
from featurelens.callbacks.chirality import ChiralityCallback
from featurelens.callbacks.class_filters import ClassFiltersCallback
from featurelens.callbacks.dissection import DissectionCallback
from featurelens.callbacks.linking import LinkingCallback
from featurelens.callbacks.specialization import SpecializationCallback

__all__ = ["AnalysisCallback", "AnalysisContext", "ChiralityCallback", "ClassFiltersCallback", "DissectionCallback",
           "LinkingCallback", "SpecializationCallback"]
