"""Image-level metrics."""

from __future__ import annotations

import math

import numpy as np
import torch
from sklearn.metrics import roc_auc_score


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


def image_auroc(scores: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` (higher = more anomalous) for 0/1 ``labels``.

    Computed in float64 by ``sklearn.metrics.roc_auc_score`` (torchmetrics' AUROC
    works in float32, which can tie nearby large distances and rounds the result).
    NaN when the labels hold a single class (AUROC is undefined then).
    """
    scores = torch.as_tensor(scores).detach().to("cpu", torch.float64).numpy()
    labels = torch.as_tensor(labels).detach().to("cpu", torch.long).numpy()
    if labels.size == 0 or labels.min() == labels.max():
        return math.nan
    return float(roc_auc_score(labels, scores))
