"""--data.resize: the resize rules, and that the rule reaches every place an image is resized."""

from __future__ import annotations

import json
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import pytest

from anomaly.backbones import build_backbone
from anomaly.cli import main as fit_main
from anomaly.data import MVTecDataModule
from anomaly.data.image_cache import ResizedImageCache
from anomaly.data.images import load_rgb
from anomaly.data.transforms import RESIZE_RULE, RESIZE_RULES, ImagePipeline, resize_square
from anomaly.detector import GaussianDetector
from anomaly.detector.file import METADATA_FILE
from anomaly.detector.inputs import recorded_resize
from anomaly.errors import UserError
from anomaly.features import FeatureCache
from tests.conftest import FEW_HELD_OUT, write_noise_images
from tests.detector.helpers import LEVELS, demo_images, fit_demo_detector


@pytest.fixture
def photo() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (90, 70, 3), dtype=np.uint8)


def test_linear_is_albumentations_resize_and_area_is_opencv_area(photo):
    # the paper's code: albumentations.Resize(h, w) (bilinear, no anti-aliasing), shrinking and enlarging
    for size in (32, 128):
        expected = A.Resize(size, size)(image=photo)["image"]
        assert np.array_equal(resize_square(photo, size, "linear"), expected)
    area = cv2.resize(photo, (32, 32), interpolation=cv2.INTER_AREA)
    assert np.array_equal(resize_square(photo, 32), area)  # the default: area when shrinking
    assert np.array_equal(resize_square(photo, 32, "area"), area)
    enlarged = cv2.resize(photo, (128, 128), interpolation=cv2.INTER_LINEAR)
    assert np.array_equal(resize_square(photo, 128), enlarged)  # ... bilinear when enlarging
    cubic = cv2.resize(photo, (32, 32), interpolation=cv2.INTER_CUBIC)
    assert np.array_equal(resize_square(photo, 32, "cubic"), cubic)
    assert not np.array_equal(resize_square(photo, 32, "linear"), area)
    assert RESIZE_RULES["area"].description == RESIZE_RULE  # existing caches keep their identity
    with pytest.raises(UserError, match="unknown resize rule 'lanczos': use one of area, linear, cubic"):
        resize_square(photo, 32, "lanczos")


def test_the_data_module_resizes_with_its_rule(tiny_mvtec: Path, tmp_path: Path):
    images = {}
    for rule in ("area", "linear"):
        dm = MVTecDataModule(str(tiny_mvtec), "widget", num_workers=0, image_size=20, resize=rule)
        dm.setup("fit")
        loaders = (
            (dm.train_dataloader(), dm.fit_samples),
            (dm.val_dataloader(), dm.holdout_samples),
            (dm.test_dataloader(), dm.test_samples),
        )
        for loader, samples in loaders:
            batch = next(iter(loader))
            sample = samples[int(batch["index"][0])]
            expected = ImagePipeline(20, resize=rule)(load_rgb(sample.path))
            assert np.array_equal(batch["image"][0].numpy(), expected.numpy())
        images[rule] = expected
        dm.image_cache = str(tmp_path / "images")
        assert dm.resized_images().resize.name == rule
    assert not np.array_equal(images["area"].numpy(), images["linear"].numpy())
    with pytest.raises(UserError, match="unknown resize rule"):
        MVTecDataModule(str(tiny_mvtec), "widget", resize="nearest-ish")


def test_each_rule_has_its_own_cache_identities(tmp_path: Path):
    (path,) = write_noise_images(tmp_path / "images", 1, 60, 70)
    caches = {rule: ResizedImageCache(tmp_path / "cache", 32, rule) for rule in ("area", "linear")}
    assert caches["area"].entries.key != caches["linear"].entries.key
    assert caches["area"].entries.key == ResizedImageCache(tmp_path / "cache", 32).entries.key
    for rule, cache in caches.items():
        assert np.array_equal(cache.load(path), resize_square(load_rgb(path), 32, rule))
        assert json.loads((cache.entries.path / "identity.json").read_text())["resize"] == (
            RESIZE_RULES[rule].description
        )
    extractor = build_backbone("efficientnet-lite0")
    area = FeatureCache(tmp_path / "features", extractor, 32)
    linear = FeatureCache(tmp_path / "features", extractor, 32, resize="linear")
    assert area.key != linear.key and area.identity["resize"] == RESIZE_RULE


@pytest.mark.slow
@FEW_HELD_OUT
def test_run_name_and_detector_record_the_rule(tmp_path: Path, capsys):
    args = ["--config", "paper", "--data.resize", "linear", "--data.num_workers", "0",
            "--model.levels", "[2]", "--trainer.default_root_dir", str(tmp_path),
            "--trainer.enable_progress_bar", "false", "--figures", "false"]  # fmt: skip
    assert fit_main(args) == 0
    (run_dir,) = tmp_path.glob("gaussian/*/demo/fold_0")
    assert run_dir.parent.parent.name == "efficientnet-lite0_levels-2_resize-linear"
    meta = json.loads((run_dir / METADATA_FILE).read_text())
    assert meta["preprocessing"]["resize"] == "linear"
    assert GaussianDetector.load(run_dir / "detector.safetensors").resize == "linear"
    assert fit_main([*args, "--data.resize", "bogus"]) == 2
    assert "error: unknown resize rule 'bogus'" in capsys.readouterr().err


def test_detector_scores_with_its_rule_and_older_files_mean_area(tmp_path: Path):
    train, good, bad = demo_images()
    paper = {"backbone": "efficientnet-lite0", "levels": LEVELS, "pooling": "global", "batch_size": 8}
    linear = GaussianDetector(**paper, resize="linear")
    linear.fit(train)
    loaded = GaussianDetector.load(linear.save(tmp_path / "linear.safetensors"))
    assert loaded.resize == "linear"
    np.testing.assert_allclose(loaded.score_samples(good + bad), linear.score_samples(good + bad), rtol=1e-6)
    area = fit_demo_detector()  # the same detector with the default rule (area), fitted once per session
    assert area.resize == "area" and area.get_params() | {"resize": "linear"} == linear.get_params()
    assert not np.allclose(area.score_samples(good), linear.score_samples(good))
    # files written before the rule was recorded by name: a description, or nothing, means area
    assert recorded_resize({"resize": "cv2 INTER_AREA when shrinking, INTER_LINEAR when enlarging"}) == "area"
    assert recorded_resize({"image_size": 224}) == "area" and recorded_resize(None) == "area"
    assert recorded_resize({"resize": "linear"}) == "linear"
