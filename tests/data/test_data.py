"""Folds, image loading and the MVTec data module."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import anomaly.data.images as images_module
from anomaly.data import MVTecDataModule
from anomaly.data.augment import CATEGORY_SWITCHES, build_augmentation
from anomaly.data.folds import kfold_split
from anomaly.data.images import load_rgb
from anomaly.data.needs import DataNeeds
from anomaly.errors import UserError
from tests.conftest import BOTTLE, DEFAULT_SWITCHES, make_mvtec_category, require


def test_folds_are_deterministic_disjoint_and_cover_the_train_set():
    n = 23
    held_out = []
    for fold in range(5):
        fit, holdout = kfold_split(n, fold)
        again_fit, again_holdout = kfold_split(n, fold)
        assert np.array_equal(fit, again_fit) and np.array_equal(holdout, again_holdout)
        assert not set(fit) & set(holdout)
        assert sorted([*fit, *holdout]) == list(range(n))
        held_out.extend(holdout)
    assert sorted(held_out) == list(range(n))  # each image is held out exactly once
    fit_all, holdout_none = kfold_split(n, None)
    assert len(fit_all) == n and len(holdout_none) == 0


@pytest.mark.parametrize("fold", [-1, 5, 2.0, True])
def test_bad_folds_are_rejected(fold):
    with pytest.raises(UserError, match="fold"):
        kfold_split(10, fold)


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "I;16", "RGB"])
def test_images_of_any_mode_load_as_rgb(tmp_path: Path, mode: str):
    rgb = np.random.default_rng(0).integers(0, 255, size=(9, 7, 3), dtype=np.uint8)
    image = Image.fromarray(rgb)
    if mode == "I;16":
        image = Image.fromarray(rgb[..., 0].astype(np.uint16) * 257)
    elif mode != "RGB":
        image = image.convert(mode)
    path = tmp_path / "x.png"
    image.save(path)
    loaded = load_rgb(path)
    assert loaded.shape == (9, 7, 3) and loaded.dtype == np.uint8
    if mode in ("L", "I;16"):
        assert np.array_equal(loaded[..., 0], loaded[..., 1]) and np.array_equal(
            loaded[..., 1], loaded[..., 2]
        )
    if mode == "I;16":
        assert np.abs(loaded[..., 0].astype(int) - rgb[..., 0]).max() <= 1


def pillow_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_plain_pngs_are_decoded_by_opencv_with_pillows_pixels(tmp_path: Path, mode: str, monkeypatch):
    rgb = np.random.default_rng(1).integers(0, 256, size=(37, 53, 3), dtype=np.uint8)
    path = tmp_path / "x.png"
    Image.fromarray(rgb).convert(mode).save(path)
    expected = pillow_rgb(path)
    monkeypatch.setattr(images_module.Image, "open", lambda *a, **k: pytest.fail("Pillow was used"))
    np.testing.assert_array_equal(load_rgb(path), expected)


def test_real_pngs_decode_alike_with_opencv_and_pillow():
    files = sorted((require(BOTTLE) / "test" / "broken_large").glob("*.png"))[:3]
    for path in files:
        np.testing.assert_array_equal(load_rgb(path), pillow_rgb(path))


@pytest.mark.parametrize("keep", [10, 60, 0.5])
def test_truncated_png_is_one_user_error_and_nothing_else_on_stderr(tmp_path: Path, keep, capfd):
    path = tmp_path / "cut.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8)).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: int(keep * len(data)) if isinstance(keep, float) else keep])
    with pytest.raises(UserError, match=r"cannot read image .*cut\.png"):
        load_rgb(path)
    assert capfd.readouterr().err == ""  # e.g. no "libpng error" from a native decoder


def test_greyscale_category_loads_as_three_channels(tmp_path: Path):
    root = make_mvtec_category(tmp_path, grey=True)
    dm = MVTecDataModule(str(root), "widget", fold=0, batch_size=4, num_workers=0, image_size=32)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 3, 32, 32) and batch["image"].dtype == torch.uint8
    assert torch.equal(batch["image"][:, 0], batch["image"][:, 2])


def test_datamodule_splits_labels_and_masks(tiny_mvtec: Path):
    dm = MVTecDataModule(str(tiny_mvtec), "widget", fold=2, batch_size=100, num_workers=0, image_size=24)
    dm.configure(DataNeeds(masks=True))  # a model that asks for the test masks
    dm.setup("fit")
    assert len(dm.fit_samples) + len(dm.holdout_samples) == 12
    assert not {s.path for s in dm.fit_samples} & {s.path for s in dm.holdout_samples}
    test = next(iter(dm.test_dataloader()))
    assert test["label"].tolist() == [0] * 4 + [1] * 4
    assert test["mask"].shape == (8, 1, 24, 24)
    assert test["mask"][:4].sum() == 0 and (test["mask"][4:].flatten(1).sum(1) > 0).all()
    assert test["has_mask"].tolist() == [False] * 4 + [True] * 4


def test_masks_are_optional(tmp_path: Path):
    root = make_mvtec_category(tmp_path, masks=False)
    dm = MVTecDataModule(str(root), "widget", num_workers=0, image_size=16)
    dm.configure(DataNeeds(masks=True))
    dm.setup("test")
    assert "mask" not in next(iter(dm.test_dataloader()))


@DEFAULT_SWITCHES
def test_augmented_epochs_are_seeded_and_differ(tiny_mvtec: Path):
    def epoch_images(seed: int, epoch: int, workers: int) -> torch.Tensor:
        dm = MVTecDataModule(str(tiny_mvtec), "widget", batch_size=3, num_workers=workers, image_size=32,
                             augment=True, seed=seed)  # fmt: skip
        dm.setup("fit")
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(epoch)
        return torch.cat([b["image"] for b in loader])

    first = epoch_images(0, 0, 0)
    assert torch.equal(first, epoch_images(0, 0, 2))  # same seed, any number of workers
    assert not torch.equal(first, epoch_images(0, 1, 0))  # another epoch
    assert not torch.equal(first, epoch_images(1, 0, 0))  # another seed


def test_every_category_has_switches_and_builds():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a known category says nothing
        for category in CATEGORY_SWITCHES:
            build_augmentation(category)
    assert len(CATEGORY_SWITCHES) == 15
    with pytest.warns(UserWarning, match="category 'my_parts' has no augmentation switches of its own"):
        build_augmentation("my_parts")


def test_bottle_test_set_has_a_mask_for_every_defective_image():
    dm = MVTecDataModule(str(require(BOTTLE).parent), "bottle", num_workers=0)
    _, test = dm.samples()
    defective = [s for s in test if s.label == 1]
    assert len(defective) == 63 and all(s.mask is not None and Path(s.mask).is_file() for s in defective)
    assert all(s.mask is None for s in test if s.label == 0)


@DEFAULT_SWITCHES
def test_the_data_module_obeys_the_needs_it_is_configured_with(tiny_mvtec: Path):
    dm = MVTecDataModule(str(tiny_mvtec), "widget", fold=0, batch_size=4, num_workers=0, augment=True)
    dm.configure(DataNeeds(image_size=32, shuffle=True, pad=True, noise=False))
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert dm.image_size == 32 and loader.sampler.shuffle and loader.sampler.pad
    assert not [t for t in loader.dataset.pipeline.augment.transforms if "GaussNoise" in repr(t)]
    assert "mask" not in next(iter(dm.test_dataloader()))  # no model asked for the masks
    given = MVTecDataModule(str(tiny_mvtec), "widget", num_workers=0, image_size=24)
    given.configure(DataNeeds(image_size=32))
    assert given.image_size == 24  # the user's size wins
    plain = MVTecDataModule(str(tiny_mvtec), "widget", num_workers=0, augment=True, image_size=32)
    plain.setup("fit")
    assert not plain.train_dataloader().sampler.shuffle  # the default needs: in order, with noise
