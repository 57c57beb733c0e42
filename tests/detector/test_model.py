"""The one detector module: every Gaussian configuration saves, loads, predicts (with maps) and exports."""

from __future__ import annotations

import csv
import json
import math
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from anomaly.cli import main as fit_main
from anomaly.columns import SUM, ScoreColumn
from anomaly.data.mvtec import MVTecDataModule
from anomaly.detector import GaussianDetector, read_detector
from anomaly.detector import predict as predict_module
from anomaly.detector.file import VERSION, tensors_sha256
from anomaly.detector.maps import map_file_names
from anomaly.detector.predict import overlay_range
from anomaly.errors import UserError
from anomaly.methods.spatial import SpatialGaussianAD
from anomaly.pooling import Cells, Grid, build_pooling
from predict import main as predict_main
from tests.conftest import DEFAULT_SWITCHES, FEW_HELD_OUT, make_mvtec_category
from tests.detector.helpers import onnx_outputs_match_pytorch

pytestmark = [FEW_HELD_OUT, DEFAULT_SWITCHES]

FAST = ["--model.backbone", "efficientnet-lite0", "--data.num_workers", "0", "--data.batch_size", "8"]


def test_score_column_is_the_one_parser():
    assert ScoreColumn.parse("mahalanobis/7") == ScoreColumn("mahalanobis", 7)
    assert ScoreColumn.parse("sed") == ScoreColumn.parse(f"sed/{SUM}") == ScoreColumn("sed")
    assert str(ScoreColumn("l2", 3)) == "l2/3" and ScoreColumn("l2").csv_name == "l2_sum"
    for bad in ("mahalanobis/x", "mahalanobis/0", "/sum", "a/b/c"):
        with pytest.raises(UserError):
            ScoreColumn.parse(bad)
    with pytest.raises(UserError, match="level in 2, sum"):
        ScoreColumn.parse("l2/3").validate(["l2"], [2])
    for column in (ScoreColumn("mahalanobis", 7), ScoreColumn("l2"), ScoreColumn("cca_score", 2)):
        assert ScoreColumn.from_csv_name(column.csv_name) == column
    assert [ScoreColumn.from_csv_name(h) for h in ("path", "decision", "map_max_x", "l2_0")] == [None] * 4


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: build_pooling("cells", grid_size=100000), "grid_size of pooling cells"),
        (lambda: Grid(0), "grid_size"),
        (lambda: Cells(True), "grid_size"),
        (lambda: build_pooling("pixels"), "pooling must be one of"),
        (lambda: Cells(4).check_budget([24], math.nan), "finite positive"),
        (lambda: Cells(4).check_budget([24], -1.0), "finite positive"),
    ],
)
def test_pooling_options_are_checked_in_the_constructors(make, message):
    with pytest.raises(UserError, match=message):
        make()


def test_spatial_options_fail_before_any_allocation():
    with pytest.raises(UserError, match="memory_budget_gb must be a finite positive"):
        SpatialGaussianAD("efficientnet-lite0", levels=[2], pretrained=False, memory_budget_gb=float("nan"))
    with pytest.raises(UserError, match="grid_size of pooling cells"):
        SpatialGaussianAD(
            "efficientnet-lite0", levels=[2], pretrained=False, pooling="cells", grid_size=100000
        )


def fit_run(root: Path, tiny_mvtec: Path, *extra: str) -> Path:
    args = ["--data.root", str(tiny_mvtec), "--data.category", "widget", "--config", "configs/spatial_cells.yaml",
            "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false",
            "--model.levels", "[2, 4]", "--model.grid_size", "2", "--model.overlays", "0", *extra]  # fmt: skip
    assert fit_main([*FAST, *args]) == 0
    (run_dir,) = {p.parent for p in root.rglob("detector.safetensors")}
    return run_dir


@pytest.fixture(scope="module")
def cells_run(tmp_path_factory) -> tuple[Path, Path]:
    """(the run folder, the data root) of one spatial cells run on a tiny category; its training images
    are deleted after the fit (loading the detector needs none). Tests read it and write elsewhere."""
    folder = tmp_path_factory.mktemp("cells_run")
    data = make_mvtec_category(folder / "mvtec")
    run_dir = fit_run(folder / "runs", data, "--figures", "false")
    shutil.rmtree(data / "widget" / "train")
    return run_dir, data


def test_cells_run_detector_reproduces_the_run_and_predict_writes_maps(cells_run, tmp_path: Path):
    run_dir, _ = cells_run
    meta = json.loads((run_dir / "detector.json").read_text())
    assert meta["pooling"] == {"name": "cells", "grid_size": 2} and meta["version"] == VERSION
    assert meta["precision"] == "32-true" and meta["tensors_sha256"] == tensors_sha256(
        read_detector(run_dir)[0]
    )
    with open(run_dir / "scores.csv") as file:
        rows = list(csv.DictReader(file))

    out, maps = tmp_path / "predicted.csv", tmp_path / "maps"
    paths = [row["path"] for row in rows]
    listed = tmp_path / "inputs"
    listed.mkdir()
    for i, path in enumerate(paths):  # one flat folder, in the run's order
        shutil.copy(path, listed / f"{i:03d}_{Path(path).name}")
    args = ["--detector", str(run_dir), "--input", str(listed), "--out", str(out), "--maps", str(maps)]
    assert predict_main([*args, "--batch-size", "8", "--no-progress"]) == 0
    with open(out) as file:
        predicted = list(csv.DictReader(file))
    assert len(predicted) == len(rows)
    for row, new in zip(rows, predicted, strict=True):
        for level in ("2", "4"):
            assert float(new[f"mahalanobis_{level}"]) == pytest.approx(
                float(row[f"mahalanobis_{level}"]), rel=1e-6
            )
        assert float(new["score"]) == pytest.approx(float(row["mahalanobis_sum"]), rel=1e-6)
        assert new["decision"] == row["decision"]
    # one overlay and one raw map per image, at the image's own size, with the maximum where the CSV says
    assert len(list(maps.glob("*.png"))) == len(list(maps.glob("*.npy"))) == len(rows)
    first = np.load(predicted[0]["map_file"])
    from anomaly.data.images import load_rgb

    assert first.dtype == np.float32 and first.shape == load_rgb(predicted[0]["path"]).shape[:2]
    y, x = np.unravel_index(int(np.argmax(first)), first.shape)
    assert (int(predicted[0]["map_max_x"]), int(predicted[0]["map_max_y"])) == (x, y)

    detector = GaussianDetector.load(run_dir)
    columns = detector.score_columns(paths[:3])
    coarse = detector.anomaly_maps(paths[:3])
    assert coarse.shape == (3, 2, 2)
    np.testing.assert_allclose(
        columns["mahalanobis/sum"], [float(r["mahalanobis_sum"]) for r in rows[:3]], rtol=1e-6
    )


def lower_median(values: np.ndarray, axis: int = -1) -> np.ndarray:
    """torch's median: the lower of the two middle values of an even count."""
    return np.take(np.sort(values, axis=axis), (values.shape[axis] - 1) // 2, axis=axis)


def test_the_map_threshold_is_the_held_out_maps_peak_and_tops_the_overlays(tmp_path: Path, monkeypatch):
    """A run sets its map threshold on its held-out normal images' maps (their largest value at a 1%
    target), the API's calibrate by the same rule, and predict's overlays reach their top colour
    there, not at the image score's threshold (in other units for grid_maps). Their colours start at
    the map floor: the held-out maps' median cell value, the median over the images."""
    data = make_mvtec_category(tmp_path / "mvtec")
    run_dir = fit_run(tmp_path / "runs", data, "--figures", "false", "--model.pooling", "grid_maps")
    meta = json.loads((run_dir / "detector.json").read_text())
    held_out = [s.path for s in MVTecDataModule(str(data), "widget", fold=0, num_workers=0).holdout_samples]
    detector = GaussianDetector.load(run_dir)
    cells = detector.anomaly_maps(held_out).reshape(len(held_out), -1)
    peaks, floor = cells.max(axis=1), float(lower_median(lower_median(cells)))
    assert len(held_out) >= 2 and meta["map_threshold"] == pytest.approx(float(peaks.max()), rel=1e-6)
    assert detector.model_.map_threshold == meta["map_threshold"] != meta["threshold"]
    assert meta["fpr"] == detector.fpr_ == 0.01  # the run's target, which its threshold was set for
    assert detector.model_.map_floor == meta["map_floor"] == pytest.approx(floor, rel=1e-6)
    assert 0 < meta["map_floor"] < meta["map_threshold"]

    tops = []
    monkeypatch.setattr(predict_module, "write_map", lambda *args: tops.append(args[-1]))
    args = ["--detector", str(run_dir), "--input", held_out[0], "--out", str(tmp_path / "one.csv")]
    assert predict_main([*args, "--maps", str(tmp_path / "maps"), "--no-progress"]) == 0
    assert tops == [(meta["map_floor"], meta["map_threshold"])]

    detector.model_.map_threshold = detector.model_.map_floor = None
    detector.calibrate(held_out[1:], fpr=0.5)  # the peak that at most half of them exceed
    median = float(np.sort(peaks[1:])[math.ceil((len(peaks) - 1) / 2) - 1])
    assert detector.model_.map_threshold == pytest.approx(median, rel=1e-6)
    assert detector.model_.map_floor == pytest.approx(float(lower_median(lower_median(cells[1:]))), rel=1e-6)
    saved = GaussianDetector.load(detector.save(tmp_path / "calibrated.safetensors"))
    kept = (saved.model_.map_threshold, saved.model_.map_floor)
    assert kept == (detector.model_.map_threshold, detector.model_.map_floor)


def test_overlays_span_the_map_floor_to_the_map_threshold_else_zero_to_the_threshold_or_the_map():
    heat = np.array([[1.0, 5.0], [np.nan, 2.0]])

    def colours(map_floor, map_threshold, threshold):
        model = SimpleNamespace(map_floor=map_floor, map_threshold=map_threshold)
        return overlay_range(model, threshold, heat)

    assert colours(1.5, 3.0, 9.0) == (1.5, 3.0)
    assert colours(None, 3.0, 9.0) == (0.0, 3.0)
    assert colours(4.0, 3.0, 9.0) == (0.0, 3.0)  # a floor above the top is not used
    assert colours(None, None, 9.0) == (0.0, 9.0)  # a file from before map thresholds
    assert colours(None, None, None) == (0.0, 5.0)


def test_cells_export_outputs_the_map(cells_run, tmp_path: Path):
    from anomaly.detector.inputs import image_batch

    run_dir, data = cells_run
    detector = GaussianDetector.load(run_dir)
    images = image_batch(sorted((data / "widget" / "test").rglob("*.png"))[:3], detector.image_size_)
    _, (_, level_scores, _) = onnx_outputs_match_pytorch(detector, images, tmp_path / "d.onnx")
    assert level_scores.shape == (3, 2)


def rewrite(path: Path, out: Path, edit_tensors=None, edit_meta=None, checksum: bool = True) -> Path:
    tensors, meta = read_detector(path)
    if edit_tensors:
        edit_tensors(tensors)
    if edit_meta:
        edit_meta(meta)
    if checksum:
        meta["tensors_sha256"] = tensors_sha256(tensors)
    save_file(tensors, str(out), metadata={"detector": json.dumps(meta)})
    return out


# fmt: off
# ruff: noqa: E501
HOSTILE = {
    "basis (32, 33)": ("level.2.basis is F64 (32, 33)", lambda t: t.update({"level.2.basis": torch.zeros(32, 33, dtype=torch.float64)}), None),
    "basis of 2 columns": ("level.2.basis_precision is F64", lambda t: t.update({"level.2.basis": t["level.2.basis"][:, :2].contiguous()}), None),
    "int64 basis": ("I64", lambda t: t.update({"level.2.basis": t["level.2.basis"].long()}), None),
    "float16 basis": ("F16", lambda t: t.update({"level.2.basis": t["level.2.basis"].half()}), None),
    "dense precision beside the basis": ("unexpected tensor level.2.precision", lambda t: t.update({"level.2.precision": torch.zeros(32, 32, dtype=torch.float64)}), None),
    "precision without the basis": ("unexpected tensor level.2.basis_precision", lambda t: t.update({"level.2.precision": torch.zeros(32, 32, dtype=torch.float64)}) or t.pop("level.2.basis"), None),
    "0-d mean": ("level.2.mean is F64 ()", lambda t: t.update({"level.2.mean": torch.zeros((), dtype=torch.float64)}), None),
    "1-D projection": ("projection has shape", lambda t: t.update({"level.2.projection": torch.zeros(32, dtype=torch.float64)}), None),
    "30000-dim mean": ("level.2.mean is F64 (30000,)", lambda t: t.update({"level.2.mean": torch.zeros(30000, dtype=torch.float64)}), None),
    "levels reordered": ("'levels'", None, lambda m: m.update(levels=m["levels"][::-1])),
    "infinite threshold": ("'threshold'", None, lambda m: m.update(threshold=float("inf"))),
    "huge image size": ("'preprocessing.image_size'", None, lambda m: m["preprocessing"].update(image_size=100000)),
    "embedded without weights": ("embedded", None, lambda m: m.update(weights={"kind": "embedded"})),
    "cells grid 100000": ("'pooling'", None, lambda m: m.update(pooling={"name": "cells", "grid_size": 100000})),
    "unknown precision": ("'precision'", None, lambda m: m.update(precision="64-true")),
}
# fmt: on


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_files_are_one_user_error_before_anything_is_built(case: str, tmp_path: Path):
    from tests.detector.helpers import fit_demo_detector

    detector = fit_demo_detector()
    good = detector.save(tmp_path / "good.safetensors")
    message, edit_tensors, edit_meta = HOSTILE[case]
    path = rewrite(good, tmp_path / "bad.safetensors", edit_tensors, edit_meta)
    with pytest.raises(UserError, match=re.escape(message)) as info:
        GaussianDetector.load(path)
    assert len(str(info.value).splitlines()) == 1


def test_tensors_must_match_their_checksum(tmp_path: Path):
    from tests.detector.helpers import fit_demo_detector

    good = fit_demo_detector().save(tmp_path / "good.safetensors")
    edit = lambda t: t["level.2.mean"].add_(1.0)  # noqa: E731
    path = rewrite(good, tmp_path / "bad.safetensors", edit, checksum=False)
    with pytest.raises(UserError, match="checksum"):
        GaussianDetector.load(path)


def test_version_1_files_still_load(tmp_path: Path):
    from tests.detector.helpers import demo_images, fit_demo_detector

    detector = fit_demo_detector()
    tensors, meta = read_detector(detector.save(tmp_path / "v2.safetensors"))
    old = {k.replace("level.2.", "level.0.").replace("level.4.", "level.1."): v for k, v in tensors.items()}
    for key in ("pooling", "level_weighting", "precision", "tensors_sha256"):
        meta.pop(key)
    meta["version"] = 1
    save_file(old, str(tmp_path / "v1.safetensors"), metadata={"detector": json.dumps(meta)})
    _, good, _ = demo_images()
    loaded = GaussianDetector.load(tmp_path / "v1.safetensors")
    np.testing.assert_allclose(loaded.score_samples(good), detector.score_samples(good), rtol=1e-9)


LOAD_AND_MEASURE = """
import resource, sys
from anomaly.detector import GaussianDetector
from anomaly.errors import UserError
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for path in sys.argv[1:]:
    try:
        GaussianDetector.load(path)
    except UserError:
        pass
    else:
        raise SystemExit(f"{path} loaded")
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)  # MiB (Linux: KiB)
"""


@pytest.mark.slow
def test_loading_crafted_files_keeps_peak_memory_bounded(tmp_path: Path):
    """Files that claim huge sizes (a 30000-dim level, a 100000 px input, 100000 x 100000 cells)
    are refused from their header: the peak memory of a process loading them barely moves.
    Before the header checks, the 30000-dim level alone built a 7.2 GB identity."""
    import subprocess
    import sys

    from tests.detector.helpers import fit_demo_detector

    good = fit_demo_detector().save(tmp_path / "good.safetensors")
    crafted = [
        rewrite(good, tmp_path / f"{case.replace(' ', '_')}.safetensors", *HOSTILE[case][1:])
        for case in ("30000-dim mean", "huge image size", "cells grid 100000")
    ]
    assert all(path.stat().st_size < good.stat().st_size + 2**20 for path in crafted)  # small files
    done = subprocess.run(
        [sys.executable, "-c", LOAD_AND_MEASURE, *map(str, crafted)],
        capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parents[2],
    )  # fmt: skip
    assert int(done.stdout.strip()) < 200, f"peak memory grew by {done.stdout.strip()} MiB"


def test_map_files_of_inputs_that_differ_only_in_extension_do_not_overwrite_each_other(tmp_path: Path):
    """An image and its mask side by side (Magnetic-Tile's X.jpg, X.png) get one map file each."""
    paths = [
        tmp_path / "a" / "x.jpg",
        tmp_path / "a" / "x.png",
        tmp_path / "b" / "x.jpg",
        tmp_path / "a" / "y.jpg",
    ]
    assert map_file_names(paths) == ["a%2Fx.jpg", "a%2Fx.png", "b%2Fx.jpg", "a%2Fy.jpg"]
