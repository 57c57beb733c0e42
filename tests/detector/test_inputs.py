"""What the Python API accepts as input, and the checks that refuse the rest up front."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from anomaly.data.images import collect_images
from anomaly.detector import GaussianDetector
from anomaly.detector.inputs import feature_list
from anomaly.errors import UserError
from tests.detector.helpers import LEVELS, demo_images, fit_demo_detector


def test_a_2d_list_of_floats_is_one_table_not_one_list_per_level():
    """Minor 8: ``fit([[1., 2.], [3., 4.], [5., 7.]])`` was misread as three levels."""
    rows = [[1.0, 2.0], [3.0, 4.0], [5.0, 7.0], [2.0, 2.5]]
    from_list = GaussianDetector(backbone=None, fpr=None).fit(rows)
    from_array = GaussianDetector(backbone=None, fpr=None).fit(np.array(rows))
    assert from_list.levels_ == [1]
    np.testing.assert_allclose(from_list.score_samples(rows), from_array.score_samples(np.array(rows)))
    two_levels = feature_list([np.array(rows), np.array(rows)[:, :1]])
    assert [tuple(t.shape) for t in two_levels] == [(4, 2), (4, 1)]


def test_a_generator_of_paths_is_read_like_a_list():
    """Minor 8: a generator of paths gave a TypeError."""
    train, good, _ = demo_images()
    detector = GaussianDetector(backbone="efficientnet-lite0", levels=LEVELS, pooling="global", batch_size=8)
    detector.fit(path for path in train)
    reference = fit_demo_detector()
    np.testing.assert_allclose(
        detector.score_samples(p for p in good), reference.score_samples(good), rtol=1e-6
    )


def test_a_folder_given_as_an_image_is_refused_naming_how_to_list_it(tmp_path):
    """A folder where image paths are expected: one line naming the way to list its images, before
    anything is read (it was an IsADirectoryError from reading the folder as a file)."""
    train = demo_images()[0]
    folder = Path(train[0]).parent
    detector = GaussianDetector(backbone="efficientnet-lite0", levels=LEVELS, pooling="global", batch_size=8)
    for given in (folder, str(folder), [*train[:3], folder], (p for p in [train[0], str(folder)])):
        with pytest.raises(UserError) as error:
            detector.fit(given)
        assert str(error.value) == (
            f"{folder} is a folder, not an image: pass its images, e.g. "
            f"anomaly.data.images.collect_images({str(folder)!r})"
        )
    fitted = detector.fit(collect_images(folder))
    with pytest.raises(UserError, match="is a folder, not an image"):
        fitted.score_samples(folder)


def test_float_image_tensors_in_unit_range_are_accepted():
    images = torch.rand(2, 3, 224, 224)
    assert fit_demo_detector().score_samples(images).shape == (2,)


def test_training_data_without_variance_get_a_specific_warning():
    """Minor 2: identical or blank images gave zero distances and a threshold that never fires."""
    with (
        pytest.warns(RuntimeWarning, match=r"\(almost\) no variance"),
        pytest.warns(RuntimeWarning, match="singular"),
    ):
        GaussianDetector(backbone=None, fpr=None).fit(np.full((10, 5), 3.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        GaussianDetector(backbone=None, fpr=None).fit(np.random.default_rng(0).normal(size=(50, 5)))


def test_the_memory_budget_is_configurable(monkeypatch):
    monkeypatch.setenv("ANOMALY_MEMORY_BUDGET_GB", "0.000001")
    with pytest.raises(ValueError, match="a Gaussian of 20 features needs"):
        GaussianDetector(backbone=None).fit(np.zeros((3, 20)))
    monkeypatch.setenv("ANOMALY_MEMORY_BUDGET_GB", "-1")
    with pytest.raises(ValueError, match="must be a positive number of GiB"):
        GaussianDetector(backbone=None).fit(np.zeros((3, 20)))


def test_paths_or_generators_given_to_a_feature_detector_are_refused():
    detector = GaussianDetector(backbone=None, fpr=None).fit(np.random.default_rng(0).normal(size=(10, 3)))
    for wrong in ("part.png", (row for row in np.zeros((2, 3)))):
        with pytest.raises(ValueError, match=r"fitted on features \(backbone=None\)"):
            detector.score_samples(wrong)
