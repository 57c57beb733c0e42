"""Pixel-level scores of coarse anomaly maps against ground-truth masks."""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.nn import functional as F
from torchmetrics.functional.classification import binary_auroc

from anomaly.evaluation.metrics import to_unit_interval
from anomaly.evaluation.pro import pro_score


def upsample_maps(maps: Tensor, size: int) -> Tensor:
    """Coarse ``(N, k, k)`` maps bilinearly upsampled to ``(N, size, size)``."""
    return F.interpolate(maps[:, None].float(), size=(size, size), mode="bilinear", align_corners=False)[:, 0]


def pixel_auroc(maps: Tensor, masks: Tensor) -> float:
    """Pixel-level AUROC of coarse maps ``(N, k, k)`` against masks ``(N, 1, S, S)`` (torchmetrics).

    NaN when every pixel has the same label.
    """
    target = (masks[:, 0] > 0).reshape(-1).to(torch.long)
    if target.min() == target.max():
        return math.nan
    preds = upsample_maps(maps, masks.shape[-1]).reshape(-1)
    return float(binary_auroc(to_unit_interval(preds), target).item())


def pixel_pro(maps: Tensor, masks: Tensor) -> float:
    """PRO up to FPR 0.3 (:func:`~anomaly.evaluation.pro.pro_score`) of maps ``(N, k, k)`` upsampled
    to masks ``(N, 1, S, S)`` as for :func:`pixel_auroc`. NaN without an anomalous region."""
    return pro_score(upsample_maps(maps, masks.shape[-1]).to(torch.float32), masks[:, 0] > 0)


__all__ = ["pixel_auroc", "pixel_pro", "upsample_maps"]
