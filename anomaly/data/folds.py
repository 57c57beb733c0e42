"""The paper's cross-validation splits.

Gaussian, oc-SVM and autoencoder: ``KFold(5, shuffle=True, random_state=0)`` over
the sorted training images; fold k fits on four fifths and keeps the fifth
(normal only) for validation. The test set is always the whole official one.
"""

from __future__ import annotations

import numpy as np
from sklearn.model_selection import KFold

from anomaly.errors import UserError

N_FOLDS = 5
FOLD_SEED = 0


def check_fold(fold: int | None) -> None:
    if fold is None:
        return
    if isinstance(fold, bool) or not isinstance(fold, int) or not 0 <= fold < N_FOLDS:
        raise UserError(
            f"fold must be an integer in 0..{N_FOLDS - 1} or null (fit on all images), got {fold!r}"
        )


def kfold_split(n_items: int, fold: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Indices (fit, held-out) of ``fold`` over ``n_items`` sorted items.

    ``fold=None`` fits on everything and holds nothing out.
    """
    check_fold(fold)
    indices = np.arange(n_items)
    if fold is None:
        return indices, indices[:0]
    if n_items < N_FOLDS:
        raise UserError(
            f"{N_FOLDS}-fold splits need at least {N_FOLDS} training images, found {n_items}: add normal "
            "images, or set data.fold to null to fit on all of them (with no held-out images for a threshold)"
        )
    splitter = KFold(N_FOLDS, shuffle=True, random_state=FOLD_SEED)
    fit_idx, holdout_idx = list(splitter.split(indices))[fold]
    return fit_idx, holdout_idx
