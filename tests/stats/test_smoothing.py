"""Map smoothing against scipy's Gaussian filter."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from anomaly.evaluation.pixel import upsample_maps
from anomaly.stats.smoothing import MapSmoothing, blur_kernel_size


@pytest.mark.parametrize("sigma", [1.0, 4.0])
def test_matches_scipy_gaussian_filter_after_bilinear_upsampling(sigma):
    maps = torch.rand(3, 7, 7, generator=torch.Generator().manual_seed(0))
    smoothed = MapSmoothing(56, sigma)(maps)
    big = upsample_maps(maps, 56).numpy().astype(np.float64)
    expected = np.stack([ndimage.gaussian_filter(m, sigma, mode="mirror", truncate=4.0) for m in big])
    assert smoothed.shape == (3, 56, 56)
    np.testing.assert_allclose(smoothed.numpy(), expected, atol=1e-5)


def test_no_blur_is_the_upsampling_and_the_kernel_covers_four_sigma():
    maps = torch.rand(2, 4, 4, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(MapSmoothing(16, 0.0)(maps), upsample_maps(maps, 16))
    assert blur_kernel_size(4.0) == 33 and blur_kernel_size(1.0) == 9
    with pytest.raises(ValueError, match="sigma"):
        MapSmoothing(16, -1.0)
