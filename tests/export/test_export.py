"""ONNX and TorchScript exports of the whole detector match PyTorch on real images."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from anomaly.detector.inputs import image_batch
from anomaly.export import ExportedDetector, export_onnx, export_torchscript
from tests.detector.helpers import LEVELS, demo_images, fit_demo_detector

ort = pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def detector():
    return fit_demo_detector()


@pytest.fixture(scope="module")
def images(detector) -> torch.Tensor:
    _, good, bad = demo_images()
    return image_batch(good[:2] + bad[:3], detector.image_size_)  # 5 images: not the traced batch size


def reference(detector, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    columns = detector.model_.score_images(images)
    levels = np.stack([columns[f"mahalanobis/{level}"].numpy() for level in LEVELS], axis=1)
    return columns["mahalanobis/sum"].numpy(), levels


def test_onnx_matches_pytorch_on_real_images(detector, images, tmp_path: Path):
    path = export_onnx(detector, tmp_path / "detector.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    score, level_scores = session.run(None, {"images": images.numpy()})
    expected_score, expected_levels = reference(detector, images)
    np.testing.assert_allclose(score, expected_score, rtol=1e-4)
    np.testing.assert_allclose(level_scores, expected_levels, rtol=1e-4)
    meta = json.loads(session.get_modelmeta().custom_metadata_map["detector"])
    assert meta["threshold"] == detector.threshold_ and meta["levels"] == list(LEVELS)
    # the SAME padding is fixed at the detector's input size: other sizes are refused
    with pytest.raises(Exception, match="images"):
        session.run(None, {"images": np.zeros((1, 3, 200, 200), np.uint8)})


def test_a_dense_precision_exports_and_scores_as_its_low_rank_form(detector, images, tmp_path: Path):
    """The demo detector's levels saw fewer images than dimensions (the low-rank form); the same
    precisions as D x D matrices (a level that saw more) export and score alike."""
    assert all(scorer.low_rank is not None for scorer in detector.model_.scorers)
    dense = copy.deepcopy(detector)
    for scorer in dense.model_.scorers:
        scorer.set_precision(scorer.precision_matrix())
    assert all(scorer.low_rank is None for scorer in dense.model_.scorers)
    expected_score, expected_levels = reference(detector, images)
    np.testing.assert_allclose(reference(dense, images)[0], expected_score, rtol=1e-9)
    session = ort.InferenceSession(
        str(export_onnx(dense, tmp_path / "dense.onnx")), providers=["CPUExecutionProvider"]
    )
    score, level_scores = session.run(None, {"images": images.numpy()})
    np.testing.assert_allclose(score, expected_score, rtol=1e-4)
    np.testing.assert_allclose(level_scores, expected_levels, rtol=1e-4)


def test_onnx_float_input(detector, images, tmp_path: Path):
    path = export_onnx(detector, tmp_path / "float.onnx", input_dtype="float")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (score, _) = session.run(None, {"images": (images.float() / 255).numpy()})
    np.testing.assert_allclose(score, reference(detector, images)[0], rtol=1e-4)


def test_torchscript_matches_pytorch(detector, images, tmp_path: Path):
    path = export_torchscript(detector, tmp_path / "detector.pt")
    extra = {"detector.json": ""}
    module = torch.jit.load(str(path), _extra_files=extra)
    score, level_scores = module(images)
    expected_score, expected_levels = reference(detector, images)
    # float32 rounding apart: the traced graph convolves channels-first, the CPU's eager pass channels-last
    np.testing.assert_allclose(score.numpy(), expected_score, rtol=1e-5)
    np.testing.assert_allclose(level_scores.numpy(), expected_levels, rtol=1e-5)
    assert json.loads(extra["detector.json"])["decision_score"] == "mahalanobis/sum"


def test_single_level_decision_and_every_score_kind(detector):
    detector = copy.copy(detector)
    detector.decision_score_ = "mahalanobis/4"
    _, good, _ = demo_images()
    images = image_batch(good[:2], detector.image_size_)
    score, level_scores = ExportedDetector(detector)(images)
    np.testing.assert_allclose(score.numpy(), detector.decision_function(good[:2]), rtol=1e-9)
    assert level_scores.shape == (2, len(LEVELS))
    detector.decision_score_ = "sed/sum"  # the export runs the detector's own forward: every kind exports
    score, _ = ExportedDetector(detector)(images)
    np.testing.assert_allclose(score.numpy(), detector.decision_function(good[:2]), rtol=1e-9)
