"""Model builders and weight initialisations."""

from featurelens.models.builders import ARCHS, build_model
from featurelens.models.init import INIT_METHODS, init_weights

__all__ = ["ARCHS", "INIT_METHODS", "build_model", "init_weights"]
