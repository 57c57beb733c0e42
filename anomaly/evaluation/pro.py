"""Per-region overlap (PRO) of anomaly maps, integrated up to a false positive rate of 0.3.

Bergmann, Batzner, Fauser, Sattlegger, Steger, "The MVTec Anomaly Detection Dataset"
(IJCV 2021), Sec. 5.2: every connected component of the ground-truth masks is one
region. At a threshold ``t``, a region's overlap is the fraction of its pixels with
``map >= t``; PRO(t) is the mean overlap over all regions of all test images, and
FPR(t) the fraction of normal pixels (outside every region, normal images included)
with ``map >= t``. The score is the area under PRO over FPR from 0 to ``max_fpr``
(0.3), divided by ``max_fpr`` so that a perfect map scores 1.

The curve is exact at every distinct map value: each anomalous pixel carries
``1 / (region size)`` and each normal pixel 1; sorting the pixels by decreasing
score and taking cumulative sums gives PRO and FPR at every threshold at once.
Regions are 8-connected (OpenCV), as in :mod:`anomaly.evaluation.connected_components`.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import torch

from anomaly.evaluation.connected_components import CONNECTIVITY

MAX_FPR = 0.3


Array = torch.Tensor | np.ndarray


def _as_array(x: Array) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def pro_curve(maps: Array, masks: Array) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, PRO) at every distinct value of ``maps`` (N, H, W), ascending FPR, starting at (0, 0).

    ``masks`` (N, H, W) (or (N, 1, H, W)): nonzero = anomalous. :class:`ValueError` if the
    masks hold no region or no normal pixel, or the shapes differ.
    """
    fpr, pro, _ = pixel_curves(maps, masks)
    return fpr, pro


def pixel_curves(maps: Array, masks: Array) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(FPR, PRO, TPR) at every distinct map value, from one sort of the pixels (see :func:`pro_curve`).

    FPR and TPR are the pixel ROC curve (TPR: the fraction of all anomalous pixels above the
    threshold), PRO the per-region overlap.
    """
    maps = _as_array(maps)
    maps = maps.astype(np.float64 if maps.dtype == np.float64 else np.float32, copy=False)
    masks = _as_array(masks)
    if masks.ndim == 4:
        masks = masks[:, 0]
    if maps.shape != masks.shape:
        raise ValueError(f"maps {maps.shape} and masks {masks.shape} differ in shape")
    normal_weight = np.zeros(maps.shape, dtype=np.float64)
    region_weight = np.zeros(maps.shape, dtype=np.float64)
    regions = 0
    for i, mask in enumerate(masks):
        count, labels, stats, _ = cv2.connectedComponentsWithStats(
            np.ascontiguousarray(mask > 0, dtype=np.uint8), connectivity=CONNECTIVITY
        )
        normal_weight[i] = labels == 0
        sizes = stats[:, cv2.CC_STAT_AREA].astype(np.float64)
        inverse = np.where(np.arange(count) > 0, 1.0 / sizes, 0.0)
        region_weight[i] = inverse[labels]
        regions += count - 1
    normal_pixels = normal_weight.sum()
    if regions == 0 or normal_pixels == 0:
        raise ValueError("PRO needs masks with at least one anomalous region and one normal pixel")
    order = np.argsort(-maps.ravel(), kind="stable")
    scores = maps.ravel()[order]
    fpr = np.cumsum(normal_weight.ravel()[order]) / normal_pixels
    pro = np.cumsum(region_weight.ravel()[order]) / regions
    anomalous = region_weight.ravel()[order] > 0
    tpr = np.cumsum(anomalous) / anomalous.sum()
    last_of_ties = np.append(scores[1:] != scores[:-1], True)
    curves = [np.concatenate([[0.0], np.clip(c[last_of_ties], 0.0, 1.0)]) for c in (fpr, pro, tpr)]
    return curves[0], curves[1], curves[2]


def area_up_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoidal area under the polyline (x ascending) from x[0] to ``x_max``, interpolated there."""
    inside = x <= x_max
    xs, ys = x[inside], y[inside]
    if xs[-1] < x_max and inside.sum() < len(x):
        nxt = int(inside.sum())
        x0, x1, y0, y1 = x[nxt - 1], x[nxt], y[nxt - 1], y[nxt]
        y_at = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)
        xs, ys = np.append(xs, x_max), np.append(ys, y_at)
    return float(np.trapezoid(ys, xs)) if hasattr(np, "trapezoid") else float(np.trapz(ys, xs))


def pro_score(
    maps: torch.Tensor | np.ndarray, masks: torch.Tensor | np.ndarray, max_fpr: float = MAX_FPR
) -> float:
    """Area under the PRO curve up to ``max_fpr``, divided by ``max_fpr`` (1 = perfect).

    NaN when the masks hold no anomalous region or no normal pixel.
    """
    if not 0.0 < max_fpr <= 1.0:
        raise ValueError(f"max_fpr must be in (0, 1], got {max_fpr}")
    return pixel_auroc_and_pro(maps, masks, max_fpr)[1]


def pixel_auroc_and_pro(maps: Array, masks: Array, max_fpr: float = MAX_FPR) -> tuple[float, float]:
    """(pixel AUROC, :func:`pro_score`) from one sort of the pixels; NaNs without a region."""
    anomalous = _as_array(masks) > 0
    if not anomalous.any() or anomalous.all():
        return math.nan, math.nan
    fpr, pro, tpr = pixel_curves(maps, masks)
    return area_up_to(fpr, tpr, 1.0), area_up_to(fpr, pro, max_fpr) / max_fpr


__all__ = ["MAX_FPR", "area_up_to", "pixel_auroc_and_pro", "pixel_curves", "pro_curve", "pro_score"]
