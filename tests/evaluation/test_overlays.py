"""Overlay PNGs of anomaly maps: the image as the detector saw it, the map in jet on one scale, outlines."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
import torch
from matplotlib.colors import Normalize
from PIL import Image

from anomaly.data.datasets import Sample
from anomaly.data.transforms import geometry
from anomaly.detector.maps import OVERLAY_ALPHA, heat_colours
from anomaly.evaluation.overlays import CAPTION_HEIGHT, MIN_WIDTH, display_size, write_overlays

GREY = 128


def grey_image(path: Path, height: int = 48, width: int = 64) -> str:
    Image.fromarray(np.full((height, width, 3), GREY, np.uint8)).save(path)
    return str(path)


def square_mask(path: Path, height: int = 48, width: int = 64) -> str:
    """Anomalous in the middle half of each side."""
    mask = np.zeros((height, width), np.uint8)
    mask[height // 4 : 3 * height // 4, width // 4 : 3 * width // 4] = 255
    Image.fromarray(mask).save(path)
    return str(path)


def read(path: Path) -> tuple[np.ndarray, dict]:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).astype(int), dict(image.text)


def blended(colour: np.ndarray) -> np.ndarray:
    return np.round((1 - OVERLAY_ALPHA) * GREY + OVERLAY_ALPHA * colour)


def test_heat_colours_are_matplotlibs_jet_on_the_given_scale():
    values = np.random.default_rng(0).uniform(-2, 12, size=(20, 30))
    expected = matplotlib.colormaps["jet"](Normalize(0.0, 10.0)(values), bytes=True)[..., :3]
    np.testing.assert_array_equal(heat_colours(values, 0.0, 10.0), expected)


def test_overlay_shows_the_map_on_one_scale_the_outline_and_the_caption(tmp_path: Path):
    image = grey_image(tmp_path / "part.png")
    samples = [
        Sample(image, 1, "crack", square_mask(tmp_path / "part_mask.png")),
        Sample(grey_image(tmp_path / "plain.png"), 0, "good"),
    ]
    hot = torch.zeros(2, 2)
    hot[0, 0] = 10.0  # hot in the top-left cell only
    maps = torch.stack([hot, torch.full((2, 2), 5.0)])  # the second: half of the first's top, everywhere
    paths = write_overlays(tmp_path / "maps", samples, maps, 32, [7.25, 1.5])
    assert [p.name for p in paths] == ["00_part.png", "01_plain.png"]

    first, text = read(paths[0])
    assert first.shape == (CAPTION_HEIGHT + MIN_WIDTH, MIN_WIDTH, 3)  # a 32 px input, shown 400 px wide
    assert text["Title"] == "part.png  crack  score 7.25"
    caption, picture = first[:CAPTION_HEIGHT], first[CAPTION_HEIGHT:]
    assert (caption == 255).all(axis=2).mean() > 0.8 and (caption < 100).all(axis=2).any()  # black on white
    # the map, bilinear: jet's top (dark red) in the hot cell's corner, its bottom (dark blue) in the others
    top, bottom = heat_colours(np.array([10.0, 0.0]), 0.0, 10.0)
    np.testing.assert_allclose(picture[50, 50], blended(top), atol=1)
    np.testing.assert_allclose(picture[300, 300], blended(bottom), atol=1)
    np.testing.assert_allclose(picture[100, 330], blended(bottom), atol=1)
    assert picture[150, 150, 0] > picture[250, 250, 0] and picture[150, 150, 2] < picture[250, 250, 2]
    # the ground truth's outline in white on the mask's edge (rows and columns 100..300), nowhere far from it
    white = (picture >= 250).all(axis=2)
    assert white[195:205, 97:104].any() and white[97:104, 195:205].any() and white[296:304, 195:205].any()
    assert not white[150:250, 150:250].any() and not white[:80].any()

    # one scale for all overlays: the second map (5 everywhere) is jet's middle, not its top
    second, text = read(paths[1])
    assert text["Title"] == "plain.png  good  score 1.50"
    middle = heat_colours(np.array([5.0]), 0.0, 10.0)[0]
    expected = np.broadcast_to(blended(middle), (MIN_WIDTH, MIN_WIDTH, 3))
    np.testing.assert_allclose(second[CAPTION_HEIGHT:], expected, atol=1)
    assert not (second[CAPTION_HEIGHT:] >= 250).all(axis=2).any()  # no mask, no outline


def test_a_wide_canvas_is_shown_at_its_own_size_with_the_map_over_its_tiles(tmp_path: Path):
    sample = Sample(grey_image(tmp_path / "strip.png", 40, 360), 1, "dent")
    maps = torch.zeros(1, 2, 6)
    maps[0, :, 4:] = 1.0  # the third tile is hot
    (path,) = write_overlays(tmp_path / "maps", [sample], maps, 160, [3.0], geometry("area", "pad", "1x3"))
    picture, _ = read(path)
    assert picture.shape == (CAPTION_HEIGHT + 160, 480, 3)  # the 160 x 480 canvas, not enlarged
    picture = picture[CAPTION_HEIGHT:]
    assert picture[80, 420, 0] > picture[80, 420, 2] + 40  # the third tile red
    assert picture[80, 60, 2] > picture[80, 60, 0] + 40  # the first blue


def test_display_width_is_never_below_the_minimum():
    assert display_size(224, 224) == (400, 400)
    assert display_size(224, 672) == (224, 672)
    assert display_size(300, 200) == (600, 400)


def test_a_caption_outside_latin_1_is_kept_in_the_png(tmp_path: Path):
    name = "é-日本.png"
    sample = Sample(grey_image(tmp_path / name), 1, "crack")
    (path,) = write_overlays(tmp_path / "maps", [sample], torch.rand(1, 2, 2), 32, [1.0])
    assert read(path)[1]["Title"] == f"{name}  crack  score 1.00"
