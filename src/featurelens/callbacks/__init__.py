"""The Lightning callback that schedules the registered analyses of ``featurelens.analysis`` in training."""

from featurelens.callbacks.base import AnalysisCallback

__all__ = ["AnalysisCallback"]
