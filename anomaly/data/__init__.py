"""Datasets, folds, augmentation and the shared data modules.

The data modules (and Lightning with them) are imported on first use, so that scoring with a saved
detector (``anomaly predict``, the Python API), which reads images but trains nothing, does not
spend seconds and a quarter of a gigabyte importing Lightning.
"""

from importlib import import_module
from typing import TYPE_CHECKING

from anomaly.data.datasets import ImageDataset, Sample

if TYPE_CHECKING:  # for type checkers and editors; at run time, on first use (below)
    from anomaly.data.datamodule import AnomalyDataModule
    from anomaly.data.mvtec import MVTEC_CATEGORIES, MVTecDataModule

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
