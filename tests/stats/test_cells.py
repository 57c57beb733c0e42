"""Per-cell Gaussians: streamed moments over batches and processes equal sklearn on stored features."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.covariance import LedoitWolf

from anomaly.stats.cells import (
    QUIET_CELL_FLOOR,
    CellGaussianScorer,
    CellMoments,
    cell_moments,
    cells_memory_bytes,
    fit_cells,
)
from anomaly.stats.distances import standardised_euclidean
from anomaly.stats.gaussian import fit_gaussian
from tests.stats.test_gaussian import peak_rss_bytes


def cell_data(n: int = 45, cells: int = 4, dim: int = 6, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(cells, dim, dim, generator=generator)
    x = torch.einsum("nkd,kde->nke", torch.randn(n, cells, dim, generator=generator), mixing)
    return x * torch.rand(1, cells, dim, generator=generator) * 5 + 100.0  # far from 0: shifts must hold


def test_shapes_of_state_fit_and_scores():
    accumulator = CellMoments(cells=9, dim=5)
    assert accumulator.outer.shape == (9, 5, 5) and accumulator.sum.shape == (9, 5)
    assert accumulator.count.shape == (9,) and accumulator.quartic.shape == (9,)
    accumulator.update(cell_data(20, 9, 5))
    scorer = CellGaussianScorer(9, 5)
    scorer.set_fit(fit_cells(accumulator.moments()))
    assert (scorer.cells, scorer.dim) == (9, 5) and scorer.precision.shape == (9, 5, 5)
    scores = scorer(cell_data(7, 9, 5, seed=1))
    assert set(scores) == {"mahalanobis", "l2", "sed"}
    assert all(v.shape == (7, 9) for v in scores.values())
    with pytest.raises(ValueError, match=r"\(n, 9, 5\)"):
        accumulator.update(torch.zeros(3, 8, 5))


def test_streamed_cells_equal_sklearn_ledoit_wolf_per_cell():
    x = cell_data()
    accumulator = CellMoments(4, 6)
    for batch in x.split(7):  # uneven batches
        accumulator.update(batch)
    assert accumulator.n == 45
    fits = fit_cells(accumulator.moments())
    scorer = CellGaussianScorer(4, 6)
    scorer.set_fit(fits)
    query = cell_data(10, seed=3)
    scores = scorer(query)
    for k, fit in enumerate(fits):
        stored = x[:, k].double().numpy()
        reference = LedoitWolf().fit(stored)
        np.testing.assert_allclose(fit.mean.numpy(), reference.location_, rtol=1e-10)
        assert fit.shrinkage == pytest.approx(reference.shrinkage_, rel=1e-8)
        np.testing.assert_allclose(fit.covariance.numpy(), reference.covariance_, rtol=1e-8)
        np.testing.assert_allclose(
            scores["mahalanobis"][:, k].numpy() ** 2,
            reference.mahalanobis(query[:, k].double().numpy()),
            rtol=1e-6,
        )
        np.testing.assert_allclose(
            scores["l2"][:, k].numpy(), np.linalg.norm(query[:, k].double().numpy() - stored.mean(0), axis=1)
        )
        expected_sed = standardised_euclidean(query[:, k], fit.mean, fit.std)
        np.testing.assert_allclose(scores["sed"][:, k].numpy(), expected_sed.numpy(), rtol=1e-10)


def test_merge_of_two_shards_equals_one_stream():
    x = cell_data(30)
    whole, first, second = CellMoments(4, 6), CellMoments(4, 6), CellMoments(4, 6)
    whole.update(x)
    first.update(x[:11])
    second.update(x[11:])
    first.merge_(second.moments())
    assert first.n == 30
    merged, single = fit_cells(first.moments()), fit_cells(whole.moments())
    for m, s in zip(merged, single, strict=True):
        np.testing.assert_allclose(m.precision.numpy(), s.precision.numpy(), rtol=1e-8)
        assert m.shrinkage == pytest.approx(s.shrinkage, rel=1e-10)


def test_memory_estimate_is_k2_c2_float64_twice():
    assert cells_memory_bytes(16, 100) == 2 * 16 * 100 * 100 * 8


def test_quiet_cells_get_a_floor_variance_and_one_warning_that_counts_them():
    """A constant background leaves some cells without variance: one warning for all of them, not one
    per cell that says the whole detector flags nothing. Their covariance is a floor, 0.01 of the median
    cell's variance: float rounding in a new image stays near 0, a change of the others' size is seen."""
    x = cell_data(30, 6, 4)
    x[:, 1] = 3.0  # constant
    x[:, 3] = 2.0 + 1e-9 * x[:, 3]  # (almost) no variance: rounding
    x[:, 5] = 2.0 + 1e-3 * x[:, 5]  # little variance: a millionth of its own, below the floor
    accumulator = CellMoments(6, 4)
    accumulator.update(x)
    with pytest.warns(RuntimeWarning) as record:
        fits = fit_cells(accumulator.moments())
    assert len(record) == 1
    message = str(record[0].message)
    assert "3 of 6 cells had (almost) no variance" in message and "nothing will be flagged" not in message
    varying = [fits[k].covariance.diagonal().mean() for k in (0, 2, 4)]
    floor = QUIET_CELL_FLOOR * float(torch.stack([*varying, torch.tensor(0.0)]).median())  # cell 5's is ~0
    alone = fit_gaussian(cell_moments(accumulator.moments(), 5))  # its own Ledoit-Wolf fit, floored
    floored = alone.covariance + floor * torch.eye(4, dtype=torch.float64)
    torch.testing.assert_close(fits[5].precision, torch.linalg.inv(floored))
    for k in (1, 3):
        torch.testing.assert_close(fits[k].precision, torch.eye(4, dtype=torch.float64) / floor)
        torch.testing.assert_close(fits[k].std, torch.full((4,), floor**0.5, dtype=torch.float64))
    scorer = CellGaussianScorer(6, 4)
    scorer.set_fit(fits)
    rounded = x[:1] * (1 + 1e-7)  # another batch size or device: rounding only
    shifted = x[:1].clone()
    shifted[:, 1] += (floor / QUIET_CELL_FLOOR) ** 0.5  # one std of the median cell
    assert scorer(rounded)["mahalanobis"][0, 1] < 1e-3 and scorer(rounded)["mahalanobis"][0, 3] < 1e-3
    assert scorer(shifted)["mahalanobis"][0, 1] == pytest.approx((4 / QUIET_CELL_FLOOR) ** 0.5, rel=1e-6)


def test_when_no_cell_varies_none_is_floored_and_the_warning_says_no_floor():
    x = torch.full((10, 3, 4), 2.0, dtype=torch.float64)  # blank images: no median cell to go by
    accumulator = CellMoments(3, 4)
    accumulator.update(x)
    with pytest.warns(RuntimeWarning) as record:
        fits = fit_cells(accumulator.moments())
    message = " ".join(str(w.message) for w in record)
    assert "3 of 3 cells had (almost) no variance" in message and "added" not in message
    assert all(float(fit.std.abs().max()) == 0.0 for fit in fits)


def test_batched_cell_fits_equal_one_fit_per_cell_and_fall_back_alone(monkeypatch):
    from anomaly.stats import cells
    from anomaly.stats.gaussian import fit_gaussian

    x = cell_data(30, 5, 6)
    x[:, 2, :3] = 7.0  # cell 2 has constant features: zero shrinkage would leave it singular
    accumulator = CellMoments(5, 6)
    accumulator.update(x)
    fits = fit_cells(accumulator.moments())
    inverse = cells.batched_inverse_

    def cell_4_inaccurate(matrices, **options):
        accurate = inverse(matrices, **options)
        accurate[4] = False
        return accurate

    monkeypatch.setattr(cells, "batched_inverse_", cell_4_inaccurate)
    with pytest.warns(RuntimeWarning, match="1 of 5 cells a singular covariance"):
        fallen = fit_cells(accumulator.moments())  # cell 4 fitted alone
    for k in range(5):
        alone = fit_gaussian(cells.cell_moments(accumulator.moments(), k))
        for fit in (fits[k], fallen[k]):
            assert fit.shrinkage == pytest.approx(alone.shrinkage, rel=1e-12, abs=1e-15)
            for name in ("mean", "covariance", "precision", "std"):
                torch.testing.assert_close(getattr(fit, name), getattr(alone, name), rtol=1e-9, atol=1e-9)


def test_cell_fits_in_chunks_equal_one_batch_and_the_scorer_keeps_their_tensors():
    x = cell_data(30, 7, 5)
    x[:, 4] = 5.0  # constant: fitted alone (pseudo-inverse), in whichever chunk it falls
    accumulator = CellMoments(7, 5)
    accumulator.update(x)
    with pytest.warns(RuntimeWarning):
        whole = fit_cells(accumulator.moments())
    with pytest.warns(RuntimeWarning):
        chunked = fit_cells(accumulator.moments(), chunk_bytes=2 * 5 * 5 * 8)  # two cells at a time
    for name in ("mean", "precision", "shrinkage", "std"):
        assert torch.equal(getattr(chunked, name), getattr(whole, name)), name
    assert len(whole) == 7 and [fit.shrinkage for fit in whole] == whole.shrinkage.tolist()
    assert torch.equal(whole[-1].precision, whole.precision[6])
    scorer = CellGaussianScorer(7, 5)
    scorer.set_fit(whole)
    assert scorer.precision.data_ptr() == whole.precision.data_ptr()  # not a stacked copy


def test_the_cell_fits_need_one_matrix_per_cell_besides_the_moments():
    """The covariances become the precisions in their own memory; the inversion's check copies a bounded
    chunk of them (before: a copy of all of them, and another when the scorer stacked the fits)."""
    clear_refs = Path("/proc/self/clear_refs")
    if not clear_refs.exists():
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak resident memory")
    cells, dim = 36, 352  # (K, D, D) above glibc's largest mmap threshold (32 MiB): freed, it leaves
    matrices_bytes = cells * dim * dim * 8
    generator = torch.Generator().manual_seed(0)
    for warm_up in (True, False):  # the first fit of this size pages in LAPACK's code (a few MB)
        accumulator = CellMoments(2 if warm_up else cells, dim)
        accumulator.update(torch.randn(40, accumulator.cells, dim, generator=generator))
        if warm_up:
            fit_cells(accumulator.moments())
    moments = accumulator.moments()
    clear_refs.write_text("5")  # the peak resident memory restarts from the current one
    before = peak_rss_bytes()
    fits = fit_cells(moments)
    CellGaussianScorer(cells, dim).set_fit(fits)
    growth = peak_rss_bytes() - before
    assert growth < 1.5 * matrices_bytes, f"the fit took {growth / matrices_bytes:.1f} (K, D, D) tensors"
    assert fits.precision.shape == (cells, dim, dim)
