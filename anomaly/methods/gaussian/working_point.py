"""Working points of a fitted Gaussian detector (Table IV and beyond).

Per level, the chi-squared threshold of eq. (8) for the n-sigma rows and the
user's target FPR; beside it, for any score including the sum, the empirical
threshold at which the fold's held-out normal images reach the target FPR.
Achieved FPR and TPR are measured on the test set.
"""

from __future__ import annotations

from torch import Tensor

from anomaly.methods.base import SUM
from anomaly.stats.threshold import (
    SIGMA_ROWS,
    chi2_threshold,
    empirical_threshold,
    rates_at_threshold,
    sigma_fpr,
)

MAHALANOBIS = "mahalanobis"


def _row(
    target_fpr: float, column: str, rows: dict[str, Tensor], labels: Tensor,
    holdout: dict[str, Tensor] | None, dim: int | None,
) -> dict:  # fmt: skip
    entry: dict = {"target_fpr": target_fpr}
    if dim is not None:
        threshold = chi2_threshold(dim, target_fpr)
        fpr, tpr = rates_at_threshold(rows[column], labels, threshold)
        entry.update(chi2_threshold=threshold, chi2_fpr=fpr, chi2_tpr=tpr)
    if holdout is not None:
        threshold = empirical_threshold(holdout[column], target_fpr)
        fpr, tpr = rates_at_threshold(rows[column], labels, threshold)
        entry.update(empirical_threshold=threshold, empirical_fpr=fpr, empirical_tpr=tpr)
    return entry


def working_point_report(
    levels: list[int],
    dims: list[int],
    rows: dict[str, Tensor],
    labels: Tensor,
    holdout: dict[str, Tensor] | None,
    target_fpr: float,
) -> dict:
    """The ``working_point`` section of ``results.json``.

    ``levels``/``dims``: each level and its (reduced) dimensionality D.
    ``rows``: test score columns; ``holdout``: the held-out normal images' columns, or None.
    """
    targets = [(n, sigma_fpr(n)) for n in SIGMA_ROWS] + [(None, target_fpr)]
    report: dict = {"target_fpr": target_fpr, "levels": {}, "empirical": {}}
    if holdout is not None:  # the empirical thresholds cannot tell FPRs below 1 / m apart
        report["holdout_images"] = int(next(iter(holdout.values())).numel())
    for level, dim in zip(levels, dims, strict=True):
        column = f"{MAHALANOBIS}/{level}"
        report["levels"][str(level)] = {
            "dim": dim,
            "rows": [{"n_sigma": n, **_row(fpr, column, rows, labels, holdout, dim)} for n, fpr in targets],
        }
    if holdout is not None:
        column = f"{MAHALANOBIS}/{SUM}"
        report["sum"] = {
            "rows": [{"n_sigma": n, **_row(fpr, column, rows, labels, holdout, None)} for n, fpr in targets]
        }
        for column in rows:
            report["empirical"][column] = _row(target_fpr, column, rows, labels, holdout, None)
    return report
