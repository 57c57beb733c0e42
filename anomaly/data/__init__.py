"""Datasets, folds, augmentation and the shared data modules."""

from anomaly.data.datamodule import AnomalyDataModule
from anomaly.data.datasets import ImageDataset, Sample
from anomaly.data.mvtec import MVTEC_CATEGORIES, MVTecDataModule

__all__ = ["MVTEC_CATEGORIES", "AnomalyDataModule", "ImageDataset", "MVTecDataModule", "Sample"]
