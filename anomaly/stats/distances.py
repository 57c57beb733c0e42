"""Anomaly scores of feature vectors under a fitted Gaussian.

All three come from the same features in one pass:

* Mahalanobis, eq. (2): ``M(x) = sqrt((x - mu)^T Sigma^-1 (x - mu))``.
* L2 (fixed-variance univariate Gaussian): ``||x - mu||``.
* SED, eq. (9): ``sqrt(sum_d (x_d - mu_d)^2 / s_d^2)`` with the unbiased std.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from anomaly.columns import SUM, column_name

SCORE_TYPES = ("mahalanobis", "l2", "sed")


def mahalanobis(x: Tensor, mean: Tensor, precision: Tensor) -> Tensor:
    """Eq. (2) for each row of ``x`` (n, D); the squared form is clamped at 0."""
    diff = x.to(precision.dtype) - mean
    squared = ((diff @ precision) * diff).sum(dim=1)
    return torch.sqrt(torch.clamp(squared, min=0.0))


def l2_distance(x: Tensor, mean: Tensor) -> Tensor:
    """Euclidean distance of each row of ``x`` to ``mean``."""
    return torch.linalg.vector_norm(x.to(mean.dtype) - mean, dim=1)


def standardised_euclidean(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """Eq. (9). Features with zero training variance (dead ReLUs) are left out."""
    alive = std > 0
    diff = (x.to(mean.dtype) - mean)[:, alive] / std[alive]
    return torch.linalg.vector_norm(diff, dim=1)


def level_columns(levels: Sequence[int], per_level: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """``{"<type>/<level>": (B,)}`` for every score type and level, plus the sum mode ``"<type>/sum"``."""
    columns: dict[str, Tensor] = {}
    for level, scores in zip(levels, per_level, strict=True):
        for score_type, values in scores.items():
            columns[column_name(score_type, level)] = values
    for score_type in per_level[0]:
        columns[column_name(score_type, None)] = sum(columns[column_name(score_type, lv)] for lv in levels)
    return columns


__all__ = ["SCORE_TYPES", "SUM", "l2_distance", "level_columns", "mahalanobis", "standardised_euclidean"]
