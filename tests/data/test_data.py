"""Folds, image loading and the MVTec data module."""

from __future__ import annotations

import os
import threading
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import anomaly.data.images as images_module
from anomaly.data import MVTecDataModule
from anomaly.data.augment import CATEGORY_SWITCHES, build_augmentation
from anomaly.data.datasets import ImageDataset
from anomaly.data.folds import kfold_split
from anomaly.data.images import (
    MAX_READ_THREADS,
    file_digests,
    load_mask,
    load_rgb,
    read_in_threads,
    read_threads,
    sha256_file,
)
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


def test_too_few_images_for_the_folds_say_what_to_do():
    with pytest.raises(UserError) as error:
        kfold_split(3, 0)
    assert str(error.value) == (
        "5-fold splits need at least 5 training images, found 3: add normal images, or set data.fold to "
        "null to fit on all of them (with no held-out images for a threshold)"
    )
    assert len(kfold_split(3, None)[0]) == 3


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
@pytest.mark.parametrize("straight_to_rgb", [True, False], ids=["opencv-rgb", "opencv-bgr-converted"])
def test_plain_pngs_are_decoded_by_opencv_with_pillows_pixels(
    tmp_path: Path, mode: str, straight_to_rgb: bool, monkeypatch
):
    if not straight_to_rgb:  # OpenCV before 4.11
        monkeypatch.setattr(images_module, "IMREAD_RGB", None)
    elif images_module.IMREAD_RGB is None:
        pytest.skip("this OpenCV has no IMREAD_COLOR_RGB")
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


def test_damaged_png_is_one_user_error_and_nothing_else_on_stderr(tmp_path: Path, capfd):
    path = tmp_path / "flipped.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8)).save(path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte inside the image data: IEND is intact
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"cannot read image .*flipped\.png"):
        load_rgb(path)
    assert capfd.readouterr().err == ""  # no "libpng error: IDAT: CRC error"


def with_orientation(image: Image.Image, path: Path, orientation: int) -> Path:
    exif = Image.Exif()
    exif[0x0112] = orientation  # EXIF Orientation
    image.save(path, exif=exif.tobytes())
    return path


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L"])
@pytest.mark.parametrize(
    ("orientation", "upright"), [(3, lambda a: np.rot90(a, 2)), (6, lambda a: np.rot90(a, -1))]
)
def test_exif_orientation_is_applied_by_both_decoders(tmp_path: Path, mode, orientation, upright):
    rgb = np.random.default_rng(2).integers(1, 256, size=(12, 20, 3), dtype=np.uint8)
    image = Image.fromarray(rgb).convert(mode)  # RGB and L: OpenCV's path; RGBA: Pillow's
    path = with_orientation(image, tmp_path / "turned.png", orientation)
    expected = upright(np.asarray(image.convert("RGB")))
    np.testing.assert_array_equal(load_rgb(path), expected)
    jpeg = with_orientation(Image.fromarray(rgb), tmp_path / "turned.jpg", orientation)
    assert load_rgb(jpeg).shape == expected.shape
    mask = np.zeros((12, 20), np.uint8)
    mask[:3, :5] = 255
    mask_path = with_orientation(Image.fromarray(mask), tmp_path / "turned_mask.png", orientation)
    np.testing.assert_array_equal(load_mask(mask_path), upright(mask > 0))


def test_32_bit_integer_tiffs_are_scaled_by_their_range_not_clipped(tmp_path: Path):
    values = np.array([[0, 100_000, 2**30, 2**31 - 1, -5]], dtype=np.int32)
    path = tmp_path / "signed.tif"
    Image.fromarray(values, mode="I").save(path)  # Pillow writes signed 32-bit samples
    expected = (np.clip(values, 0, None) / (2**31 - 1) * 255).astype(np.uint8)
    np.testing.assert_array_equal(load_rgb(path)[..., 0], expected)  # 100000 is dark, not white
    tifffile = pytest.importorskip("tifffile")
    unsigned = np.array([[0, 70_000, 2**31, 2**32 - 1]], dtype=np.uint32)
    tifffile.imwrite(tmp_path / "unsigned.tif", unsigned)
    expected = (unsigned / (2**32 - 1) * 255).astype(np.uint8)
    np.testing.assert_array_equal(load_rgb(tmp_path / "unsigned.tif")[..., 0], expected)


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


def test_a_batchs_images_are_read_at_once_on_threads_in_order(monkeypatch):
    monkeypatch.setattr(images_module, "read_threads", lambda: 2)
    both_reading = threading.Barrier(2, timeout=10)  # broken unless the first two are read at once

    def read(key: int) -> int:
        if key < 2:
            both_reading.wait()
        return 10 * key

    assert read_in_threads(read, [0, 1, 2, 3, 4]) == [0, 10, 20, 30, 40]


def test_reading_on_threads_raises_the_first_failure_in_order(monkeypatch):
    monkeypatch.setattr(images_module, "read_threads", lambda: 3)

    def read(key: int) -> int:
        if key in (1, 2):
            raise UserError(f"cannot read image {key}")
        return key

    with pytest.raises(UserError, match="cannot read image 1"):
        read_in_threads(read, [0, 1, 2, 3])


def test_file_digests_are_each_files_sha256_in_order(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(images_module, "read_threads", lambda: 3)
    paths = []
    for i in range(5):
        paths.append(tmp_path / f"{i}.bin")
        paths[-1].write_bytes(bytes([i]) * (3 << 20))  # 3 MiB: hashed in chunks
    assert file_digests(paths) == [sha256_file(path) for path in paths]
    assert len(set(file_digests(paths))) == 5


def test_the_read_threads_share_the_cores_among_the_loaders_workers(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(6)), raising=False)
    for workers, threads in [(None, MAX_READ_THREADS), (2, 3), (4, 1), (8, 1)]:
        info = None if workers is None else SimpleNamespace(num_workers=workers)
        monkeypatch.setattr(images_module, "get_worker_info", lambda info=info: info)
        assert read_threads() == threads


def test_the_loaders_batches_are_the_images_read_one_by_one_on_threads(tiny_mvtec: Path, monkeypatch):
    monkeypatch.setattr(images_module, "read_threads", lambda: 3)
    readers = set()
    read = ImageDataset.read

    def recorded(self, path):
        readers.add(threading.current_thread().name)
        return read(self, path)

    monkeypatch.setattr(ImageDataset, "read", recorded)
    dm = MVTecDataModule(str(tiny_mvtec), "widget", batch_size=5, num_workers=0, image_size=32)
    dm.configure(DataNeeds(masks=True))
    dm.setup("test")
    loader = dm.test_dataloader()
    batches = list(loader)
    assert readers and all(name.startswith("read-images") for name in readers)
    items = [loader.dataset[i] for i in range(len(loader.dataset))]
    for key in ("image", "mask"):
        assert torch.equal(torch.cat([b[key] for b in batches]), torch.stack([item[key] for item in items]))
    assert [path for b in batches for path in b["path"]] == [item["path"] for item in items]


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
