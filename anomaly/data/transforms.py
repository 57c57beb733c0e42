"""Per-image preprocessing on the loader side: resize (and optionally augment).

The whole image is resized to the backbone's native square resolution (no
crop). Normalisation happens inside the backbone module, on the device, so that
loaders ship compact uint8 tensors and exported detectors take plain images.
"""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np
import torch

#: The rule of :func:`resize_square`, as recorded in the caches' identities.
RESIZE_RULE = "square-resize, area when shrinking, bilinear when enlarging, no crop (OpenCV)"


def resize_square(rgb: np.ndarray, size: int) -> np.ndarray:
    """Resize an (H, W, 3) uint8 image to (size, size, 3).

    Area interpolation when shrinking (anti-aliased), bilinear when enlarging.
    """
    height, width = rgb.shape[:2]
    if (height, width) == (size, size):
        return rgb
    shrinking = height * width > size * size
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    return cv2.resize(rgb, (size, size), interpolation=interpolation)


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """Resize a boolean (H, W) mask with nearest-neighbour sampling."""
    return cv2.resize(mask.astype(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST).astype(bool)


class ImagePipeline:
    """rgb uint8 (H, W, 3) -> resized, optionally augmented, uint8 tensor (3, S, S)."""

    def __init__(self, image_size: int, augment: Callable[..., dict] | None = None) -> None:
        self.image_size = image_size
        self.augment = augment

    def __call__(self, rgb: np.ndarray) -> torch.Tensor:
        image = resize_square(rgb, self.image_size)
        if self.augment is not None:
            image = self.augment(image=image)["image"]
        return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).contiguous()
