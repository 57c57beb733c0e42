"""Overlay PNGs of coarse anomaly maps on their test images.

Each overlay is the image as the detector saw it (its :class:`~anomaly.data.transforms.Geometry`:
resize, fit, tiles), shown at least :data:`MIN_WIDTH` pixels wide (a smaller input is enlarged,
bilinear). Over it, the map upsampled bilinearly, coloured with matplotlib's ``jet`` on one scale
for all the overlays of a run (from the lowest to the highest map value among them), blended at
:data:`OVERLAY_ALPHA`; the ground-truth outline in white where a mask exists; above it, a caption
line with the file name, defect and score (also the PNG's ``Title``). The pixels are composed with
OpenCV and numpy and the caption drawn with PIL in matplotlib's DejaVu Sans: no figure is laid out.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
from matplotlib import font_manager
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor
from torch.nn import functional as F

from anomaly.atomic import write_bytes_atomic
from anomaly.data.datasets import Sample
from anomaly.data.images import load_mask, load_rgb, read_in_threads
from anomaly.data.transforms import Geometry
from anomaly.data.transforms import geometry as make_geometry
from anomaly.detector.maps import OVERLAY_ALPHA, heat_colours
from anomaly.evaluation.plots import png_bytes

#: The narrowest overlay in pixels (the width of the 4-inch figures it replaces, at 100 dpi).
MIN_WIDTH = 400
#: The caption strip's height and font size in pixels (8 pt at 100 dpi), and the outline's width.
CAPTION_HEIGHT, CAPTION_FONT_SIZE, OUTLINE_WIDTH = 24, 11, 2
#: zlib level of the overlays' PNGs: level 6 takes about 30 ms more an overlay for files 10% smaller.
OVERLAY_COMPRESS_LEVEL = 3
WHITE = (255, 255, 255)


def display_size(height: int, width: int) -> tuple[int, int]:
    """(height, width) at which a canvas of ``(height, width)`` is shown: at least :data:`MIN_WIDTH` wide."""
    scale = max(1.0, MIN_WIDTH / width)
    return round(height * scale), round(width * scale)


def draw_outline(rgb: np.ndarray, mask: np.ndarray) -> None:
    """Draw the outline of boolean ``mask`` (any size; resized to ``rgb``'s, bilinear, at 0.5) in white."""
    height, width = rgb.shape[:2]
    smooth = cv2.resize(mask.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR)
    contours, _ = cv2.findContours((smooth > 0.5).astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(rgb, contours, -1, WHITE, OUTLINE_WIDTH, lineType=cv2.LINE_AA)


@functools.cache
def caption_font() -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(font_manager.findfont("DejaVu Sans"), CAPTION_FONT_SIZE)


def caption_strip(text: str, width: int) -> np.ndarray:
    """A white (CAPTION_HEIGHT, width, 3) strip with ``text`` centred in black."""
    strip = Image.new("RGB", (width, CAPTION_HEIGHT), WHITE)
    ImageDraw.Draw(strip).text(
        (width / 2, CAPTION_HEIGHT / 2), text, fill=(0, 0, 0), font=caption_font(), anchor="mm"
    )
    return np.asarray(strip)


def overlay_image(
    rgb: np.ndarray, heat: np.ndarray, low: float, high: float, mask: np.ndarray | None, caption: str
) -> np.ndarray:
    """The overlay's pixels: ``rgb`` (enlarged to ``heat``'s size) under ``heat``'s colours, the outline of
    ``mask`` (``None``: none) and the caption strip above: (CAPTION_HEIGHT + H, W, 3) uint8."""
    height, width = heat.shape
    if rgb.shape[:2] != (height, width):
        rgb = cv2.resize(rgb, (width, height), interpolation=cv2.INTER_LINEAR)
    blended = cv2.addWeighted(rgb, 1 - OVERLAY_ALPHA, heat_colours(heat, low, high), OVERLAY_ALPHA, 0)
    if mask is not None:
        draw_outline(blended, mask)
    return np.concatenate([caption_strip(caption, width), blended])


def write_overlays(
    folder: Path,
    samples: Sequence[Sample],
    maps: Tensor,
    image_size: int,
    scores: Sequence[float],
    geometry: Geometry | None = None,
) -> list[Path]:
    """One PNG per sample (see the module docstring): the image as the detector saw it (``geometry``;
    default a square stretch), its map upsampled to it and the ground-truth outline where a mask
    exists. Files are ranked ``00_<stem>.png``, ``01_...``; each is written whole."""
    folder.mkdir(parents=True, exist_ok=True)
    geometry = geometry or make_geometry()
    height, width = display_size(*geometry.canvas(image_size))
    upsampled = F.interpolate(maps[:, None].float(), size=(height, width), mode="bilinear")[:, 0].numpy()
    low, high = float(maps.min()), float(maps.max())

    def read(sample: Sample) -> tuple[np.ndarray, np.ndarray | None]:
        """The image as the detector saw it, and its mask on the same canvas (or None)."""
        mask = None if sample.mask is None else geometry.mask(load_mask(sample.mask), image_size)
        return geometry(load_rgb(sample.path), image_size), mask

    written = []
    images = read_in_threads(read, list(samples))
    for rank, (sample, (rgb, mask), heat, score) in enumerate(
        zip(samples, images, upsampled, scores, strict=True)
    ):
        caption = f"{Path(sample.path).name}  {sample.defect}  score {score:.2f}"
        pixels = overlay_image(rgb, heat, low, high, mask, caption)
        data = png_bytes(pixels, {"Title": caption}, OVERLAY_COMPRESS_LEVEL)
        written.append(write_bytes_atomic(folder / f"{rank:02d}_{Path(sample.path).stem}.png", data))
    return written


__all__ = ["overlay_image", "write_overlays"]
