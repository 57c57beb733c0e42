"""oc-SVM baseline: scores equal sklearn's OneClassSVM on the same features; CLI run; memory limit."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.svm import OneClassSVM

from anomaly.cli import CONFIG_DIR, main
from anomaly.data import MVTecDataModule
from anomaly.errors import UserError
from anomaly.methods.ocsvm import OneClassSVMAD
from anomaly.methods.run import fit
from tests.conftest import BOTTLE, DEFAULT_SWITCHES, FEW_HELD_OUT, cpu_trainer, require, run_results

pytestmark = [FEW_HELD_OUT, DEFAULT_SWITCHES]

LEVELS = [3, 6]


def stacked(model: OneClassSVMAD, loader) -> list[np.ndarray]:
    per_level: list[list[torch.Tensor]] = [[] for _ in model.levels]
    for batch in loader:
        for store, feats in zip(per_level, model.features(batch["image"]), strict=True):
            store.append(feats)
    return [torch.cat(s).double().numpy() for s in per_level]


def test_scores_equal_sklearn_one_class_svm_on_the_same_features(tiny_mvtec: Path, tmp_path: Path):
    model = OneClassSVMAD("efficientnet-lite0", levels=LEVELS)
    dm = MVTecDataModule(str(tiny_mvtec), "widget", fold=1, batch_size=4, num_workers=0, image_size=96)
    run = cpu_trainer(tmp_path)
    fit(run, model, dm)
    run.test(model, datamodule=dm, verbose=False)
    train_features = stacked(model, dm.train_dataloader())
    test_features = stacked(model, dm.test_dataloader())
    with open(tmp_path / "scores.csv") as file:
        rows = list(csv.DictReader(file))
    assert [r["path"] for r in rows] == [s.path for s in dm.test_samples]
    expected_sum = np.zeros(len(rows))
    for level, x_train, x_test in zip(LEVELS, train_features, test_features, strict=True):
        reference = -OneClassSVM(kernel="rbf", gamma="scale", nu=0.5).fit(x_train).decision_function(x_test)
        written = np.array([float(r[f"ocsvm_{level}"]) for r in rows])
        np.testing.assert_allclose(written, reference, rtol=1e-6, atol=1e-9)
        expected_sum += reference
    np.testing.assert_allclose([float(r["ocsvm_sum"]) for r in rows], expected_sum, rtol=1e-6, atol=1e-9)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["method"] == "ocsvm" and results["n_fit_vectors"] == len(dm.fit_samples) == 9
    assert results["image_auroc"] == results["scores"]["ocsvm"]["sum"]
    assert model._stored == []  # the stored training features are freed after fitting


def test_command_line_run_with_the_ocsvm_config(tiny_mvtec: Path, tmp_path: Path, capsys):
    code = main(["--config", str(CONFIG_DIR / "ocsvm.yaml"), "--data.root", str(tiny_mvtec),
                 "--data.category", "widget", "--data.num_workers", "0", "--data.batch_size", "8",
                 "--data.augment", "true", "--trainer.max_epochs", "2", "--model.levels", "[2]",
                 "--trainer.default_root_dir", str(tmp_path)])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    run_dir = tmp_path / "ocsvm" / "efficientnet-lite0_levels-2_augment2" / "widget" / "fold_0"
    results = json.loads((run_dir / "results.json").read_text())
    assert results["method"] == "ocsvm" and results["fold"] == 0 and results["category"] == "widget"
    assert results["n_fit_vectors"] == 2 * 9  # features of every epoch's augmented images
    assert set(results["per_level"]) == {"2"} and 0.0 <= results["image_auroc"] <= 1.0


def test_memory_limit_stops_before_training(tiny_mvtec: Path, tmp_path: Path):
    model = OneClassSVMAD("efficientnet-lite0", levels=[9], pretrained=False, memory_limit_gb=1e-6)
    n = 9 * 3  # stored, one level copied for libsvm, support vectors, kernel cache
    assert model.required_bytes(9, 3) == n * 1280 * 4 + n * 1280 * 12 + n * 1280 * 8 + 200 * 2**20
    dm = MVTecDataModule(str(tiny_mvtec), "widget", fold=0, batch_size=4, num_workers=0)
    with pytest.raises(UserError, match=r"memory_limit_gb"):
        fit(cpu_trainer(tmp_path, epochs=3), model, dm)


@pytest.mark.slow
@pytest.mark.real_data
def test_bottle_fold0_summed_ocsvm_auroc(tmp_path: Path):
    root = require(BOTTLE).parent
    model = OneClassSVMAD("efficientnet-lite0")
    dm = MVTecDataModule(str(root), "bottle", fold=0, batch_size=32, num_workers=2)
    run = cpu_trainer(tmp_path)
    fit(run, model, dm)
    run.test(model, datamodule=dm, verbose=False)
    results = run_results(run)
    assert results["n_train"] == 167 and results["n_test"] == 83
    assert results["image_auroc"] >= 0.9, results["per_level"]  # Table VIII, oc-SVM on bottle: 98.4 (EN-B0)
