"""The Gaussian LightningModule: streamed fit equals sklearn on real features; real-data AUROC."""

from __future__ import annotations

import csv
import gc
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.covariance import LedoitWolf
from sklearn.decomposition import PCA
from sklearn.metrics import roc_auc_score

from anomaly.data import MVTecDataModule
from anomaly.errors import UserError
from anomaly.evaluation.callback import RunReport
from anomaly.evaluation.report import format_run_table
from anomaly.methods.gaussian import GaussianAD
from anomaly.methods.run import fit
from tests.conftest import (
    BOTTLE,
    DEFAULT_SWITCHES,
    FEW_HELD_OUT,
    cpu_trainer,
    fit_and_test,
    make_mvtec_category,
    require,
    run_results,
)

pytestmark = [FEW_HELD_OUT, DEFAULT_SWITCHES]

SMALL = 96  # below the native 224 px: real features at a fraction of the cost


def read_scores(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def stacked_features(model: GaussianAD, loader) -> list[np.ndarray]:
    per_level: list[list[torch.Tensor]] = [[] for _ in model.levels]
    with torch.no_grad():
        for batch in loader:
            for store, feats in zip(per_level, model.features(batch["image"]), strict=True):
                store.append(feats)
    return [torch.cat(s).double().numpy() for s in per_level]


def test_streamed_fit_over_batches_equals_sklearn_on_real_features(tiny_mvtec: Path, tmp_path: Path):
    model = GaussianAD("efficientnet-lite0", levels=[2, 6, 9])
    dm = MVTecDataModule(str(tiny_mvtec), "widget", fold=0, batch_size=3, num_workers=0, image_size=SMALL)
    fit_and_test(model, dm, tmp_path)
    features = stacked_features(model, dm.train_dataloader())
    for scorer, x in zip(model.scorers, features, strict=True):
        reference = LedoitWolf().fit(x)
        np.testing.assert_allclose(scorer.mean.numpy(), reference.location_, rtol=1e-6, atol=1e-9)
        assert float(scorer.shrinkage) == pytest.approx(reference.shrinkage_, rel=1e-6)
        scale = np.abs(reference.precision_).max()
        np.testing.assert_allclose(
            scorer.precision_matrix().numpy(), reference.precision_, rtol=1e-6, atol=1e-7 * scale
        )


def alive_tensor_bytes() -> int:
    gc.collect()
    return sum(o.numel() * o.element_size() for o in gc.get_objects() if isinstance(o, torch.Tensor))


class RetainingGaussianAD(GaussianAD):
    """A deliberately broken fit that keeps its training features (proves the test can fail)."""

    def training_step(self, batch: dict, batch_idx: int) -> None:
        super().training_step(batch, batch_idx)
        self.kept = [*getattr(self, "kept", []), *self.batch_features(batch)]


def retained_growth(model_class: type[GaussianAD], data: Path, out: Path) -> tuple[int, int]:
    """(bytes of tensors still alive after 4 minus after 1 augmented epochs, one epoch's features),
    besides the statistics' own: while a level has seen fewer rows than its dimensions it keeps them
    (never more than its D x D moments would take) and its precision's basis grows with them."""
    after = {}
    for epochs in (1, 4):
        model = model_class("efficientnet-lite0", levels=[4, 9])
        dm = MVTecDataModule(
            str(data), "widget", fold=None, batch_size=4, num_workers=0, augment=True, image_size=SMALL
        )
        before = alive_tensor_bytes()
        fit_and_test(model, dm, out, epochs=epochs)
        assert model.moments[0].n == epochs * 12  # every image once per epoch
        kept = [a.rows.numel() for a in model.moments]
        assert all(rows <= dim * dim for rows, dim in zip(kept, model.level_dims, strict=True))
        parts = [*model.moments, *model.scorers]
        statistics = sum(b.numel() * b.element_size() for part in parts for b in part.buffers())
        after[epochs] = alive_tensor_bytes() - before - statistics
        epoch_bytes = 12 * sum(model.level_dims) * 4
        del model, dm
    return after[4] - after[1], epoch_bytes


@pytest.mark.slow
def test_memory_does_not_grow_with_epochs(tiny_mvtec: Path, tmp_path: Path):
    """A fit retains the same tensors after 1 and after 4 augmented epochs."""
    growth, epoch_bytes = retained_growth(GaussianAD, tiny_mvtec, tmp_path)
    assert growth < epoch_bytes / 2, (growth, epoch_bytes)
    growth, epoch_bytes = retained_growth(RetainingGaussianAD, tiny_mvtec, tmp_path)
    assert growth >= 3 * epoch_bytes  # the check does see retained features


def test_augmented_fits_are_reproducible(tiny_mvtec: Path, tmp_path: Path):
    def fitted(seed: int) -> list:
        model = GaussianAD("efficientnet-lite0", levels=[3, 7])
        dm = MVTecDataModule(
            str(tiny_mvtec),
            "widget",
            fold=0,
            batch_size=4,
            num_workers=0,
            augment=True,
            seed=seed,
            image_size=SMALL,
        )
        fit_and_test(model, dm, tmp_path, epochs=2)
        return [m.moments() for m in model.moments] + [s.precision_matrix() for s in model.scorers]

    first, again, other = fitted(0), fitted(0), fitted(1)
    for a, b in zip(first[:2], again[:2], strict=True):
        assert torch.equal(a.outer, b.outer) and torch.equal(a.quartic, b.quartic)
    assert torch.equal(first[2], again[2])
    assert not torch.equal(first[0].outer, other[0].outer)


def sklearn_reduced_mahalanobis(train: np.ndarray, test: np.ndarray, reduction: str, t: float):
    """PCA(n_components=None) -> the paper's component selection -> LedoitWolf -> Mahalanobis.

    Only the ``min(n - 1, D)`` components with variance count (sklearn adds one without when n <= D).
    """
    pca = PCA(n_components=None).fit(train)
    rank = min(len(train) - 1, train.shape[1])
    k = int(np.argmax(np.cumsum(pca.explained_variance_ratio_[:rank]) > t))
    keep = slice(0, k + 1) if reduction == "pca" else slice(k - 1, rank)
    reference = LedoitWolf().fit(pca.transform(train)[:, keep])
    return np.sqrt(reference.mahalanobis(pca.transform(test)[:, keep])), keep.indices(rank)


@pytest.fixture(scope="module")
def reduction_data(tmp_path_factory) -> dict:
    """``root``: a category of 60 training images; ``train``, ``test``: its unreduced features of each level,
    stored by the first test that extracts them (they do not depend on the reduction)."""
    return {"root": make_mvtec_category(tmp_path_factory.mktemp("reduction"), n_train=60, n_good=6, n_bad=6,
                                        size=64)}  # fmt: skip


@pytest.mark.parametrize(("reduction", "t"), [("pca", 0.99), ("npca", 0.99), ("npca", 0.999)])
def test_reduction_equals_sklearn_pca_then_ledoit_wolf(
    reduction_data, tmp_path: Path, reduction: str, t: float
):
    model = GaussianAD("efficientnet-lite0", levels=[2, 3, 9], reduction=reduction, variance_threshold=t)
    dm = MVTecDataModule(
        str(reduction_data["root"]), "widget", fold=0, batch_size=16, num_workers=0, image_size=SMALL
    )
    results = run_results(fit_and_test(model, dm, tmp_path))
    if "train" not in reduction_data:
        reduction_data["train"] = stacked_features(model, dm.train_dataloader())
        reduction_data["test"] = stacked_features(model, dm.test_dataloader())
    train, test = reduction_data["train"], reduction_data["test"]
    labels = torch.tensor([s.label for s in dm.test_samples])
    ours = model.score_features([torch.from_numpy(x) for x in test])
    for i, level in enumerate(model.levels):
        expected, (start, stop, _) = sklearn_reduced_mahalanobis(train[i], test[i], reduction, t)
        assert model.scorers[i].dim == stop - start == results["level_dims"][str(level)]
        # n <= D too (level 9: 1280 dims, 48 images): no kept direction is arbitrary
        np.testing.assert_allclose(ours[f"mahalanobis/{level}"].numpy(), expected, rtol=1e-6)
        expected_auroc = roc_auc_score(labels.numpy(), expected)
        assert results["per_level"][str(level)] == pytest.approx(expected_auroc, abs=1e-9)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"reduction": "pca", "variance_threshold": 1.5}, "between 0 and 1"),
        ({"reduction": "pca,npca"}, "not both"),
        ({"target_fpr": 0.0}, "target_fpr"),
        ({"decision_score": "mahalanobis/12"}, "decision_score"),
        ({"threshold_method": "chi2"}, "single level"),
    ],
)
def test_bad_options_are_user_errors(options, message):
    with pytest.raises(UserError, match=message):
        GaussianAD("efficientnet-lite0", pretrained=False, **options)


def test_working_point_and_decisions(tiny_mvtec: Path, tmp_path: Path):
    model = GaussianAD("efficientnet-lite0", levels=[5, 7], target_fpr=0.2)
    dm = MVTecDataModule(str(tiny_mvtec), "widget", fold=0, batch_size=8, num_workers=0, image_size=SMALL)
    report = run_results(fit_and_test(model, dm, tmp_path))["working_point"]
    rows = report["levels"]["7"]["rows"]
    assert [r["n_sigma"] for r in rows] == [1, 2, 3, 4, 5, None]
    assert rows[-1]["target_fpr"] == 0.2
    thresholds = [r["chi2_threshold"] for r in rows[:5]]
    assert thresholds == sorted(thresholds)  # stricter rows, higher thresholds
    assert "empirical_threshold" in report["sum"]["rows"][0]
    assert report["decision"]["score"] == "mahalanobis/sum" and report["decision"]["threshold"] is not None
    scores = read_scores(tmp_path / "scores.csv")
    threshold = report["decision"]["threshold"]
    assert all(int(r["decision"]) == int(float(r["mahalanobis_sum"]) > threshold) for r in scores)
    normal = [float(r["mahalanobis_sum"]) for r in scores if r["label"] == "0"]
    fpr = np.mean([value > threshold for value in normal])
    assert report["empirical"]["mahalanobis/sum"]["empirical_fpr"] == pytest.approx(fpr)
    assert report["holdout_images"] == len(dm.holdout_samples) == 3


def test_unreachable_empirical_target_is_said(tiny_mvtec: Path, tmp_path: Path, recwarn):
    """3 held-out images cannot aim at an FPR of 1%: the threshold is their largest score, and the
    console summary says so in its threshold line (a fact of the data, not a warning)."""
    model = GaussianAD("efficientnet-lite0", levels=[5, 7], target_fpr=0.01)
    dm = MVTecDataModule(str(tiny_mvtec), "widget", fold=0, batch_size=8, num_workers=0, image_size=SMALL)
    results = run_results(fit_and_test(model, dm, tmp_path))
    assert model.threshold == pytest.approx(float(model.holdout_scores["mahalanobis/sum"].max()))
    assert not [w for w in recwarn if "held-out" in str(w.message) or "holds out" in str(w.message)]
    summary = format_run_table(results)
    assert (
        f"threshold: {model.threshold:.6g} on mahalanobis/sum, the largest of 3 held-out normal scores "
        "(aiming at 1.00% false positives takes 100)"
    ) in summary


def test_the_summary_names_the_maps_metrics_and_a_reachable_working_point():
    results = {
        "scores": {"mahalanobis": {"per_level": {"5": 0.9}, "sum": 0.95}},
        "pixel_auroc": 0.9812, "pro": 0.9004, "n_pixel_images": 40,
        "working_point": {
            "target_fpr": 0.05, "holdout_images": 40,
            "decision": {"score": "mahalanobis/sum", "method": "empirical", "threshold": 12.5},
        },
    }  # fmt: skip
    lines = format_run_table(results).splitlines()
    assert "anomaly maps: pixel AUROC 98.1 %, PRO 90.0 % over 40 test images" in lines
    assert "threshold: 12.5 on mahalanobis/sum (aims at 5.00% false positives on normal images)" in lines
    results["working_point"]["decision"]["method"] = "chi2"
    results["working_point"]["target_fpr"] = 0.01
    assert "threshold: 12.5 on mahalanobis/sum (aims at 1.00% false positives on normal images)" in (
        format_run_table(results)
    )


@pytest.mark.slow
@pytest.mark.real_data
def test_bottle_fold0_summed_mahalanobis_auroc(tmp_path: Path):
    root = require(BOTTLE).parent
    model = GaussianAD("efficientnet-lite0")
    dm = MVTecDataModule(str(root), "bottle", fold=0, batch_size=32, num_workers=2)
    results = run_results(fit_and_test(model, dm, tmp_path))
    assert results["n_train"] == 167 and results["n_test"] == 83
    assert results["image_auroc"] >= 0.98, results["per_level"]
    # the logged AUROC agrees with sklearn on the written scores
    scores = read_scores(tmp_path / "scores.csv")
    labels = [int(r["label"]) for r in scores]
    summed = [float(r["mahalanobis_sum"]) for r in scores]
    assert roc_auc_score(labels, summed) == pytest.approx(results["image_auroc"])


def test_runs_that_differ_in_their_working_point_get_folders_of_their_own():
    def name(**options) -> str:
        return GaussianAD(backbone="efficientnet-lite0", levels=[7], pretrained=False, **options).run_name()

    default = name()
    names = {
        default,
        name(threshold=50.0),
        name(threshold=400.0),
        name(target_fpr=0.05),
        name(threshold_method="chi2", decision_score="mahalanobis/7"),
        name(decision_score="mahalanobis/7"),
    }
    assert len(names) == 6
    assert default == "efficientnet-lite0_random-init_levels-7"
    assert name(threshold=50.0) == default + "_threshold50"


def test_the_module_returns_rows_and_writes_nothing_the_report_writes_the_files(
    tiny_mvtec: Path, tmp_path: Path, monkeypatch
):
    """Without the report callback a test writes no file anywhere (also not in the current folder)."""
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    model = GaussianAD("efficientnet-lite0", levels=[5, 7])
    dm = MVTecDataModule(str(tiny_mvtec), "widget", fold=0, batch_size=8, num_workers=0, image_size=SMALL)
    trainer = cpu_trainer(tmp_path / "bare")
    trainer.callbacks = [c for c in trainer.callbacks if not isinstance(c, RunReport)]
    fit(trainer, model, dm)
    assert model.threshold is not None  # the calibration step ran
    trainer.test(model, datamodule=dm, verbose=False)
    assert not list((tmp_path / "cwd").iterdir()) and not (tmp_path / "bare").exists()
    rows = model.test_step(next(iter(dm.test_dataloader())), 0)
    assert set(rows) == {"scores"} and "mahalanobis/sum" in rows["scores"]
    reported = fit_and_test(GaussianAD("efficientnet-lite0", levels=[5, 7]), dm, tmp_path / "reported")
    assert {p.name for p in (tmp_path / "reported").iterdir()} >= {"results.json", "scores.csv"}
    assert run_results(reported)["working_point"]["decision"]["threshold"] is not None
