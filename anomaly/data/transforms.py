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

from anomaly.errors import UserError

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


#: The largest square input side: 8x the largest backbone resolution of the paper (EfficientNet-B7, 600 px).
MAX_IMAGE_SIZE = 4800


def check_image_size(image_size: int, batch_size: int = 1) -> None:
    """:class:`UserError` for a size below 1 or above :data:`MAX_IMAGE_SIZE`, with an estimate of the cost."""
    if image_size < 1:
        raise UserError(f"image_size must be a positive number of pixels or null, got {image_size}")
    if image_size > MAX_IMAGE_SIZE:
        batch_gib = batch_size * 3 * image_size**2 * 4 / 2**30
        raise UserError(
            f"image_size {image_size} is over the limit of {MAX_IMAGE_SIZE} px: a batch of {batch_size} "
            f"such images is {batch_gib:,.1f} GiB as float32 before the backbone, which needs many times "
            "that; use the backbone's resolution (leave image_size unset) or a few hundred pixels"
        )


class ImagePipeline:
    """rgb uint8 (H, W, 3) -> resized, optionally augmented, uint8 tensor (3, S, S)."""

    def __init__(self, image_size: int, augment: Callable[..., dict] | None = None) -> None:
        check_image_size(image_size)
        self.image_size = image_size
        self.augment = augment

    def __call__(self, rgb: np.ndarray) -> torch.Tensor:
        image = resize_square(rgb, self.image_size)
        if self.augment is not None:
            image = self.augment(image=image)["image"]
        return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).contiguous()
