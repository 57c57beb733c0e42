"""Small fitted detectors on the embedded demo images (real photographs, offline)."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest

from anomaly.data.demo import ensure_demo_dataset
from anomaly.data.images import list_images
from anomaly.detector import GaussianDetector

LEVELS = (2, 4)  # shallow levels: only the first stages of the backbone run


def demo_images() -> tuple[list[Path], list[Path], list[Path]]:
    """(12 normal training images, 4 normal test images, 4 anomalous test images)."""
    root = ensure_demo_dataset() / "demo"
    train = list_images(root / "train" / "good")[:12]
    good = list_images(root / "test" / "good")[:4]
    bad = list_images(root / "test" / "scratch")[:2] + list_images(root / "test" / "stain")[:2]
    return train, good, bad


def fit_demo_detector(**kwargs) -> GaussianDetector:
    """A detector fitted on the 12 demo training images (the default one is fitted once per session:
    do not modify it, copy it)."""
    if not kwargs:
        return _default_detector()
    train, _, _ = demo_images()
    kwargs = {"pooling": "global", **kwargs}  # the paper's pooling unless a test names another
    return GaussianDetector(backbone="efficientnet-lite0", levels=LEVELS, batch_size=8, **kwargs).fit(train)


@functools.cache
def _default_detector() -> GaussianDetector:
    train, _, _ = demo_images()
    detector = GaussianDetector(backbone="efficientnet-lite0", levels=LEVELS, pooling="global", batch_size=8)
    return detector.fit(train)


def onnx_outputs_match_pytorch(detector: GaussianDetector, images, path: Path) -> tuple:
    """Export ``detector`` to ONNX at ``path``, run it on ``images`` and assert that its score and map
    equal the PyTorch model's (rtol 1e-4); return the session and its outputs (score, levels, maps)."""
    ort = pytest.importorskip("onnxruntime")
    from anomaly.export import export_onnx

    session = ort.InferenceSession(str(export_onnx(detector, path)), providers=["CPUExecutionProvider"])
    outputs = session.run(None, {"images": images.numpy()})
    columns, maps = detector.model_(images)
    np.testing.assert_allclose(outputs[0], columns["mahalanobis/sum"].numpy(), rtol=1e-4)
    np.testing.assert_allclose(outputs[2], maps.numpy(), rtol=1e-4)
    return session, outputs
