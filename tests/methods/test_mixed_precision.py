"""The GPU recipe, run on CPU: features under bf16 autocast (``bf16-mixed``), statistics in float64."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from anomaly.data import MVTecDataModule
from anomaly.detector import GaussianDetector, read_detector, save_run_detector
from anomaly.methods.gaussian import GaussianAD
from tests.conftest import DEFAULT_SWITCHES, FEW_HELD_OUT, fit_and_test, make_mvtec_category

pytestmark = [FEW_HELD_OUT, DEFAULT_SWITCHES]

SMALL = 96
LEVELS = [3, 6, 9]


def run(root: Path, out: Path, precision: str, cache: Path | None = None):
    # batch size 3: no single-image batch for 9 fitting, 3 held-out and 8 test images
    dm = MVTecDataModule(
        str(root), "widget", fold=0, batch_size=3, num_workers=0, image_size=SMALL,
        feature_cache=None if cache is None else str(cache),
    )  # fmt: skip
    model = GaussianAD("efficientnet-lite0", levels=LEVELS)
    fit_and_test(model, dm, out, precision=precision)
    with open(out / "scores.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    return model, dm, rows


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_mvtec_category(tmp_path_factory.mktemp("mvtec"))


@pytest.fixture(scope="module")
def bf16_run(data: Path, tmp_path_factory):
    """(model, rows of scores.csv) of one bf16-mixed run without a feature cache, shared: tests read it."""
    model, _, rows = run(data, tmp_path_factory.mktemp("bf16"), "bf16-mixed")
    return model, rows


def test_bf16_features_feed_float64_statistics_and_scores(data: Path, bf16_run, tmp_path: Path):
    full, _, full_rows = run(data, tmp_path / "fp32", "32-true")
    mixed, mixed_rows = bf16_run
    images = torch.zeros(2, 3, SMALL, SMALL, dtype=torch.uint8)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the maps are bf16; pooling sums in float32
        assert all(m.dtype == torch.bfloat16 for m in mixed.extractor.feature_maps(images, LEVELS))
        assert all(f.dtype == torch.float32 for f in mixed.features(images))
    state = mixed.state_dict()
    fitted = [v for k, v in state.items() if k.startswith("detector.scorers.") and v.is_floating_point()]
    assert fitted and all(v.dtype == torch.float64 for v in fitted)
    for level in range(len(LEVELS)):
        a = full.scorers[level].mean.numpy()
        b = mixed.scorers[level].mean.numpy()
        assert not np.array_equal(a, b)  # bf16 rounding reached the statistics
        np.testing.assert_allclose(b, a, rtol=0.05, atol=0.05 * np.abs(a).max())  # bf16: ~3 digits
    labels = [int(r["label"]) for r in full_rows]
    assert [r["path"] for r in mixed_rows] == [r["path"] for r in full_rows]
    for column in ("mahalanobis_sum", "l2_sum"):
        fp32 = np.array([float(r[column]) for r in full_rows])
        bf16 = np.array([float(r[column]) for r in mixed_rows])
        assert np.corrcoef(fp32, bf16)[0, 1] > 0.99, column
        assert abs(roc_auc_score(labels, bf16) - roc_auc_score(labels, fp32)) <= 0.1, column


def test_the_detector_records_bf16_and_prediction_reproduces_it(bf16_run, tmp_path: Path):
    mixed, rows = bf16_run
    path = save_run_detector(mixed, SMALL, tmp_path / "saved")
    assert read_detector(path)[1]["precision"] == "bf16-mixed"
    detector = GaussianDetector.load(path)
    detector.batch_size = 3  # the run's batches: the same bf16 arithmetic
    scores = detector.decision_function([r["path"] for r in rows])
    np.testing.assert_allclose(scores, [float(r["mahalanobis_sum"]) for r in rows], rtol=1e-6)
    detector.model_.precision = "32-true"  # fp32 features differ from the bf16 ones it was calibrated on
    assert not np.allclose(detector.decision_function([r["path"] for r in rows]), scores, rtol=1e-6)


def test_bf16_features_have_their_own_cache_entries_and_equal_uncached(data: Path, bf16_run, tmp_path: Path):
    cache = tmp_path / "cache"
    _, plain = bf16_run
    _, dm, cached = run(data, tmp_path / "cached", "bf16-mixed", cache)
    assert dm.feature_source.identity["compute"] == "cpu/bf16-mixed"
    assert cached == plain
    _, full_dm, _ = run(data, tmp_path / "fp32", "32-true", cache)
    assert full_dm.feature_source.key != dm.feature_source.key
    assert (full_dm.feature_source.stats.hits, full_dm.feature_source.stats.misses) == (0, 20)
