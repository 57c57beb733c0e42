"""A fitted detector you can keep: one scoring module, its safetensors + JSON file, an sklearn-like API.

The API (:class:`GaussianDetector`, :func:`merge`) and the run glue are imported on first use, so that
scoring with the model alone (``anomaly predict``) does not import scikit-learn.
"""

from importlib import import_module
from typing import TYPE_CHECKING

from anomaly.detector.file import DETECTOR_FILE, METADATA_FILE, read_detector, write_detector
from anomaly.detector.io import load_model, save_model
from anomaly.detector.model import DetectorModel, GaussianDetectorModel

if TYPE_CHECKING:  # for type checkers and editors; at run time, on first use (below)
    from anomaly.detector.api import GaussianDetector, merge
    from anomaly.detector.run import save_run_detector

_ON_FIRST_USE = {
    "GaussianDetector": "anomaly.detector.api",
    "merge": "anomaly.detector.api",
    "save_run_detector": "anomaly.detector.run",
}


def __getattr__(name: str):
    if name in _ON_FIRST_USE:
        return getattr(import_module(_ON_FIRST_USE[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
