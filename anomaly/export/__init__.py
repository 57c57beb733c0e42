"""Exporting a fitted detector (backbone + pooling + Gaussian scoring) to ONNX and TorchScript."""

from anomaly.export.module import ExportedDetector
from anomaly.export.onnx import export_onnx
from anomaly.export.torchscript import export_torchscript

__all__ = ["ExportedDetector", "export_onnx", "export_torchscript"]
