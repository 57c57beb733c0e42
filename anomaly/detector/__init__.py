"""A fitted detector you can keep: one scoring module, its safetensors + JSON file, an sklearn-like API."""

from anomaly.detector.api import GaussianDetector, merge
from anomaly.detector.file import DETECTOR_FILE, METADATA_FILE, read_detector, write_detector
from anomaly.detector.io import load_model, save_model
from anomaly.detector.model import DetectorModel, GaussianDetectorModel
from anomaly.detector.run import save_run_detector

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
