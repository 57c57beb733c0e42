"""The scikit-learn-like GaussianDetector on features (checked against sklearn/scipy) and on images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import chi2
from sklearn.base import clone
from sklearn.covariance import LedoitWolf
from sklearn.exceptions import NotFittedError
from sklearn.utils.validation import check_is_fitted

from anomaly.data.images import load_rgb
from anomaly.data.transforms import TileGrid
from anomaly.detector import GaussianDetector, merge
from anomaly.detector.inputs import image_batch
from anomaly.detector.model import DetectorModel
from anomaly.errors import UserError
from anomaly.methods.gaussian.module import DEFAULT_TARGET_FPR
from anomaly.pooling import Cells, Global, Grid
from anomaly.stats.scorer import GaussianScorer
from tests.detector.helpers import LEVELS, demo_images, fit_demo_detector


@pytest.fixture(scope="module")
def features() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    mixing = rng.normal(size=(6, 6))
    return rng.normal(size=(300, 6)) @ mixing, rng.normal(size=(40, 6)) @ mixing * 1.5 + 0.5


def test_feature_scores_are_ledoit_wolf_mahalanobis(features):
    train, new = features
    detector = GaussianDetector(backbone=None, batch_size=64).fit(train)
    expected = np.sqrt(LedoitWolf().fit(train).mahalanobis(new))
    distances = detector.decision_function(new)
    np.testing.assert_allclose(distances, expected, rtol=1e-9)
    # one level, Mahalanobis: eq. (8)'s closed form at the default fpr, the CLI's 0.01
    assert detector.fpr == DEFAULT_TARGET_FPR == 0.01
    assert detector.threshold_ == pytest.approx(np.sqrt(chi2.ppf(0.99, 6)), rel=1e-12)
    np.testing.assert_array_equal(detector.predict(new), (distances > detector.threshold_).astype(int))
    assert detector.decision_function(train).mean() < distances.mean()  # PyOD: higher = more anomalous


def test_signs_follow_scikit_learn_and_pyod(features):
    """score_samples: higher = more normal (sklearn); decision_function, score_columns: the distance."""
    train, new = features
    detector = GaussianDetector(backbone=None, score="l2", fpr=0.1).fit(train)
    distances = detector.score_columns(new)["l2/sum"]
    np.testing.assert_array_equal(detector.decision_function(new), distances)
    np.testing.assert_array_equal(detector.score_samples(new), -distances)
    assert detector.score_samples(train).mean() > detector.score_samples(new).mean()
    labels = detector.predict(new)
    np.testing.assert_array_equal(labels, (detector.decision_function(new) > detector.threshold_).astype(int))
    assert 0 < labels.sum() < len(labels)
    np.testing.assert_array_equal(clone(detector).fit_predict(train), detector.predict(train))


def test_detector_is_a_clonable_scikit_learn_estimator(features):
    params = dict(backbone=None, levels=[1], score="mahalanobis", resize="linear", fpr=0.2, batch_size=7)
    detector = GaussianDetector(**params, device="cpu")
    defaults = {"weights": None, "pooling": None, "image_size": None, "memory_budget_gb": 4.0}
    defaults |= {"fit_rule": "stretch", "tiles": "1x1", "reduction": "none", "variance_threshold": None}
    assert detector.get_params() == {**params, **defaults, "device": "cpu"}
    detector.fit(features[0])
    assert detector.decision_score_ == "mahalanobis/sum" and detector.device_ == torch.device("cpu")
    copy = clone(detector)
    assert copy.get_params() == detector.get_params() and not hasattr(copy, "model_")
    with pytest.raises(UserError, match="not fitted"):
        copy.decision_function(features[1])
    # scikit-learn's own check and exception: an unfitted copy fails both, the fitted detector passes
    for use in (lambda: check_is_fitted(copy), lambda: copy.predict(features[1]), lambda: copy.save("x")):
        with pytest.raises(NotFittedError):
            use()
    check_is_fitted(detector)
    assert copy.set_params(fpr=0.05, score="l2") is copy
    assert copy.get_params()["fpr"] == 0.05 and copy.get_params()["score"] == "l2"
    assert "fpr=0.2" in repr(detector) and repr(GaussianDetector()) == "GaussianDetector()"
    loaded = GaussianDetector.from_model(detector.model_, fpr=detector.fpr)
    assert clone(loaded).get_params() == loaded.get_params() and loaded.get_params()["pooling"] == Global()


def test_chi2_working_point_neither_keeps_nor_scores_the_training_features(features, monkeypatch):
    """Only an empirical threshold needs the training scores; the χ² one is streamed like the fit."""

    def forbidden(*args, **kwargs):
        raise AssertionError("training features were scored")

    monkeypatch.setattr(DetectorModel, "score_features", forbidden)
    detector = GaussianDetector(backbone=None, batch_size=64).fit(features[0])
    assert detector.threshold_ == pytest.approx(np.sqrt(chi2.ppf(0.99, 6)), rel=1e-12)
    with pytest.raises(AssertionError, match="were scored"):
        GaussianDetector(backbone=None, score="l2", batch_size=64).fit(features[0])


def test_levels_are_summed_and_empirical_threshold_holds_fpr(features):
    train, new = features
    both = GaussianDetector(backbone=None, fpr=0.1).fit([train[:, :3], train[:, 3:]])
    first = GaussianDetector(backbone=None).fit(train[:, :3])
    second = GaussianDetector(backbone=None).fit(train[:, 3:])
    np.testing.assert_allclose(
        both.score_samples([new[:, :3], new[:, 3:]]),
        first.score_samples(new[:, :3]) + second.score_samples(new[:, 3:]),
        rtol=1e-12,
    )
    # sum mode has no closed form: the threshold is the empirical 90% point of the training scores
    train_scores = both.decision_function([train[:, :3], train[:, 3:]])
    assert np.mean(train_scores > both.threshold_) <= 0.1
    assert np.mean(train_scores >= both.threshold_) > 0.1


def test_feature_detector_save_load(features, tmp_path: Path):
    train, new = features
    detector = GaussianDetector(backbone=None, score="l2", fpr=0.2).fit(train)
    path = detector.save(tmp_path / "features.safetensors")
    loaded = GaussianDetector.load(path)
    assert loaded.decision_score_ == "l2/sum" and loaded.threshold_ == detector.threshold_
    np.testing.assert_array_equal(loaded.score_samples(new), detector.score_samples(new))
    np.testing.assert_array_equal(loaded.predict(new), detector.predict(new))


def test_bad_use_raises_user_errors(features):
    train, _ = features
    with pytest.raises(UserError, match="not fitted"):
        GaussianDetector(backbone=None).score_samples(train)
    detector = GaussianDetector(backbone=None, fpr=None).fit(train)
    assert detector.threshold_ is None
    with pytest.raises(UserError, match="no threshold"):
        detector.predict(train)
    detector.threshold_ = 3.0
    assert set(detector.predict(train)) <= {0, 1}
    with pytest.raises(UserError, match=r"shape \(n, 6\)"):
        detector.score_samples(train[:, :4])
    with pytest.raises(UserError, match="unknown score"):
        GaussianDetector(backbone=None, score="cosine").fit(train)
    with pytest.raises(UserError, match="fitted on features"):
        detector.score_samples("part.png")
    for column in ("mahalanobis/x", "l2/0"):
        with pytest.raises(UserError, match="names no level"):
            GaussianDetector(backbone=None, score=column).fit(train)
    with pytest.raises(UserError, match="at least 2"):
        GaussianDetector(backbone=None).fit(train[:1])


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"backbone": 5}, "backbone must be a backbone's name"),
        ({"backbone": "efficientnet-b99"}, "unknown backbone 'efficientnet-b99'"),
        ({"image_size": "224"}, r"image_size must be a whole number of pixels .* got '224' \(str\)"),
        ({"image_size": 224.0}, "image_size must be a whole number"),
        ({"image_size": 0}, "image_size must be a positive number"),
        ({"image_size": -5}, "image_size must be a positive number"),
    ],
)
def test_bad_parameters_are_a_value_error_naming_them_at_fit(params, message):
    detector = GaussianDetector(**params)  # __init__ only stores
    with pytest.raises(ValueError, match=message):
        detector.fit(np.zeros((2, 32, 32, 3), np.uint8))


@pytest.mark.parametrize(
    ("scale", "message"),
    [(1e100, "fourth powers overflow"), (1e140, "fourth powers"), (1e-160, "underflows")],
)
def test_features_of_extreme_scale_are_a_value_error(features, scale, message):
    with pytest.raises(ValueError, match=message):
        GaussianDetector(backbone=None).fit(features[0] * scale)
    GaussianDetector(backbone=None).fit(features[0] * 1e60)  # within the range: fitted


def test_images_without_a_backbone_are_a_value_error_naming_it():
    with pytest.raises(ValueError, match="these look like images: backbone=None models feature vectors"):
        GaussianDetector(backbone=None).fit(np.zeros((4, 32, 32, 3), np.uint8))


def test_a_threshold_that_is_not_a_number_is_a_value_error(features, tmp_path: Path):
    detector = GaussianDetector(backbone=None).fit(features[0])
    for value in ("3", True, float("nan")):
        detector.threshold_ = value
        with pytest.raises(ValueError, match="threshold_ must be a"):
            detector.save(tmp_path / "d.safetensors")
        with pytest.raises(ValueError, match="threshold_ must be a"):
            detector.predict(features[1])
    assert not (tmp_path / "d.safetensors").exists()
    detector.threshold_ = np.float32(3)  # numpy numbers are numbers
    assert GaussianDetector.load(detector.save(tmp_path / "d.safetensors")).threshold_ == 3.0


def test_image_arrays_empty_integer_and_float(features):
    detector = fit_demo_detector()
    _, good, _ = demo_images()
    arrays = [load_rgb(p) for p in good]
    expected = detector.score_samples(arrays)
    wide = [a.astype(np.int64) for a in arrays]  # e.g. np.array of Python ints: 0..255 is cast losslessly
    np.testing.assert_array_equal(detector.score_samples(wide), expected)
    batch = image_batch(arrays, 224)
    np.testing.assert_array_equal(detector.score_samples(batch.to(torch.int64)), expected)
    with pytest.raises(
        ValueError, match=r"images must be uint8 \(0\.\.255\): got int64 with values from 300 to 300"
    ):
        detector.score_samples([np.full((8, 8, 3), 300, np.int64)])
    with pytest.raises(ValueError, match="must be uint8"):
        detector.score_samples(batch.to(torch.bool))
    with pytest.raises(ValueError, match="scale \\[0, 1\\] floats by 255"):
        detector.score_samples([arrays[0] / 255.0])
    for empty in (np.zeros((0, 0, 3), np.uint8), np.zeros((3, 0, 10, 3), np.uint8)):
        with pytest.raises(ValueError, match="image is empty"):
            detector.score_samples(empty if empty.ndim == 4 else [empty])


@pytest.mark.slow
def test_images_as_paths_arrays_and_grey(tmp_path: Path):
    detector = fit_demo_detector()
    _, good, bad = demo_images()
    assert detector.levels_ == list(LEVELS) and detector.image_size_ == 224
    from_paths = detector.decision_function(good + bad)
    arrays = [load_rgb(p) for p in good + bad]
    np.testing.assert_allclose(detector.decision_function(arrays), from_paths, rtol=1e-6)
    grey = [a[:, :, 0] for a in arrays]  # (H, W) arrays are taken as grey images
    assert detector.score_samples(grey).shape == (8,)
    # the demo's scratches and stains score above its normal images
    assert from_paths[4:].mean() > from_paths[:4].mean()
    assert detector.predict(good + bad).dtype.kind == "i"
    loaded = GaussianDetector.load(detector.save(tmp_path / "images.safetensors"))
    np.testing.assert_allclose(loaded.decision_function(good + bad), from_paths, rtol=1e-9)
    assert loaded.threshold_ == detector.threshold_


def test_a_single_path_is_one_image_and_empty_input_is_a_user_error(features):
    detector = fit_demo_detector()
    _, good, _ = demo_images()
    expected = detector.score_samples(good[:1])
    for single in (good[0], str(good[0])):
        scores = detector.score_samples(single)
        assert scores.shape == (1,)
        np.testing.assert_array_equal(scores, expected)
    assert detector.predict(str(good[0])).shape == (1,)
    with pytest.raises(UserError, match="no samples to score"):
        detector.score_samples([])
    on_features = GaussianDetector(backbone=None).fit(features[0])
    with pytest.raises(UserError, match="no samples to score"):
        on_features.score_samples(np.empty((0, 6)))


def test_unavailable_or_malformed_device_is_a_user_error(features, monkeypatch):
    """Parameters are checked by fit (``__init__`` only stores them, as scikit-learn's estimators)."""
    train = features[0]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # also on a machine with a GPU
    with pytest.raises(UserError, match=r"'cuda' is not available.*device='cpu'"):
        GaussianDetector(backbone=None, device="cuda").fit(train)
    with pytest.raises(UserError, match="unknown device 'gpu!'"):
        GaussianDetector(backbone=None, device="gpu!").fit(train)
    assert GaussianDetector(backbone=None, device="cpu").fit(train).device_ == torch.device("cpu")
    with pytest.raises(UserError, match="batch_size"):
        GaussianDetector(backbone=None, batch_size=0).fit(train)
    with pytest.raises(UserError, match="fpr"):
        GaussianDetector(backbone=None, fpr=1.5).fit(train)


def test_unfitted_detector_is_not_saved(features, tmp_path: Path):
    detector = GaussianDetector(backbone=None).fit(features[0])
    detector.model_.scorers[0] = GaussianScorer(6)  # as a run that never reached its fit
    with pytest.raises(UserError, match=r"the detector is not fitted \(no Gaussian for level\(s\) \[1\]\)"):
        detector.save(tmp_path / "d.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_calibrate_on_held_out_normal_data_keeps_the_false_positive_rate():
    """n close to D: the in-sample threshold flags most new normal samples, a held-out one about fpr."""
    rng = np.random.default_rng(1)
    mixing = rng.normal(size=(60, 60))

    def normal(n: int) -> list[np.ndarray]:  # two levels: Mahalanobis summed, an empirical threshold
        return [rng.normal(size=(n, 60)) @ mixing, rng.normal(size=(n, 30))]

    detector = GaussianDetector(backbone=None, fpr=0.05).fit(normal(80))
    fresh = normal(2000)
    in_sample_fpr = detector.predict(fresh).mean()
    held_out = normal(400)
    assert detector.calibrate(held_out) is detector
    held_out_scores = detector.decision_function(held_out)
    assert detector.threshold_ == pytest.approx(np.sort(held_out_scores)[int(np.ceil(400 * 0.95)) - 1])
    assert (held_out_scores > detector.threshold_).mean() <= 0.05
    calibrated_fpr = detector.predict(fresh).mean()
    assert in_sample_fpr > 0.3 and abs(calibrated_fpr - 0.05) < 0.03, (in_sample_fpr, calibrated_fpr)
    assert detector.source_["calibrated_on"] == 400
    detector.calibrate(held_out, fpr=0.1)  # a working point of the fitted state, not a parameter
    assert detector.fpr == 0.05 and detector.fpr_ == 0.1 and clone(detector).get_params()["fpr"] == 0.05
    with pytest.raises(UserError, match="fpr"):
        GaussianDetector(backbone=None, fpr=None).fit(normal(80)).calibrate(held_out)


def grid_features(detector: GaussianDetector, paths: list[Path], k: int) -> list[np.ndarray]:
    """Each level's map average-pooled to k x k by the backbone alone: (n, C, k, k) float64 arrays."""
    images = image_batch(paths, detector.image_size_, detector.resize_)
    return [g.double().numpy() for g in detector.model_.extractor(images, detector.levels_, grid=k)]


@pytest.mark.slow
def test_cells_pooling_fits_one_sklearn_gaussian_per_cell_and_maps_them(tmp_path: Path):
    """pooling=Cells(k): per cell and level a Ledoit-Wolf Gaussian; a level's score is its largest
    cell distance, the levels are summed, and the map holds the per-cell distances summed over levels."""
    train, good, bad = demo_images()
    detector = fit_demo_detector(pooling=Cells(grid_size=2), fpr=0.25)
    assert detector.pooling_ == Cells(grid_size=2) and detector.model_.makes_maps
    expected_scores, expected_maps = 0.0, 0.0
    for fit_level, new_level in zip(
        grid_features(detector, train, 2), grid_features(detector, good + bad, 2), strict=True
    ):
        per_cell = np.stack(
            [
                np.sqrt(LedoitWolf().fit(fit_level[:, :, y, x]).mahalanobis(new_level[:, :, y, x]))
                for y in range(2)
                for x in range(2)
            ],
            axis=1,
        )  # (n, 4): cell i * 2 + j is row i, column j
        expected_scores = expected_scores + per_cell.max(axis=1)
        expected_maps = expected_maps + per_cell.reshape(-1, 2, 2)
    np.testing.assert_allclose(detector.decision_function(good + bad), expected_scores, rtol=1e-5)
    maps = detector.anomaly_maps(good + bad)
    np.testing.assert_allclose(maps, expected_maps, rtol=1e-5)
    # a max over cells is not chi-squared: the empirical 1 - fpr quantile of the training scores
    assert (detector.decision_function(train) > detector.threshold_).mean() <= 0.25
    loaded = GaussianDetector.load(detector.save(tmp_path / "cells.safetensors"))
    assert loaded.pooling_ == Cells(grid_size=2) and clone(loaded).get_params()["pooling"] == Cells(
        grid_size=2
    )
    np.testing.assert_allclose(loaded.anomaly_maps(good + bad), maps, rtol=1e-9)
    assert loaded.threshold_ == detector.threshold_


def test_grid_pooling_by_name_models_the_whole_grid_as_one_vector():
    train, good, bad = demo_images()
    detector = GaussianDetector(
        backbone="efficientnet-lite0", levels=[4], pooling="grid", image_size=128, batch_size=8
    )  # smaller inputs (level 4: 8 x 8, pooled to 4 x 4): the grid size does not depend on them
    detector.fit(train)
    assert detector.pooling_ == Grid(grid_size=4)
    (fit_level,), (new_level,) = grid_features(detector, train, 4), grid_features(detector, good + bad, 4)
    fit_level, new_level = fit_level.reshape(len(train), -1), new_level.reshape(len(good + bad), -1)
    expected = np.sqrt(LedoitWolf().fit(fit_level).mahalanobis(new_level))
    np.testing.assert_allclose(detector.decision_function(good + bad), expected, rtol=1e-5)
    with pytest.raises(UserError, match="gives no anomaly maps"):
        detector.anomaly_maps(good)


def test_spatial_pooling_options_are_checked_in_fit(features):
    with pytest.raises(UserError, match="pooling cells needs feature maps"):
        GaussianDetector(backbone=None, pooling="cells").fit(features[0])
    with pytest.raises(UserError, match="pooling must be one of"):
        GaussianDetector(backbone=None, pooling="patches").fit(features[0])
    with pytest.raises(UserError, match="tiles 1x2 cut images"):
        GaussianDetector(backbone=None, tiles="1x2").fit(features[0])
    with pytest.raises(UserError, match="over memory_budget_gb"):
        GaussianDetector(levels=[9], pooling=Cells(grid_size=32), memory_budget_gb=0.01).fit(demo_images()[0])
    # a 4 x 4 grid of level 9: 20480 dimensions, 6.2 GiB as D x D matrices; fitted on few images, it
    # keeps their rows and a basis instead (2 n D floats), which the budget counts
    train = demo_images()[0]
    with pytest.raises(UserError, match=f"and {len(train)} training samples, over memory_budget_gb 0.001"):
        GaussianDetector(levels=[9], pooling=Grid(4), memory_budget_gb=0.001).fit(train)
    fitted = GaussianDetector(levels=[9], pooling=Grid(4), memory_budget_gb=0.05).fit(train[:8])
    assert fitted.model_.scorers[0].low_rank is not None
    # learning more is checked too: 12 images take 3.75 MiB (0.0037 GiB) over a budget of 0.003 GiB
    fitted.memory_budget_gb = 0.003
    with pytest.raises(UserError, match=r"and 12 training samples, over memory_budget_gb 0\.003"):
        fitted.partial_fit(train[8:12])
    assert fitted.model_.samples == 8
    # and so is merging: the union of 8 and 4 images is refused before anything is merged
    other = GaussianDetector(levels=[9], pooling=Grid(4), memory_budget_gb=0.05).fit(train[8:12])
    with pytest.raises(UserError, match=r"and 12 training samples, over memory_budget_gb 0\.003"):
        merge([fitted, other])
    fitted.memory_budget_gb = 0.05
    assert merge([fitted, other]).model_.samples == 12


@pytest.mark.slow
def test_tiles_fit_every_tile_and_score_an_image_by_its_worst_tile(tmp_path: Path):
    """tiles='1x2': a tiled detector equals a plain one fitted on the canvases' halves, and an
    image's score is the larger of its two halves' scores."""
    train, good, bad = demo_images()
    tiled = fit_demo_detector(tiles="1x2", fit_rule="pad", fpr=0.2)
    assert tiled.tiles_ == TileGrid(1, 2) and tiled.fit_rule_ == "pad"

    def halves(paths):
        canvas = image_batch(paths, 224, tiled.model_.geometry)  # (n, 3, 224, 448)
        return canvas[..., :224], canvas[..., 224:]

    left, right = halves(train)
    plain = fit_demo_detector(fpr=None).fit(torch.cat([left, right]))
    new_left, new_right = halves(good + bad)
    expected = np.maximum(plain.decision_function(new_left), plain.decision_function(new_right))
    np.testing.assert_allclose(tiled.decision_function(good + bad), expected, rtol=1e-6)
    assert (tiled.decision_function(train) > tiled.threshold_).mean() <= 0.2  # the training quantile
    loaded = GaussianDetector.load(tiled.save(tmp_path / "tiles.safetensors"))
    assert loaded.get_params()["tiles"] == "1x2" and loaded.get_params()["fit_rule"] == "pad"
    np.testing.assert_allclose(loaded.decision_function(good + bad), expected, rtol=1e-6)
