"""Image-level metrics (torchmetrics)."""

from __future__ import annotations

import math

import torch
from torchmetrics.functional.classification import binary_auroc


def to_unit_interval(scores: torch.Tensor) -> torch.Tensor:
    """Map scores monotonically into [0, 1] (float64, ties kept).

    torchmetrics treats predictions outside [0, 1] as logits and applies a
    sigmoid, which saturates for distances such as Mahalanobis scores and
    turns them into ties. AUROC only depends on the order, so rescaling is exact.
    """
    scores = scores.to(torch.float64)
    low, high = scores.min(), scores.max()
    if high == low:
        return torch.zeros_like(scores)
    return (scores - low) / (high - low)


def image_auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve of ``scores`` (higher = more anomalous) for 0/1 ``labels``.

    NaN when the labels hold a single class (AUROC is undefined then).
    """
    labels = labels.to(torch.long)
    if labels.numel() == 0 or labels.min() == labels.max():
        return math.nan
    return float(binary_auroc(to_unit_interval(scores), labels).item())
