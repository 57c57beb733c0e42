"""Turning what a user points at (folder, glob, file, arrays) into detector input."""

from __future__ import annotations

import fnmatch
import glob
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from anomaly.data.images import IMAGE_EXTENSIONS, is_image_file, load_rgb
from anomaly.data.transforms import ImagePipeline
from anomaly.errors import UserError


def expand_input(spec: str | Path, exclude: Sequence[str] = ()) -> Iterator[Path]:
    """The image files named by ``spec``, sorted: a folder (searched recursively), a glob, or one file.

    A single file is yielded whatever its extension, so that an unreadable one is
    reported rather than skipped. Files whose name matches a pattern of ``exclude``
    (e.g. ``*.png`` for masks stored beside JPEG images) are left out.
    """
    for path in _expand(spec):
        if not any(fnmatch.fnmatch(path.name, pattern) for pattern in exclude):
            yield path


def _expand(spec: str | Path) -> Iterator[Path]:
    path = Path(spec).expanduser()
    if path.is_dir():
        yield from sorted(p for p in path.rglob("*") if is_image_file(p))
    elif path.is_file():
        yield path
    elif glob.has_magic(str(spec)):
        matches = sorted(Path(p) for p in glob.iglob(str(path), recursive=True))
        yield from (p for p in matches if is_image_file(p))
    else:
        raise UserError(
            f"input not found: {spec} (give a folder, a glob such as 'dir/*.png', or an image file)"
        )


def rgb_array(image: np.ndarray) -> np.ndarray:
    """An (H, W) grey or (H, W, 3) RGB uint8 array as (H, W, 3) uint8."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise UserError(f"images must be uint8 arrays (0..255), got {image.dtype}")
    if image.ndim == 2:
        return np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim == 3 and image.shape[2] == 3:
        return image
    raise UserError(f"an image must be (H, W) or (H, W, 3), got shape {image.shape}")


def image_batch(items, image_size: int) -> Tensor:
    """(B, 3, S, S) uint8 from paths, (H, W[, 3]) uint8 arrays, or a ready (B, 3, S, S) tensor."""
    if isinstance(items, Tensor):
        if items.ndim != 4 or items.shape[1] != 3 or tuple(items.shape[2:]) != (image_size, image_size):
            raise UserError(
                f"image tensors must be (B, 3, {image_size}, {image_size}), got {tuple(items.shape)}"
            )
        return items
    pipeline = ImagePipeline(image_size)
    images = [
        pipeline(load_rgb(item) if isinstance(item, (str, Path)) else rgb_array(item)) for item in items
    ]
    return torch.stack(images)


class PredictionDataset(Dataset):
    """Image files as the detector sees them; an unreadable file yields its error instead of an image."""

    def __init__(self, paths: list[Path], image_size: int) -> None:
        self.paths = paths
        self.pipeline = ImagePipeline(image_size)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        path = self.paths[index]
        size = self.pipeline.image_size
        height = width = 0  # the original size, for maps at the image's own size
        try:
            if path.suffix.lower() not in IMAGE_EXTENSIONS:
                raise UserError(f"not an image file (expected one of {', '.join(IMAGE_EXTENSIONS)})")
            rgb = load_rgb(path)
            (height, width), image, error = rgb.shape[:2], self.pipeline(rgb), ""
        except Exception as exc:  # unreadable, truncated, wrong format: reported in the output
            image = torch.zeros(3, size, size, dtype=torch.uint8)
            error = " ".join(str(exc).split()) or type(exc).__name__
        return {"image": image, "error": error, "index": index, "height": height, "width": width}
