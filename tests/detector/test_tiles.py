"""Tiles and fit rules through the one detector model: fit, score, save, load, predict, export."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from anomaly.backbones import build_backbone
from anomaly.cli import main as fit_main
from anomaly.data import MVTecDataModule
from anomaly.data.transforms import TileGrid
from anomaly.detector import GaussianDetector, read_detector
from anomaly.detector.file import tensors_sha256
from anomaly.detector.inputs import image_batch
from anomaly.detector.model import GaussianDetectorModel
from anomaly.errors import UserError
from anomaly.features import FeatureCache
from anomaly.methods.gaussian import GaussianAD
from anomaly.methods.ocsvm import OneClassSVMAD
from anomaly.pooling import Cells, Global
from predict import main as predict_main
from tests.conftest import DEFAULT_SWITCHES, FEW_HELD_OUT, fit_and_test, make_mvtec_category
from tests.detector.helpers import onnx_outputs_match_pytorch

pytestmark = [FEW_HELD_OUT, DEFAULT_SWITCHES]

FAST = ["--model.backbone", "efficientnet-lite0", "--data.num_workers", "0", "--data.batch_size", "8"]
SIZE = 32


@pytest.fixture
def strips(tmp_path: Path) -> Path:
    """A generated dataset of 24x72 images (3:1) with bright square defects and masks."""
    return make_mvtec_category(tmp_path / "strips", size=24, width=72)


def fit_cells(root: Path, runs: Path, *extra: str) -> Path:
    args = ["--data.root", str(root), "--data.category", "widget", "--config", "spatial_cells",
            "--trainer.default_root_dir", str(runs), "--trainer.enable_progress_bar", "false",
            "--model.levels", "[2, 4]", "--model.grid_size", "2", "--model.overlays", "2",
            "--data.image_size", str(SIZE), *extra]  # fmt: skip
    assert fit_main([*FAST, *args]) == 0
    (run_dir,) = {p.parent for p in runs.rglob("detector.safetensors")}
    return run_dir


def test_tiles_reduce_by_max_and_stitch_the_maps(strips: Path, tmp_path: Path):
    run_dir = fit_cells(strips, tmp_path / "runs", "--data.tiles", "1x3")
    assert "_tiles-1x3" in str(run_dir)
    detector = GaussianDetector.load(run_dir)
    model = detector.model_
    assert model.tiles == TileGrid(1, 3) and detector.metadata()["preprocessing"]["tiles"] == "1x3"
    paths = sorted((strips / "widget" / "test").rglob("*.png"))
    images = image_batch(paths, SIZE, model.geometry)
    assert tuple(images.shape) == (len(paths), 3, SIZE, 3 * SIZE)
    columns, maps = model(images)
    assert tuple(maps.shape) == (len(paths), 2, 6)  # three 2x2 tile maps side by side
    # by hand: every tile scored on its own through the same model, as one-tile images
    model.tiles = TileGrid()
    per_tile = [model(images[..., k * SIZE : (k + 1) * SIZE]) for k in range(3)]
    for name, values in columns.items():
        expected = torch.stack([tile_columns[name] for tile_columns, _ in per_tile], dim=1).amax(dim=1)
        torch.testing.assert_close(values, expected, rtol=1e-5, atol=1e-5)  # other batch shapes
    torch.testing.assert_close(maps, torch.cat([m for _, m in per_tile], dim=2), rtol=1e-5, atol=1e-5)


def test_a_tiled_padded_run_is_reproduced_by_its_file_predict_and_the_api(strips: Path, tmp_path: Path):
    run_dir = fit_cells(
        strips, tmp_path / "runs", "--data.tiles", "1x2", "--data.fit", "pad", "--figures", "false"
    )
    assert "_fit-pad_tiles-1x2" in str(run_dir)
    meta = json.loads((run_dir / "detector.json").read_text())
    assert meta["preprocessing"]["fit"] == "pad" and meta["preprocessing"]["tiles"] == "1x2"
    results = json.loads((run_dir / "results.json").read_text())
    assert results["image_auroc"] > 0.9 and results["pixel_auroc"] > 0.8
    with open(run_dir / "scores.csv") as file:
        rows = list(csv.DictReader(file))
    paths = [row["path"] for row in rows]
    detector = GaussianDetector.load(run_dir)
    np.testing.assert_allclose(
        detector.score_columns(paths)["mahalanobis/sum"],
        [float(r["mahalanobis_sum"]) for r in rows],
        rtol=1e-6,
    )
    assert detector.anomaly_maps(paths[:2]).shape == (2, 2, 4)
    out, maps = tmp_path / "predicted.csv", tmp_path / "maps"
    folder = Path(paths[0]).parent
    assert predict_main(["--detector", str(run_dir), "--input", str(folder), "--out", str(out),
                         "--maps", str(maps), "--no-progress"]) == 0  # fmt: skip
    with open(out) as file:
        predicted = {Path(r["path"]).name: r for r in csv.DictReader(file)}
    for row in rows:
        if Path(row["path"]).parent == folder:
            assert float(predicted[Path(row["path"]).name]["score"]) == pytest.approx(
                float(row["mahalanobis_sum"]), rel=1e-6
            )
    first = next(iter(predicted.values()))
    image_map = np.load(first["map_file"])
    assert image_map.shape == (24, 72) and np.isfinite(image_map).all()  # padding cut off again

    # a file written before fit rules and tiles existed (format 2) loads as stretch, one tile
    tensors, meta = read_detector(run_dir)
    del meta["preprocessing"]["fit"], meta["preprocessing"]["tiles"], meta["sha256"], meta["learning"]
    tensors = {name: value for name, value in tensors.items() if not name.startswith("moments.")}
    meta["version"] = 2
    meta["tensors_sha256"] = tensors_sha256(tensors)
    from safetensors.torch import save_file

    save_file(tensors, str(tmp_path / "old.safetensors"), metadata={"detector": json.dumps(meta)})
    old = GaussianDetector.load(tmp_path / "old.safetensors")
    assert (old.model_.fit, old.model_.tiles) == ("stretch", TileGrid())
    meta["preprocessing"]["tiles"] = "0x9"
    meta["tensors_sha256"] = tensors_sha256(tensors)
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata={"detector": json.dumps(meta)})
    with pytest.raises(UserError, match=r"preprocessing\.tiles"):
        GaussianDetector.load(tmp_path / "bad.safetensors")


def test_a_tiled_global_fit_streams_every_tile_and_saves_and_loads(strips: Path, tmp_path: Path):
    dm = MVTecDataModule(str(strips), "widget", batch_size=4, num_workers=0, image_size=SIZE, tiles="1x3")
    model = GaussianAD("efficientnet-lite0", levels=[2, 4], pretrained=False)
    fit_and_test(model, dm, tmp_path / "out")
    assert model.detector.fitted and model.detector.tiles == TileGrid(1, 3)
    from anomaly.detector.run import save_run_detector

    path = save_run_detector(model, SIZE, tmp_path / "run", dm.geometry)
    loaded = GaussianDetector.load(path)
    paths = [s.path for s in dm.test_samples]
    images = image_batch(paths, SIZE, dm.geometry)
    expected = model.detector(images)[0]
    for name, values in loaded.score_columns(paths).items():
        np.testing.assert_allclose(values, expected[name].numpy(), rtol=1e-6)
    # every tile is one sample of the streamed statistics: a fresh fit's moments count them
    fresh = GaussianAD("efficientnet-lite0", levels=[2], pretrained=False).detector
    fresh.tiles = TileGrid(1, 3)
    fresh.update(fresh.features(images[:2]))
    assert fresh.moments[0].moments().n == 2 * 3


def test_tiles_need_a_gaussian_method_and_no_feature_cache(strips: Path, tmp_path: Path):
    dm = MVTecDataModule(str(strips), "widget", num_workers=0, image_size=SIZE, tiles="1x2")
    with pytest.raises(UserError, match=r"--data\.tiles 1x2 needs a Gaussian method"):
        dm.configure(OneClassSVMAD("efficientnet-lite0", levels=[2], pretrained=False).data_needs())
    extractor = GaussianAD("efficientnet-lite0", levels=[2], pretrained=False).extractor
    with pytest.raises(UserError, match=r"drop --data\.feature_cache to fit with tiles 1x2"):
        FeatureCache(tmp_path / "cache", extractor, SIZE, resize=dm.geometry)
    model = GaussianAD("efficientnet-lite0", levels=[2], pretrained=False).detector
    model.tiles = TileGrid(1, 2)
    with pytest.raises(UserError, match="takes images of 1S x 2S pixels, got 32x32"):
        model.features(torch.zeros(1, 3, SIZE, SIZE, dtype=torch.uint8))


@pytest.mark.slow
def test_a_tiled_detector_exports_to_torchscript_and_onnx(strips: Path, tmp_path: Path):
    from anomaly.export import export_torchscript

    detector = GaussianDetector.load(fit_cells(strips, tmp_path / "runs", "--data.tiles", "1x3"))
    paths = sorted((strips / "widget" / "test").rglob("*.png"))[:3]
    images = image_batch(paths, SIZE, detector.model_.geometry)
    traced = torch.jit.load(str(export_torchscript(detector, tmp_path / "d.pt")))
    for batch in (images, images[:1]):  # the traced canvas input, any batch size
        score, _, maps = traced(batch)
        columns, expected_maps = detector.model_(batch)
        torch.testing.assert_close(score, columns["mahalanobis/sum"], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(maps, expected_maps, rtol=1e-4, atol=1e-4)

    session, (score, _, _) = onnx_outputs_match_pytorch(detector, images, tmp_path / "d.onnx")
    score1 = session.run(None, {"images": images[:1].numpy()})[0]  # another batch size, same export
    np.testing.assert_allclose(score1, score[:1], rtol=1e-4)


@pytest.mark.parametrize("pooling", [Global(), Cells(grid_size=2)])
def test_tiles_pass_the_backbone_a_batch_of_images_at_a_time_with_the_same_scores(pooling):
    """A 2x3-tiled batch of 4 images: 6 passes of 4 tiles, not one of 24; features and scores as if
    every tile had gone through at once."""
    torch.manual_seed(0)
    extractor = build_backbone("efficientnet-lite0", pretrained=False)
    levels = [2, 4]
    channels = [extractor.level_dims[level - 1] for level in levels]
    model = GaussianDetectorModel.for_fitting(
        extractor, levels, channels, pooling, tiles="2x3", image_size=SIZE
    )
    fit_images = torch.randint(0, 256, (6, 3, 2 * SIZE, 3 * SIZE), dtype=torch.uint8)
    model.update(model.features(fit_images))
    model.finalise()
    images = torch.randint(0, 256, (4, 3, 2 * SIZE, 3 * SIZE), dtype=torch.uint8)
    passes = []
    extractor.register_forward_hook(lambda module, args, output: passes.append(len(args[0])))
    features = model.features(images)
    assert passes == [4] * 6
    at_once = pooling.pool(extractor, model.split_tiles(images), levels)  # every tile in one pass
    for chunked, whole in zip(features, at_once, strict=True):
        torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-6)
    columns, maps = model(images)
    expected_columns, expected_maps = model.score(at_once)
    for name, values in columns.items():
        torch.testing.assert_close(values, expected_columns[name], rtol=1e-5, atol=1e-6)
    if maps is not None:
        torch.testing.assert_close(maps, expected_maps, rtol=1e-5, atol=1e-6)
