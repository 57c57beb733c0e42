"""Spatial pooling, per-cell Gaussians, anomaly maps and label-free level weighting."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from sklearn.covariance import LedoitWolf
from sklearn.metrics import roc_auc_score

from anomaly.backbones import build_backbone
from anomaly.data import MVTecDataModule
from anomaly.errors import UserError
from anomaly.evaluation.pixel import pixel_auroc, pixel_pro, upsample_maps
from anomaly.evaluation.pro import pro_score
from anomaly.methods.gaussian import GaussianAD
from anomaly.methods.spatial import SpatialGaussianAD
from anomaly.pooling import build_pooling
from tests.conftest import DEFAULT_SWITCHES, FEW_HELD_OUT, fit_and_test, make_mvtec_category, run_results

pytestmark = [FEW_HELD_OUT, DEFAULT_SWITCHES]

SIZE = 64  # small inputs keep the backbone cheap; level 6 is then a 4x4 map


def fit_and_test_on(
    model: GaussianAD, root: Path, tmp_path: Path, fold: int | None = 0, figures: bool = False
) -> pl.Trainer:
    dm = MVTecDataModule(str(root), "widget", fold=fold, batch_size=4, num_workers=0, image_size=SIZE)
    return fit_and_test(model, dm, tmp_path, figures=figures)


def spatial(**kwargs) -> SpatialGaussianAD:
    torch.manual_seed(0)
    return SpatialGaussianAD("efficientnet-lite0", levels=[3, 6], pretrained=False, **kwargs)


def test_extractor_grid_pooling_shapes_and_global_mean():
    extractor = build_backbone("efficientnet-lite0", pretrained=False)
    images = torch.randint(0, 256, (2, 3, SIZE, SIZE), dtype=torch.uint8)
    pooled = extractor(images, [3, 9])
    grids = extractor(images, [3, 9], grid=2)
    assert [tuple(g.shape) for g in grids] == [(2, 24, 2, 2), (2, 1280, 2, 2)]
    for g, p in zip(grids, pooled, strict=True):  # equal cells: the mean of the cells is the global mean
        torch.testing.assert_close(g.mean(dim=(2, 3)), p, rtol=1e-5, atol=1e-6)
    with pytest.raises(UserError, match="grid"):
        extractor(images, [3], grid=0)


def test_options_are_checked():
    with pytest.raises(UserError, match="pooling must be one of"):
        spatial(pooling="pixels")
    with pytest.raises(UserError, match="level_weighting"):
        spatial(level_weighting="labels")
    with pytest.raises(UserError, match="grid_size"):
        spatial(pooling="cells", grid_size=0)
    with pytest.raises(UserError, match="reduction"):
        spatial(pooling="cells", reduction="npca")
    with pytest.raises(UserError, match=r"fine_grid_size lists 1 sizes for the 2 fine_levels \[3, 6\]"):
        spatial(pooling="grid_maps", fine_levels=[3, 6], fine_grid_size=[8])
    with pytest.raises(UserError, match="leave at least one level for the anomaly map"):
        spatial(pooling="grid_maps", coarse_levels=[3, 6], fine_levels=[4])
    # a coarse level with fine cells maps; fine levels not fitted are left out with their sizes
    fine = {"fine_levels": [3, 4, 6], "fine_grid_size": [8, 6, 4], "fine_weight": 0.5}
    model = spatial(pooling="grid_maps", grid_size=2, coarse_levels=[6], **fine)
    assert model.fine_levels == (3, 6) and model.fine_grid_size == (8, 4) and model.pooling.map_size == 8
    assert model.run_name().endswith("_grid_maps-2_coarse-6-1_fine-3-6-8-4-0.5")
    only_fine_cells = spatial(pooling="grid_maps", coarse_levels=[3, 6], fine_levels=[6], fine_grid_size=4)
    assert only_fine_cells.run_name().endswith("_coarse-3-6-1_fine-6-4-1")


def test_memory_budget_error_names_the_need_and_the_fix():
    need = 49 * (24**2 + 112**2) * 8 * 2 / 1024**3  # cells: k^2 C^2 float64, moments and precisions
    with pytest.raises(UserError, match=rf"{need:.3g} GiB .*memory_budget_gb 0.005.*lower grid_size"):
        spatial(pooling="cells", grid_size=7, memory_budget_gb=0.005)
    assert spatial(pooling="cells", grid_size=7, memory_budget_gb=0.01).moments[1].outer.shape == (
        49,
        112,
        112,
    )
    # grid: one Gaussian of 64 x 1280 = 81920 dims, 100 GiB as D x D matrices, far beyond the default
    # budget for many samples; a fit of few keeps their rows and a basis (2 n D floats: 15 MiB for 12)
    grid = build_pooling("grid", grid_size=8)
    grid.check_budget([1280], 4.0, [9], samples=12)
    with pytest.raises(UserError, match="and 10,000 training samples, over memory_budget_gb 4: lower"):
        grid.check_budget([1280], 4.0, [9], samples=10_000)
    with pytest.raises(UserError, match=rf"{2 * 81920**2 * 8 / 1024**3:.3g} GiB .*memory_budget_gb 4"):
        grid.check_budget([1280], 4.0, [9])  # any number of samples


def test_the_budget_is_checked_with_the_fits_samples_before_any_image_is_read(
    tiny_mvtec: Path, tmp_path: Path
):
    """At construction only what any fit needs is checked; at the fit, its samples (images x epochs)."""
    model = spatial(pooling="grid", grid_size=8, memory_budget_gb=0.001)  # 2 samples: 0.4 MiB
    with pytest.raises(UserError, match=r"and 9 training samples, over memory_budget_gb 0.001"):
        fit_and_test_on(model, tiny_mvtec, tmp_path)
    fit_and_test_on(spatial(pooling="grid", grid_size=8, memory_budget_gb=0.01), tiny_mvtec, tmp_path / "ok")


def test_the_budget_counts_every_tile_and_epoch_of_the_fit():
    from types import SimpleNamespace

    from anomaly.data.transforms import geometry

    model = spatial(pooling="grid", grid_size=8, memory_budget_gb=0.001)
    data = SimpleNamespace(fit_samples=[None] * 3, geometry=geometry("area", "stretch", "1x2"), augment=True)
    model._trainer = SimpleNamespace(datamodule=data)
    with pytest.raises(UserError, match="and 12 training samples"):  # 3 images x 2 tiles x 2 epochs
        model.check_fit_options(2)


def test_global_default_reproduces_the_paper_method(tiny_mvtec: Path, tmp_path: Path):
    ours = spatial()
    torch.manual_seed(0)
    paper = GaussianAD("efficientnet-lite0", levels=[3, 6], pretrained=False)
    fit_and_test_on(ours, tiny_mvtec, tmp_path / "a")
    fit_and_test_on(paper, tiny_mvtec, tmp_path / "b")
    images = torch.randint(0, 256, (3, 3, SIZE, SIZE), dtype=torch.uint8)
    expected, got = paper.score_images(images), ours.score_images(images)
    assert set(got) == set(expected)
    for name, values in expected.items():
        torch.testing.assert_close(got[name], values, rtol=0, atol=0)


def test_grid_pooling_models_k2c_vector_with_npca(tiny_mvtec: Path, tmp_path: Path):
    model = spatial(pooling="grid", grid_size=2, reduction="npca")
    assert model.level_dims == [4 * 24, 4 * 112]
    results = run_results(fit_and_test_on(model, tiny_mvtec, tmp_path))
    assert [s.projection.shape[0] for s in model.scorers] == [96, 448]  # NPCA of the k^2 C vector
    assert all(0 < s.dim < s.projection.shape[0] for s in model.scorers)
    images = torch.randint(0, 256, (2, 3, SIZE, SIZE), dtype=torch.uint8)
    assert [tuple(f.shape) for f in model.features(images)] == [(2, 96), (2, 448)]
    assert 0.0 <= results["image_auroc"] <= 1.0
    assert results["pooling"] == "grid"


def test_cells_streamed_fit_equals_sklearn_on_stored_features(tiny_mvtec: Path, tmp_path: Path):
    model = spatial(pooling="cells", grid_size=2, overlays=3)
    trainer = fit_and_test_on(model, tiny_mvtec, tmp_path, figures=True)  # with the overlays
    stored: list[list[torch.Tensor]] = [[], []]
    for batch in model.datamodule.train_dataloader():
        for store, feats in zip(stored, model.features(batch["image"]), strict=True):
            store.append(feats)
    for scorer, parts in zip(model.scorers, stored, strict=True):
        x = torch.cat(parts).double().numpy()  # (n, 4 cells, C)
        assert x.shape[1] == 4
        for k in range(4):
            reference = LedoitWolf().fit(x[:, k])
            np.testing.assert_allclose(scorer.mean[k].numpy(), reference.location_, rtol=1e-6, atol=1e-9)
            assert float(scorer.shrinkage[k]) == pytest.approx(reference.shrinkage_, rel=1e-6)
            scale = np.abs(reference.precision_).max()
            np.testing.assert_allclose(
                scorer.precision[k].numpy(), reference.precision_, rtol=1e-6, atol=1e-7 * scale
            )
    # maps: per-cell distances summed over levels; a level's image score is its largest cell
    images = next(iter(model.datamodule.test_dataloader()))["image"]
    maps = model.maps(images)
    assert maps.shape == (len(images), 2, 2)
    columns = model.score_images(images)
    cell_scores = [s(f)["mahalanobis"] for s, f in zip(model.scorers, model.features(images), strict=True)]
    torch.testing.assert_close(columns["mahalanobis/3"], cell_scores[0].amax(dim=1))
    torch.testing.assert_close(maps.reshape(len(images), 4), cell_scores[0] + cell_scores[1])
    # the tiny category has masks: pixel AUROC and overlays of the top-scoring images
    assert 0.0 <= run_results(trainer)["pixel_auroc"] <= 1.0
    assert 0.0 <= run_results(trainer)["pro"] <= 1.0
    overlays = sorted((Path(trainer.default_root_dir) / "anomaly_maps").glob("*.png"))
    assert len(overlays) == 3 and overlays[0].name.startswith("00_")


def test_a_defective_image_without_a_mask_is_left_out_of_the_pixel_metrics(tmp_path: Path):
    """It is not all normal: its pixels are unknown. Leaving out its mask changes nothing in the pixel
    metrics but the warning, against the same test set without that image at all."""
    root = make_mvtec_category(tmp_path / "with_masks")
    model = spatial(pooling="cells", grid_size=2)
    trainer = fit_and_test_on(model, root, tmp_path / "runs")
    complete = run_results(trainer)
    assert complete["n_pixel_images"] == complete["n_test"] == 8

    def test_on(variant: Path) -> dict:
        dm = MVTecDataModule(str(variant), "widget", fold=0, batch_size=4, num_workers=0, image_size=SIZE)
        dm.configure(model.data_needs(), trainer)
        trainer.test(model, datamodule=dm, verbose=False)
        return run_results(trainer)

    unmasked = tmp_path / "unmasked"
    shutil.copytree(root, unmasked)
    (unmasked / "widget" / "ground_truth" / "square" / "001_mask.png").unlink()
    with pytest.warns(
        UserWarning, match=r"1 defective test image\(s\) have no ground-truth mask \(in square\)"
    ):
        partial = test_on(unmasked)
    removed = tmp_path / "removed"
    shutil.copytree(root, removed)
    (removed / "widget" / "ground_truth" / "square" / "001_mask.png").unlink()
    (removed / "widget" / "test" / "square" / "001.png").unlink()
    without = test_on(removed)
    assert partial["n_test"] == 8 and partial["n_pixel_images"] == without["n_pixel_images"] == 7
    assert partial["pixel_auroc"] == without["pixel_auroc"] and partial["pro"] == without["pro"]
    assert partial["pixel_auroc"] != complete["pixel_auroc"]
    shutil.rmtree(removed / "widget" / "ground_truth")  # no mask at all: no pixel metrics, as before
    assert test_on(removed)["pixel_auroc"] is None


def test_holdout_weighting_standardises_levels_on_held_out_normals(tiny_mvtec: Path, tmp_path: Path):
    model = spatial(level_weighting="holdout")
    trainer = fit_and_test_on(model, tiny_mvtec, tmp_path)
    holdout = model.holdout_scores
    expected = sum(
        (holdout[f"mahalanobis/{lv}"] - holdout[f"mahalanobis/{lv}"].mean())
        / holdout[f"mahalanobis/{lv}"].std()
        for lv in (3, 6)
    )
    torch.testing.assert_close(holdout["mahalanobis/sum"], expected)
    assert holdout["mahalanobis/sum"].mean().abs() < 1e-9
    assert run_results(trainer)["level_weighting"] == "holdout"
    with pytest.raises(UserError, match="held-out normal images"):
        fit_and_test_on(spatial(level_weighting="holdout"), tiny_mvtec, tmp_path / "nofold", fold=None)


def test_non_global_pooling_refuses_the_global_feature_cache():
    with pytest.raises(UserError, match="feature_cache"):
        spatial(pooling="cells", grid_size=2).batch_features({"features": {3: torch.zeros(1, 24)}})


def test_pixel_auroc_of_known_maps_matches_sklearn():
    masks = torch.zeros(3, 1, 8, 8, dtype=torch.uint8)
    masks[0, 0, :4, :4] = 1  # exactly the top-left cell of a 2x2 grid
    masks[2, 0, 4:, 4:] = 1
    perfect = torch.zeros(3, 2, 2)
    perfect[0, 0, 0] = perfect[2, 1, 1] = 5.0
    # bilinear upsampling bleeds into neighbouring pixels, but every anomalous pixel still ranks first
    assert pixel_auroc(perfect, masks) == pytest.approx(1.0)
    assert pixel_auroc(-perfect, masks) == pytest.approx(0.0, abs=0.05)
    random_maps = torch.rand(3, 2, 2, generator=torch.Generator().manual_seed(0))
    expected = roc_auc_score(masks.reshape(-1).numpy(), upsample_maps(random_maps, 8).reshape(-1).numpy())
    assert pixel_auroc(random_maps, masks) == pytest.approx(expected, rel=1e-6)
    assert np.isnan(pixel_auroc(random_maps, torch.zeros_like(masks)))


def test_pixel_pro_upsamples_like_pixel_auroc():
    masks = torch.zeros(2, 1, 8, 8, dtype=torch.uint8)
    masks[0, 0, :4, :4] = 1
    maps = torch.rand(2, 2, 2, generator=torch.Generator().manual_seed(1))
    assert pixel_pro(maps, masks) == pytest.approx(pro_score(upsample_maps(maps, 8).numpy(), masks[:, 0]))
    assert np.isnan(pixel_pro(maps, torch.zeros_like(masks)))
