"""The supervised classifier's pooled, stratified three-way split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sklearn.model_selection import StratifiedKFold

from anomaly.data import MVTecDataModule
from anomaly.data.supervised import StratifiedMVTecDataModule, stratified_three_way_split
from anomaly.errors import UserError
from tests.conftest import make_mvtec_category


def test_split_is_disjoint_stratified_and_covers_the_pool():
    labels = np.array([0] * 83 + [1] * 27)
    parts = [p for _, p in StratifiedKFold(5, shuffle=True, random_state=0).split(labels, labels)]
    tested = []
    for fold in range(5):
        train, val, test = stratified_three_way_split(labels, fold)
        assert not set(train) & set(val) and not set(train) & set(test) and not set(val) & set(test)
        assert sorted([*train, *val, *test]) == list(range(len(labels)))
        np.testing.assert_array_equal(val, parts[fold])
        np.testing.assert_array_equal(test, parts[(fold + 1) % 5])
        for part in (val, test):  # the pool's prevalence, up to one image per class
            assert abs(labels[part].sum() - 27 / 5) < 1 and abs((1 - labels[part]).sum() - 83 / 5) < 1
        assert abs(labels[train].sum() - 3 * 27 / 5) <= 2
        tested.extend(test)
    assert sorted(tested) == list(range(len(labels)))  # every image is tested exactly once over the folds


def test_split_needs_a_fold_and_enough_anomalies():
    with pytest.raises(UserError, match="fold"):
        stratified_three_way_split(np.array([0] * 10 + [1] * 10), None)
    with pytest.raises(UserError, match="anomalous"):
        stratified_three_way_split(np.array([0] * 20 + [1] * 3), 0)


def test_data_module_pools_train_and_test(tmp_path: Path):
    root = make_mvtec_category(tmp_path / "mvtec", n_train=12, n_good=4, n_bad=9)
    official = MVTecDataModule(str(root), "widget", fold=2, num_workers=0)
    dm = StratifiedMVTecDataModule(str(root), "widget", fold=2, num_workers=0, batch_size=4, image_size=32)
    dm.setup("fit")
    train, val, test = dm.fit_samples, dm.holdout_samples, dm.test_samples
    pool = [*official.samples()[0], *official.samples()[1]]
    assert sorted(s.path for s in [*train, *val, *test]) == sorted(s.path for s in pool)
    assert len({s.path for s in [*train, *val, *test]}) == len(pool) == 25
    assert sum(s.label for s in val) in (1, 2) and sum(s.label for s in test) in (1, 2)
    assert sum(s.label for s in train) >= 5
    # the loaders serve those samples; the official module is unchanged
    batch = next(iter(dm.val_dataloader()))
    assert set(batch["path"]) <= {s.path for s in val} and batch["image"].shape[-1] == 32
    assert {s.path for s in official.test_samples} == {s.path for s in official.samples()[1]}
    assert all(s.label == 0 for s in official.fit_samples)
