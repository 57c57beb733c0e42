"""The low-rank form of fewer rows than dimensions against sklearn, and the rows it is fitted from."""

import warnings

import numpy as np
import pytest
import torch
from sklearn.covariance import LedoitWolf

from anomaly.stats.gaussian import fit_gaussian
from anomaly.stats.grid_cells import GridCellScorer
from anomaly.stats.low_rank import LowRankPrecision, fit_rows, fit_streamed
from anomaly.stats.moments import Moments, Rows, RunningMoments, batch_moments
from anomaly.stats.scorer import GaussianScorer
from tests.stats.test_gaussian import correlated_features, stream, streamed_and_sklearn


@pytest.mark.parametrize(
    ("n", "dim", "offset", "batch"),
    [(50, 120, 0.0, 7), (40, 300, 1000.0, 16), (3, 10, 10.0, 1), (24, 24, 5.0, 5), (150, 2000, 2.0, 32)],
)
def test_the_low_rank_fit_equals_sklearn(n, dim, offset, batch):
    """Mean, shrinkage, std, precision and Mahalanobis distances as sklearn's ``LedoitWolf``."""
    accumulator, x32, reference = streamed_and_sklearn(n, dim, offset, batch)
    value = accumulator.value()
    assert isinstance(value, Rows) and value.n == n
    kept = value.rows.clone()
    fit = fit_rows(value)
    assert torch.equal(value.rows, kept)  # the accumulator's rows are left as they were
    assert isinstance(fit.precision, LowRankPrecision) and fit.precision.basis.shape[1] < n
    assert fit.precision.basis.is_contiguous()
    np.testing.assert_allclose(fit.mean.numpy(), reference.location_, rtol=1e-9, atol=1e-9 * (1 + offset))
    assert fit.shrinkage == pytest.approx(reference.shrinkage_, rel=1e-9)
    np.testing.assert_allclose(fit.std.numpy(), x32.std(axis=0, ddof=1), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(fit.covariance.numpy(), reference.covariance_, rtol=1e-9, atol=1e-12)
    if dim <= 300:
        scale = np.abs(reference.precision_).max()
        precision = fit.precision.dense().numpy()
        np.testing.assert_allclose(precision, reference.precision_, rtol=1e-7, atol=1e-9 * scale)
    queries = correlated_features(6, dim, offset + 0.3, seed=7)
    scorer = GaussianScorer(dim)
    scorer.set_fit(fit)
    ours = scorer(torch.from_numpy(queries))["mahalanobis"].numpy()
    np.testing.assert_allclose(ours, np.sqrt(reference.mahalanobis(queries)), rtol=1e-8)


def test_the_low_rank_and_the_dense_form_score_alike():
    """The same rows fitted both ways: the joint and the per-cell distances of a grid agree."""
    x = correlated_features(40, 9 * 12, 3.0, seed=11)
    rows = stream(x, 8).value()
    low_rank, dense = GridCellScorer(9, 9 * 12), GridCellScorer(9, 9 * 12)
    low_rank.set_fit(fit_rows(rows))
    dense.set_fit(fit_gaussian(rows.moments()))
    assert low_rank.low_rank is not None and dense.low_rank is None
    torch.testing.assert_close(low_rank.cell_covariance, dense.cell_covariance, rtol=1e-8, atol=1e-10)
    queries = torch.from_numpy(correlated_features(5, 9 * 12, 3.2, seed=12))
    ours, theirs = low_rank(queries), dense(queries)
    for kind in ours:
        torch.testing.assert_close(ours[kind], theirs[kind], rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(
        low_rank.whiten(queries - low_rank.mean), dense.whiten(queries - dense.mean), rtol=1e-8, atol=1e-10
    )


def test_the_cell_blocks_in_chunks_equal_one_batch_and_the_dense_precisions_blocks():
    x = correlated_features(30, 9 * 12, 3.0, seed=13)
    precision = fit_rows(stream(x, 8).value()).precision
    whole = precision.cell_blocks(9)
    for chunk_bytes in (1, 2 * 12 * precision.basis.shape[1] * 8):  # one cell, two cells at a time
        assert torch.equal(precision.cell_blocks(9, chunk_bytes=chunk_bytes), whole)
    dense = precision.dense().reshape(12, 9, 12, 9)
    expected = torch.stack([dense[:, j, :, j] for j in range(9)])
    torch.testing.assert_close(whole, expected, rtol=1e-9, atol=1e-9 * float(expected.abs().max()))


@pytest.mark.parametrize("seed", range(20))
def test_two_images_give_sklearns_pseudo_inverse(seed):
    """n = 2: a shrinkage of rounding size, so the precision is sklearn's ``pinvh``, not 1 / rounding."""
    rng = np.random.default_rng(seed)
    dim = int(rng.integers(2, 50))
    x = rng.normal(size=(2, dim))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        fit = fit_rows(stream(x, 1).value())
    reference = LedoitWolf().fit(x.astype(np.float32).astype(np.float64))
    queries = rng.normal(size=(3, dim))
    scorer = GaussianScorer(dim)
    scorer.set_fit(fit)
    expected = np.sqrt(np.maximum(reference.mahalanobis(queries), 0))
    np.testing.assert_allclose(scorer(torch.from_numpy(queries))["mahalanobis"].numpy(), expected, rtol=1e-6)


def assert_same_moments(ours: Moments, theirs: Moments) -> None:
    from anomaly.stats.moments import shift_moments

    ours = shift_moments(ours, theirs.shift)
    for name in ("count", "sum", "outer", "sqnorm_vec", "quartic"):
        torch.testing.assert_close(getattr(ours, name), getattr(theirs, name), rtol=1e-10, atol=1e-8)


def test_the_rows_are_kept_up_to_the_dimension_then_become_the_moments_for_good():
    dim = 12
    x = torch.from_numpy(correlated_features(30, dim, 50.0, seed=5))
    accumulator = RunningMoments(dim)
    assert accumulator.outer.numel() == 0 and accumulator.rows.shape == (0, dim)
    accumulator.update(x[:7])
    accumulator.update(x[7:12])
    assert accumulator.keeps_rows and accumulator.rows.shape == (12, dim) and accumulator.outer.numel() == 0
    assert_same_moments(accumulator.moments(), batch_moments(x[:12], x[:7].mean(0)))
    accumulator.update(x[12:13])  # the 13th row: the D x D moments from now on
    assert (
        not accumulator.keeps_rows and accumulator.rows.numel() == 0 and accumulator.outer.shape == (dim, dim)
    )
    accumulator.update(x[13:])
    assert isinstance(accumulator.value(), Moments)
    assert_same_moments(accumulator.value(), batch_moments(x, x[:7].mean(0)))
    accumulator.reset()
    assert accumulator.keeps_rows and accumulator.n == 0 and accumulator.outer.numel() == 0


@pytest.mark.parametrize("sizes", [(4, 5), (8, 9), (15, 3)])
def test_merges_of_rows_and_moments_equal_one_pass(sizes):
    """Rows into rows (kept while the union has at most D), rows into moments and moments into rows."""
    dim = 12
    x = torch.from_numpy(correlated_features(sum(sizes), dim, 20.0, seed=sum(sizes)))
    first, second = x[: sizes[0]], x[sizes[0] :]
    whole = batch_moments(x, x.mean(0))
    for a_dense, b_dense in [(False, False), (True, False), (False, True), (True, True)]:
        a, b = RunningMoments(dim), RunningMoments(dim)
        a.update(first)
        b.update(second)
        if a_dense:
            a.load_moments(a.moments())
        if b_dense:
            b.load_moments(b.moments())
        a.merge_(b.value())
        assert a.n == len(x)
        assert a.keeps_rows == (not (a_dense or b_dense) and len(x) <= dim)
        assert_same_moments(a.moments(), whole)
        if a.keeps_rows:
            torch.testing.assert_close(a.value().rows + a.shift, x, rtol=0, atol=1e-12)


def test_a_fit_from_rows_is_the_low_rank_form_and_from_moments_the_dense_one():
    x = correlated_features(30, 40, 1.0, seed=9)
    rows = stream(x, 10).value()
    assert isinstance(fit_streamed(rows).precision, LowRankPrecision)
    assert isinstance(fit_streamed(rows.moments()).precision, torch.Tensor)
