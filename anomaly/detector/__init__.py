"""A fitted detector you can keep: one scoring module, its safetensors + JSON file, an sklearn-like API.

The API (:class:`GaussianDetector`, :func:`merge`) and the run glue are imported on first use, so that
scoring with the model alone (``anomaly predict``) does not import scikit-learn.
"""

from anomaly.detector.file import DETECTOR_FILE, METADATA_FILE, read_detector, write_detector
from anomaly.detector.io import load_model, save_model
from anomaly.detector.model import DetectorModel, GaussianDetectorModel
from anomaly.lazy import imported_on_first_use

__getattr__ = imported_on_first_use(
    __name__,
    {
        "GaussianDetector": "anomaly.detector.api",
        "merge": "anomaly.detector.api",
        "save_run_detector": "anomaly.detector.run",
    },
)


__all__ = [
    "DETECTOR_FILE",
    "METADATA_FILE",
    "DetectorModel",
    "GaussianDetector",
    "GaussianDetectorModel",
    "load_model",
    "merge",
    "read_detector",
    "save_model",
    "save_run_detector",
    "write_detector",
]
