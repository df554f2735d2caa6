"""Generators of the linking analysis (linking spec §6): the protocol, the default cVAE, the StyleGAN-XL adapter
and the test generators. ``load_generator`` builds one from the ``generator`` config group."""

from featurelens.models.generators.base import PART_NAMES, Generator
from featurelens.models.generators.store import GENERATORS, load_generator

__all__ = ["GENERATORS", "PART_NAMES", "Generator", "load_generator"]
