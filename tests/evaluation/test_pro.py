"""PRO (Bergmann et al. 2021) against a brute-force threshold sweep with scipy's labelling."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from anomaly.evaluation.pro import area_up_to, pixel_auroc_and_pro, pro_curve, pro_score

EIGHT = np.ones((3, 3), dtype=int)


def brute_force_pro(maps: np.ndarray, masks: np.ndarray, max_fpr: float = 0.3) -> float:
    """Threshold at every distinct value; mean region overlap and normal-pixel FPR; area to max_fpr."""
    regions = []
    for i, mask in enumerate(masks):
        labels, count = ndimage.label(mask > 0, structure=EIGHT)
        regions += [(i, labels == k) for k in range(1, count + 1)]
    normal = masks == 0
    points = [(0.0, 0.0)]
    for t in np.unique(maps)[::-1]:
        above = maps >= t
        fpr = (above & normal).sum() / normal.sum()
        pro = np.mean([(above[i] & region).sum() / region.sum() for i, region in regions])
        points.append((fpr, pro))
    fprs, pros = np.array(points).T
    # integrate the piecewise-linear curve on a fine grid as an independent check
    grid = np.linspace(0.0, max_fpr, 300001)
    return float(np.trapezoid(np.interp(grid, fprs, pros), grid) / max_fpr)


def hand_made(seed: int, n: int = 4, size: int = 12) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), dtype=np.uint8)
    masks[0, 2:5, 2:6] = 1  # two regions in one image, one of a single pixel
    masks[0, 9, 9] = 1
    masks[1, 6:11, 1:3] = 1
    masks[1, 5, 3] = 1  # touches (6, 2) diagonally: one 8-connected region
    maps = rng.normal(size=masks.shape) + 1.5 * masks
    maps = np.round(maps, 1)  # ties across normal and anomalous pixels
    return maps, masks


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_a_brute_force_threshold_sweep(seed):
    maps, masks = hand_made(seed)
    assert pro_score(maps, masks) == pytest.approx(brute_force_pro(maps, masks), abs=1e-6)
    assert pro_score(maps, masks, max_fpr=1.0) == pytest.approx(brute_force_pro(maps, masks, 1.0), abs=1e-6)


def test_regions_are_eight_connected_and_averaged_over_regions_not_pixels():
    masks = np.zeros((1, 6, 6), dtype=np.uint8)
    masks[0, 0:2, 0:2] = 1  # 4 pixels
    masks[0, 2, 2] = 1  # diagonal neighbour: same region (5 pixels)
    masks[0, 5, 5] = 1  # a second region of one pixel
    maps = np.zeros((1, 6, 6))
    maps[0, 5, 5] = 1.0  # only the small region is found, with no false positive
    fpr, pro = pro_curve(maps, masks)
    assert fpr[1] == 0.0 and pro[1] == pytest.approx(0.5)  # 1 of 2 regions, not 1 of 6 pixels


def test_perfect_and_reversed_maps():
    _, masks = hand_made(0)
    assert pro_score(masks.astype(float), masks) == pytest.approx(1.0)
    assert pro_score(-masks.astype(float), masks) == pytest.approx(0.0)


def test_masks_with_channel_axis_and_no_region():
    maps, masks = hand_made(1)
    assert pro_score(maps, masks[:, None]) == pytest.approx(pro_score(maps, masks))
    assert math.isnan(pro_score(maps, np.zeros_like(masks)))
    with pytest.raises(ValueError, match="shape"):
        pro_curve(maps[:, :5], masks)


def test_area_interpolates_at_the_limit():
    x, y = np.array([0.0, 0.2, 0.4, 1.0]), np.array([0.0, 0.5, 1.0, 1.0])
    # up to 0.3: triangle to 0.2 (0.05) plus trapezoid 0.2..0.3 from 0.5 to 0.75 (0.0625)
    assert area_up_to(x, y, 0.3) == pytest.approx(0.1125)
    assert area_up_to(x, y, 1.0) == pytest.approx(0.05 + 0.15 + 0.6)


@pytest.mark.parametrize("seed", [0, 3])
def test_pixel_auroc_from_the_same_sort_matches_sklearn(seed):
    maps, masks = hand_made(seed)
    auroc, pro = pixel_auroc_and_pro(maps.astype(np.float32), masks)
    assert auroc == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-12)
    assert pro == pytest.approx(pro_score(maps, masks), abs=1e-12)
    assert all(math.isnan(v) for v in pixel_auroc_and_pro(maps, np.zeros_like(masks)))
