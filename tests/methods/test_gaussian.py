"""The Gaussian LightningModule: streamed fit equals sklearn on real features; real-data AUROC."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from sklearn.covariance import LedoitWolf
from sklearn.metrics import roc_auc_score

from anomaly.data import MVTecDataModule
from anomaly.methods.gaussian import GaussianAD
from tests.conftest import BOTTLE, require


def fit_and_test(model: GaussianAD, dm: MVTecDataModule, tmp_path: Path, epochs: int = 1) -> pl.Trainer:
    trainer = pl.Trainer(
        max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
        use_distributed_sampler=False,
    )  # fmt: skip
    trainer.fit(model, datamodule=dm)
    trainer.test(model, datamodule=dm, verbose=False)
    return trainer


def stacked_features(model: GaussianAD, loader) -> list[np.ndarray]:
    per_level: list[list[torch.Tensor]] = [[] for _ in model.levels]
    with torch.no_grad():
        for batch in loader:
            for store, feats in zip(per_level, model.features(batch["image"]), strict=True):
                store.append(feats)
    return [torch.cat(s).double().numpy() for s in per_level]


def test_streamed_fit_over_batches_equals_sklearn_on_real_features(tiny_mvtec: Path, tmp_path: Path):
    model = GaussianAD("efficientnet-lite0", levels=[2, 6, 9])
    dm = MVTecDataModule(str(tiny_mvtec), "widget", fold=0, batch_size=3, num_workers=0)
    fit_and_test(model, dm, tmp_path)
    features = stacked_features(model, dm.train_dataloader())
    for scorer, x in zip(model.scorers, features, strict=True):
        reference = LedoitWolf().fit(x)
        np.testing.assert_allclose(scorer.mean.numpy(), reference.location_, rtol=1e-6, atol=1e-9)
        assert float(scorer.shrinkage) == pytest.approx(reference.shrinkage_, rel=1e-6)
        scale = np.abs(reference.precision_).max()
        np.testing.assert_allclose(
            scorer.precision.numpy(), reference.precision_, rtol=1e-6, atol=1e-7 * scale
        )


def test_memory_does_not_grow_with_epochs(tiny_mvtec: Path, tmp_path: Path):
    model = GaussianAD("efficientnet-lite0", levels=[4])
    dm = MVTecDataModule(str(tiny_mvtec), "widget", fold=None, batch_size=4, num_workers=0, augment=True)
    state_before = {k: v.numel() for k, v in model.state_dict().items()}
    fit_and_test(model, dm, tmp_path, epochs=3)
    assert model.moments[0].n == 3 * 12  # every image once per epoch
    assert {k: v.numel() for k, v in model.state_dict().items()} == state_before
    retained = [v for v in vars(model).values() if isinstance(v, (list, torch.Tensor)) and len(v) >= 12]
    assert not retained, "training features are being kept"


@pytest.mark.real_data
def test_bottle_fold0_summed_mahalanobis_auroc(tmp_path: Path):
    root = require(BOTTLE).parent
    model = GaussianAD("efficientnet-lite0")
    dm = MVTecDataModule(str(root), "bottle", fold=0, batch_size=32, num_workers=2)
    fit_and_test(model, dm, tmp_path)
    results = model.test_summary
    assert results["n_train"] == 167 and results["n_test"] == 83
    assert results["image_auroc"] >= 0.98, results["per_level"]
    # the logged AUROC agrees with sklearn on the written scores
    import pandas as pd

    scores = pd.read_csv(tmp_path / "scores.csv")
    assert roc_auc_score(scores["label"], scores["mahalanobis_sum"]) == pytest.approx(results["image_auroc"])
