"""The supervised classifier's splits: pooled, stratified, three-way (Table V, VIII).

The classifier needs anomalies to train on, so the official MVTec split is not
used. The category's training and test images are pooled and split with
``StratifiedKFold(5, shuffle=True, random_state=0)`` on the binary label; fold
``i`` validates on part ``i``, tests on part ``(i + 1) mod 5`` and trains on the
other three, so every part keeps the pool's anomaly prevalence.
"""

from __future__ import annotations

import numpy as np
from sklearn.model_selection import StratifiedKFold

from anomaly.data.datasets import Sample
from anomaly.data.folds import FOLD_SEED, N_FOLDS, check_fold
from anomaly.data.mvtec import MVTecDataModule
from anomaly.errors import UserError


def stratified_three_way_split(labels: np.ndarray, fold: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices (train, val, test) of ``fold``: val = part ``fold``, test = part ``fold + 1`` (mod 5)."""
    check_fold(fold)
    if fold is None:
        raise UserError("the supervised split needs a fold in 0..4 (it has no 'fit on all' mode)")
    labels = np.asarray(labels)
    smallest = min(np.sum(labels == 0), np.sum(labels == 1))
    if smallest < N_FOLDS:
        raise UserError(
            f"the stratified {N_FOLDS}-fold split needs at least {N_FOLDS} normal and {N_FOLDS} anomalous "
            f"images, found {int(np.sum(labels == 0))} and {int(np.sum(labels == 1))}"
        )
    splitter = StratifiedKFold(N_FOLDS, shuffle=True, random_state=FOLD_SEED)
    parts = [part for _, part in splitter.split(np.zeros(len(labels)), labels)]
    val, test = parts[fold], parts[(fold + 1) % N_FOLDS]
    train = np.sort(np.concatenate([p for i, p in enumerate(parts) if i not in (fold, (fold + 1) % N_FOLDS)]))
    return train, val, test


class StratifiedMVTecDataModule(MVTecDataModule):
    """One MVTec AD category, pooled and split three ways for supervised training.

    ``fit_samples`` (train), ``holdout_samples`` (val, with anomalies) and
    ``test_samples`` (test) replace the official split; loaders, augmentation and
    options are those of :class:`~anomaly.data.mvtec.MVTecDataModule`.
    """

    def pool(self) -> list[Sample]:
        """The category's training images followed by its test images."""
        train, test = self.samples()
        return [*train, *test]

    def three_way(self) -> tuple[list[Sample], list[Sample], list[Sample]]:
        pool = self.pool()
        train, val, test = stratified_three_way_split(np.array([s.label for s in pool]), self.fold)
        return [pool[i] for i in train], [pool[i] for i in val], [pool[i] for i in test]

    def split(self) -> tuple[list[Sample], list[Sample]]:
        train, val, _ = self.three_way()
        return train, val

    @property
    def test_samples(self) -> list[Sample]:
        return self.three_way()[2]
