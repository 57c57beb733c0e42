"""Pooling grid_maps end to end: the run's detector file reloads, predicts maps and exports them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from anomaly.detector import GaussianDetector
from anomaly.detector.inputs import image_batch
from predict import main as predict_main
from tests.conftest import FEW_HELD_OUT
from tests.detector.helpers import onnx_outputs_match_pytorch
from tests.detector.test_model import fit_run

GRID_MAPS = ["--model.pooling", "grid_maps"]


@pytest.mark.slow
@FEW_HELD_OUT
def test_grid_maps_detector_reloads_and_exports_scores_and_maps(tiny_mvtec: Path, tmp_path: Path):
    run_dir = fit_run(tmp_path / "runs", tiny_mvtec, *GRID_MAPS)
    meta = json.loads((run_dir / "detector.json").read_text())
    assert meta["pooling"] == {"name": "grid_maps", "grid_size": 2}
    detector = GaussianDetector.load(run_dir)
    paths = sorted((tiny_mvtec / "widget" / "test").rglob("*.png"))[:3]
    images = image_batch(paths, detector.image_size_)
    columns, maps = detector.model_(images)
    assert maps.shape == (3, 2, 2)
    assert bool((maps >= 0).all()) and bool(maps.flatten(1).std(dim=1).gt(0).all())
    np.testing.assert_allclose(detector.anomaly_maps(paths), maps, rtol=1e-6)

    # predict --maps writes one raw map per image
    out, maps_dir = tmp_path / "predicted.csv", tmp_path / "maps"
    listed = tmp_path / "inputs"
    listed.mkdir()
    for i, path in enumerate(paths):
        shutil.copy(path, listed / f"{i:03d}_{path.name}")
    args = ["--detector", str(run_dir), "--input", str(listed), "--out", str(out), "--maps", str(maps_dir)]
    assert predict_main([*args, "--batch-size", "8", "--no-progress"]) == 0
    assert len(list(maps_dir.glob("*.npy"))) == 3

    from anomaly.export import export_torchscript

    scripted = torch.jit.load(str(export_torchscript(detector, tmp_path / "d.pt")))
    ts_score, _, ts_maps = scripted(images)
    np.testing.assert_allclose(ts_score, columns["mahalanobis/sum"], rtol=1e-4)
    np.testing.assert_allclose(ts_maps, maps, rtol=1e-4)

    _, (_, level_scores, _) = onnx_outputs_match_pytorch(detector, images, tmp_path / "d.onnx")
    assert level_scores.shape == (3, 2)


@pytest.mark.parametrize(
    "options",
    [
        {"fine_levels": [4], "fine_grid_size": 4},
        # level 4 global for the image score, its 4x4 cells in the map beside level 2's 3x3 ones
        {"coarse_levels": [4], "fine_levels": [2, 4], "fine_grid_size": [3, 4]},
    ],
)
def test_fine_levels_save_load_and_export_their_finer_maps(options: dict, tmp_path: Path):
    from anomaly.detector.inputs import image_batch
    from anomaly.export import export_torchscript
    from anomaly.pooling import GridMaps
    from tests.detector.helpers import demo_images, fit_demo_detector

    pooling = GridMaps(2, fine_weight=0.5, **options)
    detector = fit_demo_detector(pooling=pooling)
    _, good, bad = demo_images()
    images = image_batch(good[:2] + bad[:2], detector.image_size_)
    columns, maps = detector.model_(images)
    assert maps.shape == (4, 4, 4)
    loaded = GaussianDetector.load(detector.save(tmp_path / "fine.safetensors"))
    # the file's JSON lists give back the pooling built from lists: an equal, hashable value
    assert loaded.model_.pooling == pooling and hash(loaded.model_.pooling) == hash(pooling)
    assert {pooling: "fitted"}[loaded.model_.pooling] == "fitted"
    again, loaded_maps = loaded.model_(images)
    np.testing.assert_allclose(loaded_maps, maps, rtol=1e-10)
    np.testing.assert_allclose(again["mahalanobis/sum"], columns["mahalanobis/sum"], rtol=1e-10)

    scripted = torch.jit.load(str(export_torchscript(detector, tmp_path / "d.pt")))
    ts_score, _, ts_maps = scripted(images)
    np.testing.assert_allclose(ts_score, columns["mahalanobis/sum"], rtol=1e-4)
    np.testing.assert_allclose(ts_maps, maps, rtol=1e-4)
    onnx_outputs_match_pytorch(detector, images, tmp_path / "d.onnx")
