"""Working points (paper Sec. III-B, eqs. 7-8, Table IV).

If ``M(x)^2`` of normal data is chi-squared with ``D`` degrees of freedom, the
threshold for a target false-positive rate is ``t = sqrt(F_D^{-1}(1 - FPR))``
(eq. 8). The closed form exists per level only; sum mode has none, so an
empirical threshold from held-out normal images serves any score.
"""

from __future__ import annotations

import math

import torch
from scipy.stats import chi2
from torch import Tensor

from anomaly.errors import UserError

SIGMA_ROWS = (1, 2, 3, 4, 5)
DEFAULT_TARGET_FPR = 0.01  # the working point of the training runs, the CLI and the Python API


def sigma_fpr(n: float) -> float:
    """The two-sided n-sigma false-positive rate, ``1 - erf(n / sqrt(2))`` (Table IV's rows)."""
    return math.erfc(n / math.sqrt(2.0))


def check_fpr(fpr: float) -> float:
    if not 0.0 < float(fpr) < 1.0:
        raise UserError(f"target_fpr must lie strictly between 0 and 1, got {fpr}")
    return float(fpr)


def chi2_threshold(dim: int, fpr: float) -> float:
    """Eq. (8): ``sqrt(F_D^{-1}(1 - FPR))`` (via the survival function, exact for tiny FPR)."""
    return math.sqrt(float(chi2.isf(check_fpr(fpr), dim)))


def empirical_threshold(normal_scores: Tensor, fpr: float) -> float:
    """The smallest threshold at which at most ``fpr`` of ``normal_scores`` lie above it.

    With ``m`` normal scores sorted ascending this is the ``ceil(m (1 - fpr))``-th one,
    so the achieved held-out FPR is ``<= fpr``; for tiny FPR it is their maximum.
    """
    check_fpr(fpr)
    values = torch.sort(normal_scores.to(torch.float64)).values
    if values.numel() == 0:
        raise ValueError("an empirical threshold needs held-out normal scores")
    rank = min(values.numel(), max(1, math.ceil(values.numel() * (1.0 - fpr))))
    return float(values[rank - 1])


def rates_at_threshold(scores: Tensor, labels: Tensor, threshold: float) -> tuple[float, float]:
    """(FPR, TPR): the share of normal and of anomalous images scored above ``threshold``."""
    above = scores.to(torch.float64) > threshold
    normal, anomalous = labels == 0, labels == 1
    fpr = float(above[normal].double().mean()) if normal.any() else math.nan
    tpr = float(above[anomalous].double().mean()) if anomalous.any() else math.nan
    return fpr, tpr
