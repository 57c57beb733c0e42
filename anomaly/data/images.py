"""Reading images from disk as 8-bit RGB arrays."""

from __future__ import annotations

from pathlib import Path

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


def load_rgb(path: str | Path) -> np.ndarray:
    """An image as an (H, W, 3) uint8 array; greyscale, palette and RGBA become RGB."""
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
