"""Datasets: the LightningDataModule and the procedural shapes renderer."""

from featurelens.data.datamodule import DATASETS, ImageDataModule

__all__ = ["DATASETS", "ImageDataModule"]
