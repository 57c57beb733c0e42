"""The resized-image cache: hits, misses, stale and corrupt entries, and cached == uncached runs."""

from __future__ import annotations

import csv
import errno
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import anomaly.data.image_cache as image_cache_module
from anomaly.data import MVTecDataModule
from anomaly.data.image_cache import ResizedImageCache, file_key
from anomaly.data.images import load_rgb
from anomaly.data.transforms import resize_square
from anomaly.errors import UserError
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

SIZE = 32


@pytest.fixture
def images(tmp_path: Path) -> list[Path]:
    return write_noise_images(tmp_path / "images", 3, 60, 70)


def decoded(path: Path) -> np.ndarray:
    return resize_square(load_rgb(path), SIZE)


def forbid_decoding(monkeypatch) -> None:
    def refuse(path):
        raise AssertionError(f"{path} was decoded although its entry is in the cache")

    monkeypatch.setattr(image_cache_module, "load_rgb", refuse)


def test_miss_writes_an_entry_and_a_hit_reads_it_without_decoding(images, tmp_path, monkeypatch):
    cache = ResizedImageCache(tmp_path / "cache", SIZE)
    first = [cache.load(p) for p in images]
    for image, path in zip(first, images, strict=True):
        assert image.shape == (SIZE, SIZE, 3) and image.dtype == np.uint8
        np.testing.assert_array_equal(image, decoded(path))
    assert len(list((tmp_path / "cache").rglob("*.img"))) == 3
    assert (cache.entries.path / "identity.json").is_file()
    forbid_decoding(monkeypatch)
    again = ResizedImageCache(tmp_path / "cache", SIZE)  # e.g. the next run, or a loader worker
    for image, path in zip(first, images, strict=True):
        np.testing.assert_array_equal(again.load(path), image)


def test_each_resolution_has_its_own_entries(images, tmp_path):
    small, large = ResizedImageCache(tmp_path, SIZE), ResizedImageCache(tmp_path, 2 * SIZE)
    assert small.entries.key != large.entries.key
    assert large.load(images[0]).shape == (2 * SIZE, 2 * SIZE, 3)
    np.testing.assert_array_equal(small.load(images[0]), decoded(images[0]))


def test_a_changed_file_is_decoded_again_not_served_stale(images, tmp_path):
    cache = ResizedImageCache(tmp_path / "cache", SIZE)
    old_key = file_key(images[1])
    cache.load(images[1])
    before = images[1].stat()
    Image.fromarray(np.full((60, 70, 3), 9, np.uint8)).save(images[1])  # same path, new content
    os.utime(images[1], ns=(before.st_atime_ns, before.st_mtime_ns))  # even with the old time set back
    assert file_key(images[1]) != old_key
    np.testing.assert_array_equal(cache.load(images[1]), np.full((SIZE, SIZE, 3), 9, np.uint8))


def wait_past_the_clock_tick(stat: os.stat_result, folder: Path) -> None:
    """Until a file changed now gets a later change time than ``stat``'s (file system clocks are coarse)."""
    probe = folder / "clock_probe"
    probe.touch()
    while probe.stat().st_ctime_ns <= stat.st_ctime_ns:
        probe.touch()
    probe.unlink()


def test_a_rewrite_of_the_same_size_with_the_old_time_set_back_is_noticed(tmp_path):
    """Uncompressed BMPs of one size: only the change time tells the two contents apart."""
    path = tmp_path / "same_size.bmp"
    Image.fromarray(np.full((60, 70, 3), 10, np.uint8)).save(path)
    cache = ResizedImageCache(tmp_path / "cache", SIZE)
    cache.load(path)
    before = path.stat()
    wait_past_the_clock_tick(before, tmp_path)
    Image.fromarray(np.full((60, 70, 3), 200, np.uint8)).save(path)  # rewritten in place
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (
        before.st_size,
        before.st_mtime_ns,
        before.st_ino,
    )
    np.testing.assert_array_equal(cache.load(path), np.full((SIZE, SIZE, 3), 200, np.uint8))


@pytest.mark.parametrize("damage", ENTRY_DAMAGES)
def test_corrupt_or_mismatched_entry_is_decoded_again_and_rewritten(images, tmp_path, damage, monkeypatch):
    cache = ResizedImageCache(tmp_path / "cache", SIZE)
    for path in images:
        cache.load(path)
    entry, other = (cache.entries.entry_path(file_key(images[i])) for i in (1, 0))
    damage_entry(entry, damage, other)
    np.testing.assert_array_equal(cache.load(images[1]), decoded(images[1]))
    forbid_decoding(monkeypatch)  # the rewritten entry is valid again
    np.testing.assert_array_equal(cache.load(images[1]), decoded(images[1]))


def test_unusable_cache_folder_is_a_user_error(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(UserError, match="cannot use image cache folder"):
        ResizedImageCache(blocker / "cache", SIZE)


def read_only(monkeypatch, folder: Path) -> None:
    """``folder`` as on a read-only mount (tests may run as root, for whom permissions do not bind)."""
    real_mkdir, real_replace = Path.mkdir, os.replace

    def refuse(path) -> None:
        if Path(path).is_relative_to(folder):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    def mkdir(self, mode=0o777, parents=False, exist_ok=False):
        if not (exist_ok and self.is_dir()):
            refuse(self)
        return real_mkdir(self, mode, parents, exist_ok)

    def replace(source, target, *args, **kwargs):
        refuse(target)
        return real_replace(source, target, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    monkeypatch.setattr(os, "replace", replace)


@pytest.mark.parametrize("known_resolution", [True, False])
def test_read_only_cache_reads_what_it_holds_and_warns_once(images, tmp_path, monkeypatch, known_resolution):
    root = tmp_path / "cache"
    ResizedImageCache(root, SIZE).load(images[0])  # an entry made before the folder became read-only
    before = sorted(root.rglob("*"))
    read_only(monkeypatch, root)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cache = ResizedImageCache(root, SIZE if known_resolution else 2 * SIZE)
        loaded = [cache.load(p) for p in images]
    expected = [resize_square(load_rgb(p), SIZE if known_resolution else 2 * SIZE) for p in images]
    for image, wanted in zip(loaded, expected, strict=True):
        np.testing.assert_array_equal(image, wanted)
    (warning,) = [str(w.message) for w in caught]
    assert "cannot be written" in warning and "slower" in warning
    assert sorted(root.rglob("*")) == before


def test_missing_image_is_a_user_error_naming_it(tmp_path):
    with pytest.raises(UserError, match=r"cannot read image .*gone\.png"):
        ResizedImageCache(tmp_path, SIZE).load(tmp_path / "gone.png")


# ------------------------------------------------------------ through the loaders
def datamodule(root: Path, cache: Path | None, **options) -> MVTecDataModule:
    dm = MVTecDataModule(
        str(root), "widget", fold=0, batch_size=4, image_size=SIZE,
        image_cache=None if cache is None else str(cache), **options,
    )  # fmt: skip
    dm.setup("fit")
    return dm


def batches(loader) -> list[torch.Tensor]:
    return [batch["image"] for batch in loader]


@pytest.mark.parametrize("workers", [0, 2])
def test_loaders_yield_the_same_images_with_the_cache_cold_and_warm(tiny_mvtec, tmp_path, workers):
    plain = datamodule(tiny_mvtec, None, num_workers=0)
    cached = datamodule(tiny_mvtec, tmp_path / "cache", num_workers=workers)
    for name in ("train_dataloader", "holdout_dataloader", "test_dataloader"):
        reference = batches(getattr(plain, name)())
        for _ in ("cold", "warm"):
            assert all(map(torch.equal, batches(getattr(cached, name)()), reference)), name
    n_images = len(plain.samples()[0]) + len(plain.samples()[1])
    assert len(list((tmp_path / "cache").rglob("*.img"))) == n_images


@DEFAULT_SWITCHES
def test_augmented_epochs_equal_with_and_without_the_cache(tiny_mvtec, tmp_path):
    """Augmentation follows the resize, so reading resized images changes nothing."""
    plain = datamodule(tiny_mvtec, None, num_workers=0, augment=True)
    cached = datamodule(tiny_mvtec, tmp_path / "cache", num_workers=0, augment=True)
    first_batches = []
    for epoch in range(2):
        loaders = plain.train_dataloader(), cached.train_dataloader()
        for loader in loaders:
            loader.sampler.set_epoch(epoch)
        pairs = list(zip(*map(batches, loaders), strict=True))
        assert all(torch.equal(a, b) for a, b in pairs)
        first_batches.append(pairs[0][0])
    assert not torch.equal(*first_batches), "the second epoch must be augmented anew"


@pytest.mark.slow
@FEW_HELD_OUT
def test_fit_and_test_with_the_image_cache_equal_the_plain_run(tiny_mvtec, tmp_path):
    def run(cache: Path | None, out: Path, features: Path | None = None) -> tuple[list[dict], dict]:
        dm = MVTecDataModule(
            str(tiny_mvtec), "widget", fold=0, batch_size=3, num_workers=0,
            image_cache=None if cache is None else str(cache),
            feature_cache=None if features is None else str(features),
        )  # fmt: skip
        model = GaussianAD("efficientnet-lite0")
        results = run_results(fit_and_test(model, dm, out))
        with open(out / "scores.csv", newline="") as handle:
            return list(csv.DictReader(handle)), results["scores"]

    plain = run(None, tmp_path / "plain")
    assert run(tmp_path / "cache", tmp_path / "cold") == plain
    assert run(tmp_path / "cache", tmp_path / "warm") == plain
    # the feature cache extracts through the image cache
    assert run(tmp_path / "both", tmp_path / "both_run", features=tmp_path / "features") == plain
    assert len(list((tmp_path / "both").rglob("*.img"))) == 20  # 12 training and 8 test images
