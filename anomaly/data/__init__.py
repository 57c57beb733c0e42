"""Datasets, folds, augmentation and the shared data modules.

The data modules (and Lightning with them) are imported on first use, so that scoring with a saved
detector (``anomaly predict``, the Python API), which reads images but trains nothing, does not
spend seconds and a quarter of a gigabyte importing Lightning.
"""

from importlib import import_module

from anomaly.data.datasets import ImageDataset, Sample

_DATA_MODULES = {
    "AnomalyDataModule": "anomaly.data.datamodule",
    "MVTEC_CATEGORIES": "anomaly.data.mvtec",
    "MVTecDataModule": "anomaly.data.mvtec",
}


def __getattr__(name: str):
    if name in _DATA_MODULES:
        return getattr(import_module(_DATA_MODULES[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["MVTEC_CATEGORIES", "AnomalyDataModule", "ImageDataset", "MVTecDataModule", "Sample"]
