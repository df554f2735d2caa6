"""Model builders and weight initialisations."""

from featurelens.models.builders import ARCHS, build_model
from featurelens.models.init import INIT_METHODS, init_weights
from featurelens.models.names import display_name, paper_layer_names

__all__ = ["ARCHS", "INIT_METHODS", "build_model", "display_name", "init_weights", "paper_layer_names"]
