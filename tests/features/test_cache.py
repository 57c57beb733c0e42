"""The feature cache: hits, misses, stale and corrupt entries, identity, and cached == uncached."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from anomaly.backbones import build_backbone
from anomaly.data import MVTecDataModule, Sample
from anomaly.data.images import load_rgb
from anomaly.data.needs import DataNeeds
from anomaly.data.transforms import ImagePipeline
from anomaly.errors import UserError
from anomaly.features import FeatureCache, file_digest
from anomaly.methods.gaussian import GaussianAD
from tests.conftest import (
    DEFAULT_SWITCHES,
    ENTRY_DAMAGES,
    FEW_HELD_OUT,
    damage_entry,
    fit_and_test,
    run_results,
    write_noise_images,
)

SIZE = 64  # a small input resolution keeps the unit tests fast


@pytest.fixture(scope="module")
def extractor():
    return build_backbone("efficientnet-lite0")


@pytest.fixture
def images(tmp_path: Path) -> list[str]:
    return [str(p) for p in write_noise_images(tmp_path / "images", 5)]


def direct(extractor, paths: list[str]) -> list[torch.Tensor]:
    pipeline = ImagePipeline(SIZE)
    batch = torch.stack([pipeline(load_rgb(p)) for p in paths])
    return extractor(batch)


def cached(extractor, root: Path, paths: list[str], batch_size: int = 5) -> tuple[FeatureCache, list]:
    cache = FeatureCache(root, extractor, SIZE)
    cache.load(paths, batch_size=batch_size)
    return cache, cache.features([Sample(p, 0) for p in paths])


def assert_equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)


def test_miss_then_hit_returns_the_extracted_features(extractor, images, tmp_path):
    root = tmp_path / "cache"
    cold, features = cached(extractor, root, images)
    assert (cold.stats.hits, cold.stats.misses, cold.stats.rejected) == (0, 5, 0)
    assert_equal(features, direct(extractor, images))
    assert len(list(root.rglob("*.feat"))) == 5 and (cold.folder / "identity.json").is_file()
    warm, again = cached(extractor, root, images)
    assert (warm.stats.hits, warm.stats.misses, warm.stats.rejected) == (5, 0, 0)
    assert_equal(again, features)


def test_changed_image_file_is_recomputed_not_served_stale(extractor, images, tmp_path):
    root = tmp_path / "cache"
    cached(extractor, root, images)
    Image.fromarray(np.full((40, 50, 3), 7, np.uint8)).save(images[2])  # same path, new content
    cache, features = cached(extractor, root, images)
    assert (cache.stats.hits, cache.stats.misses) == (4, 1)
    assert_rows(features, direct(extractor, images), recomputed=2, alone=direct(extractor, images[2:3]))


@pytest.mark.parametrize("damage", ENTRY_DAMAGES)
def test_corrupt_or_mismatched_entry_is_rejected_and_rewritten(extractor, images, tmp_path, damage):
    root = tmp_path / "cache"
    cold, reference = cached(extractor, root, images)
    entry, other = (cold.entry_path(file_digest(images[i])) for i in (1, 0))
    damage_entry(entry, damage, other)
    cache, features = cached(extractor, root, images)
    assert (cache.stats.hits, cache.stats.misses, cache.stats.rejected) == (4, 0, 1)
    assert_rows(features, reference, recomputed=1, alone=direct(extractor, images[1:2]))
    third, _ = cached(extractor, root, images)  # the rewritten entry is valid again
    assert (third.stats.hits, third.stats.rejected) == (5, 0)


def test_identity_separates_weights_resolution_and_precision(extractor, tmp_path):
    base = FeatureCache(tmp_path, extractor, SIZE)
    assert FeatureCache(tmp_path, extractor, SIZE).key == base.key
    assert FeatureCache(tmp_path, extractor, SIZE + 32).key != base.key
    assert FeatureCache(tmp_path, extractor, SIZE, compute="cuda/bf16-mixed").key != base.key
    random_weights = build_backbone("efficientnet-lite0", pretrained=False)
    assert FeatureCache(tmp_path, random_weights, SIZE).key != base.key


def assert_rows(features: list, reference: list, recomputed: int, alone: list) -> None:
    """Rows served from the cache equal ``reference``; the recomputed row equals its own extraction.

    (The recomputed image is extracted in a batch of its own, ``alone``.)
    """
    keep = [i for i in range(features[0].shape[0]) if i != recomputed]
    assert_equal([f[keep] for f in features], [r[keep] for r in reference])
    assert_equal([f[recomputed : recomputed + 1] for f in features], alone)


# ------------------------------------------------------------ through fit + test
def run(root: Path, out: Path, fold: int, cache: Path | None, augment: bool = False):
    # batch size 3: no single-image batch for 9 fitting, 3 held-out and 8 test images
    dm = MVTecDataModule(
        str(root), "widget", fold=fold, batch_size=3, num_workers=0, augment=augment,
        feature_cache=None if cache is None else str(cache),
    )  # fmt: skip
    model = GaussianAD("efficientnet-lite0")
    results = run_results(fit_and_test(model, dm, out))
    with open(out / "scores.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    state = {
        k: v
        for k, v in model.state_dict().items()
        if k.startswith(("detector.scorers.", "detector.moments."))
    }
    return results, dm, rows, state


@pytest.mark.slow
@FEW_HELD_OUT
def test_cached_fit_and_test_equal_uncached_exactly_and_folds_share_one_extraction(tiny_mvtec, tmp_path):
    cache_dir = tmp_path / "cache"
    plain, _, rows, state = run(tiny_mvtec, tmp_path / "plain", 0, None)
    results, dm, cached_rows, cached_state = run(tiny_mvtec, tmp_path / "cached", 0, cache_dir)
    stats = dm.feature_source.stats
    assert (stats.hits, stats.misses) == (0, 20)  # all 12 training and 8 test images, once
    assert cached_rows == rows  # every score column of every test image, as text
    assert cached_state.keys() == state.keys()
    for key in state:
        assert torch.equal(cached_state[key], state[key]), key
    assert results["scores"] == plain["scores"]  # every AUROC
    assert results["n_test"] == 8
    _, other_fold, _, _ = run(tiny_mvtec, tmp_path / "fold1", 1, cache_dir)
    stats = other_fold.feature_source.stats
    assert (stats.hits, stats.misses, stats.rejected) == (20, 0, 0)  # another fold: no extraction


@pytest.mark.slow
@DEFAULT_SWITCHES
@FEW_HELD_OUT
def test_augmented_training_reads_images_while_test_reads_the_cache(tiny_mvtec, tmp_path):
    dm = MVTecDataModule(
        str(tiny_mvtec), "widget", fold=0, batch_size=4, num_workers=0, augment=True,
        feature_cache=str(tmp_path / "cache"), image_size=SIZE,
    )  # fmt: skip
    dm.setup("fit")
    dm.configure(DataNeeds(extractor=build_backbone("efficientnet-lite0")))
    train_batch = next(iter(dm.train_dataloader()))
    assert "image" in train_batch and "features" not in train_batch
    test_batch = next(iter(dm.test_dataloader()))
    assert "image" not in test_batch and sorted(test_batch["features"]) == list(range(1, 10))
    assert test_batch["features"][9].shape == (4, 1280)


def test_cache_without_a_feature_method_is_a_user_error(tiny_mvtec, tmp_path):
    dm = MVTecDataModule(
        str(tiny_mvtec), "widget", num_workers=0, feature_cache=str(tmp_path), image_size=SIZE
    )
    dm.setup("test")
    with pytest.raises(UserError, match="feature_cache needs a method on backbone features"):
        dm.test_dataloader()
