"""Image-resolution anomaly maps: bilinear upsampling, then a Gaussian blur (as PaDiM's maps).

A map of per-position distances (``pooling: cells`` at a level's own resolution) is
upsampled bilinearly to the image and smoothed by a Gaussian of standard deviation
``sigma`` pixels, truncated at 4 sigma (kernel ``2 * int(4 sigma + 0.5) + 1`` wide) with
mirrored borders: ``scipy.ndimage.gaussian_filter(..., mode="mirror", truncate=4.0)``.
Defined for any map, label-free; ``sigma = 0`` is the plain upsampling.
"""

from __future__ import annotations

from torch import Tensor
from torch.nn import functional as F
from torchvision.transforms.functional import gaussian_blur


def blur_kernel_size(sigma: float) -> int:
    """Odd kernel width covering ``sigma`` out to 4 standard deviations (scipy's ``truncate=4``)."""
    return 2 * int(4.0 * sigma + 0.5) + 1


class MapSmoothing:
    """Upsample ``(N, h, w)`` maps to ``(N, size, size)`` and blur them by ``sigma`` pixels."""

    def __init__(self, size: int, sigma: float = 4.0) -> None:
        if size < 1:
            raise ValueError(f"size must be a positive number of pixels, got {size}")
        if sigma < 0:
            raise ValueError(f"sigma must be >= 0 pixels, got {sigma}")
        self.size, self.sigma = size, float(sigma)

    def __call__(self, maps: Tensor) -> Tensor:
        big = F.interpolate(
            maps[:, None].float(), size=(self.size, self.size), mode="bilinear", align_corners=False
        )
        if self.sigma > 0:
            width = min(blur_kernel_size(self.sigma), 2 * self.size - 1)  # reflect padding's limit
            big = gaussian_blur(big, kernel_size=[width, width], sigma=[self.sigma, self.sigma])
        return big[:, 0]


__all__ = ["MapSmoothing", "blur_kernel_size"]
