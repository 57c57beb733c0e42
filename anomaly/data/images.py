"""Reading images from disk as 8-bit RGB arrays.

8-bit greyscale and RGB PNGs (all of MVTec AD) are decoded by OpenCV, about
1.6x faster than Pillow on a 900x900 image and, PNG being lossless, with the
same pixels; every other file goes through Pillow.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from anomaly.errors import UserError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def list_images(folder: Path) -> list[Path]:
    """The image files directly inside ``folder``, sorted by name."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if is_image_file(p))


def _to_uint8(image: Image.Image) -> Image.Image:
    """16-bit and float greyscale images are rescaled to 8 bits before RGB conversion."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        return Image.fromarray(np.clip(array / top * 255.0, 0, 255).astype(np.uint8), mode="L")
    return image


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"
PNG_GREY, PNG_RGB = 0, 2  # IHDR colour types without alpha or palette


def _is_plain_png(path: str | Path) -> bool:
    """A complete 8-bit greyscale or RGB PNG (IHDR: bit depth at byte 24, colour type at byte 25).

    A truncated file (no IEND chunk at the end) goes to Pillow, whose error is clearer.
    """
    try:
        with open(path, "rb") as handle:
            head = handle.read(26)
            handle.seek(-len(PNG_END), 2)
            tail = handle.read()
    except OSError:
        return False
    return (
        len(head) == 26
        and tail == PNG_END
        and head[:8] == PNG_SIGNATURE
        and head[12:16] == b"IHDR"
        and head[24] == 8
        and head[25] in (PNG_GREY, PNG_RGB)
    )


def _load_plain_png(path: str | Path) -> np.ndarray | None:
    """OpenCV's decoding of a plain PNG as RGB (no EXIF rotation, as Pillow); None if it fails."""
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    return None if bgr is None else cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def load_rgb(path: str | Path) -> np.ndarray:
    """An image as an (H, W, 3) uint8 array; greyscale, palette and RGBA become RGB."""
    if _is_plain_png(path):
        image = _load_plain_png(path)
        if image is not None:
            return image
    try:
        with Image.open(path) as image:
            image = _to_uint8(image)
            if image.mode == "RGBA" or (image.mode == "P" and "transparency" in image.info):
                image = image.convert("RGBA")
                background = Image.new("RGBA", image.size, (0, 0, 0, 255))
                image = Image.alpha_composite(background, image)
            return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as error:
        raise UserError(f"cannot read image {path}: {error}") from error


def load_mask(path: str | Path) -> np.ndarray:
    """A ground-truth mask as an (H, W) bool array (any non-zero pixel is anomalous)."""
    try:
        with Image.open(path) as image:
            return np.asarray(_to_uint8(image).convert("L")) > 0
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as error:
        raise UserError(f"cannot read mask {path}: {error}") from error
