"""A fitted detector you can keep: save/load (safetensors + JSON), score new images, scikit-learn-like API."""

from anomaly.detector.api import GaussianDetector
from anomaly.detector.file import DETECTOR_FILE, METADATA_FILE, read_detector, write_detector
from anomaly.detector.model import DetectorModel
from anomaly.detector.run import save_run_detector

__all__ = [
    "DETECTOR_FILE",
    "METADATA_FILE",
    "DetectorModel",
    "GaussianDetector",
    "read_detector",
    "save_run_detector",
    "write_detector",
]
