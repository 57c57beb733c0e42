"""--data.fit and --data.tiles geometry: pad / crop / stretch, masks on the same canvas, identities."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from anomaly.data import MVTecDataModule
from anomaly.data.image_cache import ResizedImageCache
from anomaly.data.needs import DataNeeds
from anomaly.data.transforms import (
    PAD_FILL,
    RESIZE_RULES,
    Geometry,
    ImagePipeline,
    TileGrid,
    geometry,
    resize_square,
)
from anomaly.errors import UserError
from tests.conftest import make_mvtec_category


@pytest.fixture
def strip() -> np.ndarray:
    """A 20x60 image (3:1) with a distinct value in every pixel column."""
    image = np.zeros((20, 60, 3), np.uint8)
    image[:] = np.arange(60, dtype=np.uint8)[None, :, None] * 4
    return image


def test_stretch_is_todays_square_resize(strip):
    for rule in RESIZE_RULES:
        assert np.array_equal(geometry(rule)(strip, 32), resize_square(strip, 32, rule))
        assert geometry(rule).description == RESIZE_RULES[rule].description  # caches keep their keys


def test_pad_keeps_the_aspect_and_fills_with_the_imagenet_mean(strip):
    padded = geometry("area", "pad")(strip, 30)
    assert padded.shape == (30, 30, 3)
    # 20x60 -> 10x30, centred: rows 10..19 hold the image, the rest is the fill
    expected = cv2.resize(strip, (30, 10), interpolation=cv2.INTER_AREA)
    assert np.array_equal(padded[10:20], expected)
    assert (padded[:10] == PAD_FILL).all() and (padded[20:] == PAD_FILL).all()


def test_crop_keeps_the_aspect_and_cuts_the_long_side(strip):
    cropped = geometry("linear", "crop")(strip, 20)
    assert cropped.shape == (20, 20, 3)
    # 20x60 keeps its size (factor 1); the centre 20 columns are 20..39
    assert np.array_equal(cropped, strip[:, 20:40])


def test_masks_follow_the_same_geometry():
    mask = np.zeros((20, 60), bool)
    mask[5:10, 50:60] = True  # near the right end
    expected = np.zeros((30, 30), bool)  # 20x60 -> 10x30 (nearest), rows 10..19; "normal" elsewhere
    expected[10:20] = cv2.resize(mask.astype(np.uint8), (30, 10), interpolation=cv2.INTER_NEAREST) > 0
    padded = geometry("area", "pad").mask(mask, 30)
    assert np.array_equal(padded, expected) and padded[:, 25:].any()
    assert not geometry("area", "crop").mask(mask, 20).any()  # the crop cut the defect off
    tiled = geometry("area", "stretch", "1x3").mask(mask, 20)
    assert tiled.shape == (20, 60) and np.array_equal(tiled, mask)  # 1x3 tiles of 20: the strip's own size
    image = np.zeros((20, 60, 3), np.uint8)
    image[mask] = 255
    for fit in ("stretch", "pad", "crop"):  # the mask lies where the image's bright pixels went
        g = geometry("area", fit, "1x2")
        on_canvas = g(image, 16)
        placed_mask = g.mask(mask, 16)
        assert on_canvas.shape[:2] == placed_mask.shape == (16, 32)
        if placed_mask.any():
            assert on_canvas[placed_mask].mean() > 200 > on_canvas[~placed_mask].mean()


def test_maps_go_back_onto_the_original_image():
    g = geometry("area", "pad")
    canvas_map = np.zeros((30, 30), np.float32)
    canvas_map[10:20, 25:30] = 1.0  # the right end of the padded strip
    back = g.map_to_image(canvas_map, 20, 60)
    assert back.shape == (20, 60) and back[:, 55:].mean() > 0.9 and back[:, :40].max() == 0
    cropped = geometry("area", "crop").map_to_image(np.ones((4, 4), np.float32), 20, 60)
    assert np.isnan(cropped[:, :15]).all() and np.isfinite(cropped[:, 25:35]).all()


def test_tile_grids_are_parsed_and_checked():
    assert TileGrid.parse("2x3") == TileGrid(2, 3) and TileGrid.parse(3) == TileGrid(1, 3)
    assert str(TileGrid.parse(" 1X4 ")) == "1x4"
    for bad in ("0x2", "axb", "1x2x3", "100x100", "-1"):
        with pytest.raises(UserError, match="tiles must be"):
            TileGrid.parse(bad)
    with pytest.raises(UserError, match="unknown fit rule 'squash': use one of stretch, pad, crop"):
        geometry("area", "squash")


def test_the_data_module_yields_canvas_images_and_masks(tmp_path: Path):
    root = make_mvtec_category(tmp_path / "mvtec", size=24)
    for fit, tiles, shape in (
        ("pad", "1x1", (16, 16)),
        ("crop", "1x3", (16, 48)),
        ("stretch", "2x1", (32, 16)),
    ):
        dm = MVTecDataModule(str(root), "widget", num_workers=0, image_size=16, fit=fit, tiles=tiles)
        dm.configure(DataNeeds(masks=True, tiles=True))
        dm.setup("test")
        batch = next(iter(dm.test_dataloader()))
        assert tuple(batch["image"].shape[2:]) == tuple(batch["mask"].shape[2:]) == shape
        sample = dm.test_samples[int(batch["index"][0])]
        expected = ImagePipeline(16, resize=dm.geometry)
        from anomaly.data.images import load_rgb

        assert np.array_equal(batch["image"][0].numpy(), expected(load_rgb(sample.path)).numpy())
        assert (dm.fit, dm.tiles) == (fit, tiles)


def test_each_layout_has_its_own_cache_identity(tmp_path: Path):
    keys = {
        (fit, tiles): ResizedImageCache(tmp_path, 16, geometry("area", fit, tiles)).entries.key
        for fit in ("stretch", "pad", "crop")
        for tiles in ("1x1", "1x2")
    }
    assert len(set(keys.values())) == len(keys)
    assert keys[("stretch", "1x1")] == ResizedImageCache(tmp_path, 16).entries.key  # old caches stay valid
    assert ResizedImageCache(tmp_path, 16, geometry("area", "pad", "1x2")).shape == (16, 32, 3)


def test_augmented_turns_of_non_square_tiles_are_one_clear_error(strip):
    import albumentations as A

    pipeline = ImagePipeline(16, A.Compose([A.RandomRotate90(p=1.0)]), Geometry(RESIZE_RULES["area"]))
    assert pipeline(strip).shape == (3, 16, 16)
    tiled = ImagePipeline(16, A.Compose([A.Transpose(p=1.0)]), geometry("area", "stretch", "1x2"))
    with pytest.raises(UserError, match="90° turns need square inputs"):
        tiled(strip)
