"""One pixel limit for every decoder, one alpha rule, and files skipped from image folders counted."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomaly.data import images as images_module
from anomaly.data.images import MAX_PIXELS_VARIABLE, list_images, load_mask, load_rgb
from anomaly.data.mvtec import scan_mvtec
from anomaly.errors import UserError
from tests.conftest import make_mvtec_category


def save(path: Path, shape=(40, 40), mode: str | None = None) -> Path:
    Image.fromarray(np.full(shape, 90, np.uint8), mode=mode).save(path)
    return path


@pytest.mark.parametrize("name", ["plain.png", "photo.jpg", "scan.tif", "palette.bmp"])
def test_an_image_over_the_pixel_limit_is_refused_from_its_header(tmp_path, name, monkeypatch):
    """Bugs 1, 2: a 40 x 40 image against a limit of 1000 pixels, scaled down from 20000 x 20000."""
    path = save(tmp_path / name)
    monkeypatch.setenv(MAX_PIXELS_VARIABLE, "1000")
    monkeypatch.setattr(images_module.cv2, "imread", lambda *a: pytest.fail("decoded by OpenCV"))
    monkeypatch.setattr(Image.Image, "load", lambda *a: pytest.fail("decoded by Pillow"))
    with pytest.raises(UserError, match=r"40x40 = 1,600 pixels, over the limit of 1,000.*ANOMALY_MAX_IMAGE"):
        load_rgb(path)
    with pytest.raises(UserError, match="over the limit"):
        load_mask(path)


def test_the_limit_is_configurable_and_checked(tmp_path, monkeypatch):
    path = save(tmp_path / "x.png")
    monkeypatch.setenv(MAX_PIXELS_VARIABLE, "1600")
    assert load_rgb(path).shape == (40, 40, 3)  # exactly at the limit
    monkeypatch.setenv(MAX_PIXELS_VARIABLE, "lots")
    with pytest.raises(UserError, match="must be a positive number of pixels"):
        load_rgb(path)


def test_pillows_own_bomb_check_gives_way_to_the_one_limit(tmp_path, monkeypatch):
    """Minor 10, bug 1: Pillow warned (several lines) above its limit and raised its own error at twice it."""
    path = save(tmp_path / "x.jpg")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # 1600 pixels: over twice Pillow's limit
    monkeypatch.delenv(MAX_PIXELS_VARIABLE, raising=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_rgb(path).shape == (40, 40, 3)


def test_alpha_is_composited_on_black_for_every_mode(tmp_path):
    """Minor 9: a fully transparent LA PNG read as its grey value, the same picture as RGBA as black."""
    grey, alpha = 200, np.array([[0, 255], [128, 0]], np.uint8)
    la = Image.merge("LA", [Image.fromarray(np.full((2, 2), grey, np.uint8)), Image.fromarray(alpha)])
    la.save(tmp_path / "la.png")
    la.convert("RGBA").save(tmp_path / "rgba.png")
    expected = np.round(grey * alpha.astype(np.float64) / 255.0)
    for name in ("la.png", "rgba.png"):
        rgb = load_rgb(tmp_path / name)
        assert np.abs(rgb[..., 0].astype(int) - expected).max() <= 1, name
        assert (rgb == rgb[..., :1]).all()


@pytest.mark.skipif(os.name != "posix", reason="symbolic links")
def test_files_skipped_from_an_image_folder_are_counted_with_their_reasons(tmp_path):
    """Minor 1: .webp and .gif files, broken symlinks and symlink loops vanished without a word."""
    folder = tmp_path / "good"
    folder.mkdir()
    save(folder / "a.png")
    Image.new("RGB", (4, 4)).save(folder / "b.webp")
    Image.new("P", (4, 4)).save(folder / "c.gif")
    (folder / "d.png").symlink_to(tmp_path / "missing.png")
    (folder / "e.png").symlink_to(folder / "e.png")
    (folder / ".DS_Store").write_bytes(b"")
    (folder / "sub").mkdir()
    with pytest.warns(UserWarning) as caught:
        assert list_images(folder) == [folder / "a.png"]
    (message,) = [str(w.message) for w in caught]
    assert "skipped 4 file(s)" in message
    for reason in ("1 broken symbolic link", "1 symbolic link loop", "(.gif)", "(.webp)"):
        assert reason in message


def test_a_category_with_skipped_files_says_so(tmp_path):
    root = make_mvtec_category(tmp_path, n_train=3, n_good=1, n_bad=1, size=8)
    (root / "widget" / "train" / "good" / "notes.txt").write_text("not an image")
    with pytest.warns(UserWarning, match=r"train/good: skipped 1 file\(s\).*unsupported type \(\.txt\)"):
        train, _ = scan_mvtec(root, "widget")
    assert len(train) == 3


def test_folders_without_skipped_files_stay_silent(tmp_path):
    root = make_mvtec_category(tmp_path, n_train=3, n_good=1, n_bad=1, size=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scan_mvtec(root, "widget")
