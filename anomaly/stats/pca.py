"""PCA and negated PCA (NPCA) of a level's features (paper Sec. IV-A, Table III).

Components are the eigenvectors of the training features' covariance, ordered
by explained variance ratio, largest first. With ``k`` the first index where the
cumulative ratio exceeds ``t``:

* ``pca`` keeps components ``0..k`` (the high-variance ones; "PCA 99%" is t = 0.99);
* ``npca`` keeps components ``k-1..end`` (the low-variance ones; "NPCA x%" is t = 1 - x,
  so NPCA 1% is t = 0.99 and NPCA 0.01% is t = 0.9999).

Centred, ``n`` feature vectors span at most ``n - 1`` directions, so at most
``min(n - 1, D)`` components exist. (sklearn's ``PCA(n_components=None)`` returns
``min(n, D)``: with ``n <= D`` its last one has zero variance and an arbitrary
direction in the null space, which NPCA would otherwise keep.) The Gaussian is
then fitted again in the reduced space.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

from anomaly.errors import UserError

REDUCTIONS = ("none", "pca", "npca")


def check_reduction(reduction: str, variance_threshold: float | None) -> tuple[str, float | None]:
    """Validate the options; returns (reduction, threshold) with the threshold's default."""
    name = str(reduction).strip().lower()
    if {"pca", "npca"} <= set(re.split(r"[^a-z]+", name)):
        raise UserError("choose one reduction: 'pca' or 'npca', not both")
    if name not in REDUCTIONS:
        raise UserError(f"unknown reduction '{reduction}': choose one of {', '.join(REDUCTIONS)}")
    if name == "none":
        return name, None
    threshold = 0.99 if variance_threshold is None else float(variance_threshold)
    if not 0.0 < threshold < 1.0:
        raise UserError(f"variance_threshold must lie strictly between 0 and 1, got {variance_threshold}")
    return name, threshold


def principal_components(emp_cov: Tensor, n_samples: int) -> tuple[Tensor, Tensor]:
    """(explained variance ratios, components as columns), largest variance first.

    At most ``min(n_samples - 1, D)`` components are returned: the rank of the centred features.
    """
    eigval, eigvec = torch.linalg.eigh(emp_cov.to(torch.float64))
    eigval, eigvec = eigval.flip(0).clamp(min=0.0), eigvec.flip(1)
    keep = max(min(n_samples - 1, emp_cov.shape[0]), 1)
    total = eigval.sum()
    ratio = eigval / total if total > 0 else torch.zeros_like(eigval)
    return ratio[:keep], eigvec[:, :keep]


def select_components(ratio: Tensor, reduction: str, threshold: float) -> slice:
    """The slice of (sorted) components that ``reduction`` keeps at ``threshold``."""
    exceeds = torch.nonzero(torch.cumsum(ratio, 0) > threshold)
    count = ratio.numel()
    if exceeds.numel() == 0:  # the cumulative ratio never exceeds t (t close to 1)
        if reduction == "pca":
            return slice(0, count)
        raise UserError(f"npca at variance_threshold {threshold} keeps zero components: lower the threshold")
    k = int(exceeds[0])
    selected = slice(0, k + 1) if reduction == "pca" else slice(max(k - 1, 0), count)
    if selected.stop - selected.start <= 0:
        raise UserError(f"{reduction} at variance_threshold {threshold} keeps zero components")
    return selected


def reduction_projection(emp_cov: Tensor, n_samples: int, reduction: str, threshold: float) -> Tensor:
    """The (D, k) matrix whose columns span the kept components."""
    ratio, components = principal_components(emp_cov, n_samples)
    return components[:, select_components(ratio, reduction, threshold)].contiguous()
