"""Datasets, folds, augmentation and the shared data modules.

The data modules (and Lightning with them) are imported on first use, so that scoring with a saved
detector (``anomaly predict``, the Python API), which reads images but trains nothing, does not
spend seconds and a quarter of a gigabyte importing Lightning.
"""

from anomaly.data.datasets import ImageDataset, Sample
from anomaly.lazy import imported_on_first_use

__getattr__ = imported_on_first_use(
    __name__,
    {
        "AnomalyDataModule": "anomaly.data.datamodule",
        "MVTEC_CATEGORIES": "anomaly.data.mvtec",
        "MVTecDataModule": "anomaly.data.mvtec",
    },
)


__all__ = ["MVTEC_CATEGORIES", "AnomalyDataModule", "ImageDataset", "MVTecDataModule", "Sample"]
