"""Streaming Ledoit-Wolf against sklearn, and the distances against scipy."""

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.spatial.distance import mahalanobis as scipy_mahalanobis
from scipy.spatial.distance import seuclidean
from sklearn.covariance import LedoitWolf

from anomaly.stats.distances import l2_distance, mahalanobis, standardised_euclidean
from anomaly.stats.gaussian import batched_inverse_, fit_gaussian, invert_spd
from anomaly.stats.moments import RunningMoments, batch_moments, merge_moments, shift_moments


def correlated_features(n: int, dim: int, offset: float, seed: int) -> np.ndarray:
    """Non-Gaussian, correlated, ReLU-like features with a large common offset."""
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(dim, dim)) / np.sqrt(dim)
    x = np.maximum(rng.standard_t(df=5, size=(n, dim)) @ mixing, 0) * rng.uniform(0.5, 3, size=dim)
    return x + offset


def stream(x: np.ndarray, batch: int) -> RunningMoments:
    acc = RunningMoments(x.shape[1])
    for start in range(0, len(x), batch):
        acc.update(torch.from_numpy(x[start : start + batch]).float())
    return acc


def streamed_and_sklearn(
    n: int, dim: int, offset: float, batch: int
) -> tuple[RunningMoments, np.ndarray, LedoitWolf]:
    """The features streamed in batches, as the stream receives them (float32), and sklearn's fit."""
    x = correlated_features(n, dim, offset, seed=n + dim)
    x32 = x.astype(np.float32).astype(np.float64)
    return stream(x, batch), x32, LedoitWolf().fit(x32)


@pytest.mark.parametrize(
    ("n", "dim", "offset", "batch"),
    [(50, 120, 0.0, 7), (40, 300, 1000.0, 16), (400, 24, 0.0, 64), (300, 48, 500.0, 33), (3, 10, 10.0, 1)],
)
def test_streaming_ledoit_wolf_equals_sklearn(n, dim, offset, batch):
    accumulator, x32, reference = streamed_and_sklearn(n, dim, offset, batch)
    fit = fit_gaussian(accumulator.moments())
    np.testing.assert_allclose(fit.mean.numpy(), reference.location_, rtol=1e-6, atol=1e-9 * (1 + offset))
    np.testing.assert_allclose(fit.covariance.numpy(), reference.covariance_, rtol=1e-6, atol=1e-9)
    assert fit.shrinkage == pytest.approx(reference.shrinkage_, rel=1e-6)
    scale = np.abs(reference.precision_).max()
    np.testing.assert_allclose(fit.precision.numpy(), reference.precision_, rtol=1e-6, atol=1e-8 * scale)
    np.testing.assert_allclose(fit.std.numpy(), x32.std(axis=0, ddof=1), rtol=1e-6, atol=1e-9)


def test_batches_and_epochs_equal_one_batch():
    x = correlated_features(90, 20, 3.0, seed=1)
    one = stream(x, len(x)).moments()
    many = RunningMoments(20)
    for _epoch in range(3):  # three identical epochs == the data repeated three times
        for start in range(0, 90, 11):
            many.update(torch.from_numpy(x[start : start + 11]).float())
    repeated = stream(np.concatenate([x, x, x]), 270).moments()
    m = many.moments()
    assert m.n == 270
    for name in ("sum", "outer", "sqnorm_vec", "quartic"):
        a = getattr(shift_moments(m, repeated.shift), name)
        np.testing.assert_allclose(a.numpy(), getattr(repeated, name).numpy(), rtol=1e-9, atol=1e-9)
    fit_repeated, fit_many = fit_gaussian(repeated), fit_gaussian(m)
    torch.testing.assert_close(fit_repeated.mean, fit_many.mean, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(fit_repeated.covariance, fit_many.covariance, rtol=1e-9, atol=1e-12)
    one_epoch = stream(x, 11).moments()
    torch.testing.assert_close(
        fit_gaussian(one).precision, fit_gaussian(one_epoch).precision, rtol=1e-9, atol=1e-9
    )


def test_shift_and_merge_are_exact():
    x = torch.from_numpy(correlated_features(60, 8, 100.0, seed=2))
    a = batch_moments(x[:25], x[:25].mean(0))
    b = batch_moments(x[25:], x[25:].mean(0) + 7.0)
    merged = merge_moments(a, b)
    direct = batch_moments(x, a.shift)
    for name in ("count", "sum", "outer", "sqnorm_vec", "quartic"):
        torch.testing.assert_close(getattr(merged, name), getattr(direct, name), rtol=1e-10, atol=1e-8)
    centred = merged.centred()
    assert centred.sum.abs().max() < 1e-8
    torch.testing.assert_close(
        centred.quartic, ((x - x.mean(0)) ** 2).sum(1).pow(2).sum(), rtol=1e-10, atol=0
    )


def test_distances_equal_scipy():
    x = correlated_features(120, 16, 5.0, seed=3)
    fit = fit_gaussian(stream(x, 32).moments())
    queries = correlated_features(10, 16, 5.3, seed=4)
    q = torch.from_numpy(queries)
    maha = mahalanobis(q, fit.mean, fit.precision).numpy()
    l2 = l2_distance(q, fit.mean).numpy()
    sed = standardised_euclidean(q, fit.mean, fit.std).numpy()
    mean, precision, var = fit.mean.numpy(), fit.precision.numpy(), fit.std.numpy() ** 2
    for i, row in enumerate(queries):
        assert maha[i] == pytest.approx(scipy_mahalanobis(row, mean, precision), rel=1e-10)
        assert l2[i] == pytest.approx(np.linalg.norm(row - mean), rel=1e-10)
        assert sed[i] == pytest.approx(seuclidean(row, mean, var), rel=1e-10)


def test_sed_ignores_dead_features():
    x = correlated_features(50, 6, 0.0, seed=5)
    x[:, 2] = 0.0  # a dead ReLU channel
    fit = fit_gaussian(stream(x, 50).moments())
    q = torch.from_numpy(x[:3] + 1.0)
    sed = standardised_euclidean(q, fit.mean, fit.std)
    assert torch.isfinite(sed).all()
    alive = [0, 1, 3, 4, 5]
    expected = seuclidean(q[0, alive].numpy(), fit.mean[alive].numpy(), fit.std[alive].numpy() ** 2)
    assert sed[0].item() == pytest.approx(expected, rel=1e-10)


def test_invert_spd_falls_back_to_pseudo_inverse():
    v = torch.randn(5, 2, dtype=torch.float64)
    singular = v @ v.T
    with pytest.warns(RuntimeWarning, match="pseudo-inverse"):
        inverse = invert_spd(singular)
    np.testing.assert_allclose(inverse.numpy(), np.linalg.pinv(singular.numpy(), hermitian=True), atol=1e-8)


def test_batched_inverse_inverts_in_place_chunk_by_chunk_and_replaces_the_inaccurate_ones():
    generator = torch.Generator().manual_seed(0)
    factors = torch.randn(7, 6, 9, generator=generator, dtype=torch.float64)
    matrices = factors @ factors.mT + 0.1 * torch.eye(6, dtype=torch.float64)
    matrices[3] = torch.outer(factors[3, :, 0], factors[3, :, 0])  # singular: rank one
    whole, chunked = matrices.clone(), matrices.clone()
    storage = chunked.data_ptr()
    with pytest.warns(RuntimeWarning, match="pseudo-inverse"):
        accurate = batched_inverse_(whole, fallback=invert_spd)
    with pytest.warns(RuntimeWarning, match="pseudo-inverse"):
        # chunks of one matrix (a byte budget below one) give the very same inverses, bit for bit
        assert torch.equal(batched_inverse_(chunked, fallback=invert_spd, chunk_bytes=1), accurate)
    assert chunked.data_ptr() == storage and torch.equal(chunked, whole)
    assert accurate.tolist() == [k != 3 for k in range(7)]
    for k in range(7):
        expected = np.linalg.pinv(matrices[k].numpy(), hermitian=True)
        np.testing.assert_allclose(chunked[k].numpy(), expected, rtol=1e-7, atol=1e-9)
    left = matrices.clone()
    batched_inverse_(left, chunk_bytes=3 * 6 * 6 * 8)  # without a fallback the inaccurate one is left
    assert torch.equal(left[:3], whole[:3]) and torch.equal(left[4:], whole[4:])


@pytest.mark.parametrize("seed", range(40))
def test_two_images_give_sklearns_mahalanobis(seed):
    """n = 2: the covariance is rank one plus a shrinkage of rounding size (or a slightly negative one).

    Cholesky may still succeed, or keep a negative eigenvalue; the precision must be sklearn's pinvh.
    """
    rng = np.random.default_rng(seed)
    dim = int(rng.integers(2, 50))
    x = rng.normal(size=(2, dim))
    acc = RunningMoments(dim)
    acc.update(torch.from_numpy(x[:1]))
    acc.update(torch.from_numpy(x[1:]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        fit = fit_gaussian(acc.moments())
    reference = LedoitWolf().fit(x)
    assert 0.0 <= fit.shrinkage < 1e-12
    queries = rng.normal(size=(3, dim))
    ours = mahalanobis(torch.from_numpy(queries), fit.mean, fit.precision).numpy()
    expected = np.sqrt(np.maximum(reference.mahalanobis(queries), 0))
    np.testing.assert_allclose(ours, expected, rtol=1e-6, atol=1e-9)


def peak_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/self/status")


def test_the_fit_needs_one_matrix_of_the_dimension_besides_the_moments():
    """The scatter, the covariance, its Cholesky factor and the precision share one D x D matrix, and
    LAPACK works on it in place: no second one (a fit with copies needs five)."""
    clear_refs = Path("/proc/self/clear_refs")
    if not clear_refs.exists():
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak resident memory")
    dim = 2100  # a matrix above glibc's largest mmap threshold (32 MiB): freed, it leaves the process
    matrix_bytes = dim * dim * 8
    accumulator = RunningMoments(dim)
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        accumulator.update(torch.randn(40, dim, generator=generator))
    moments = accumulator.moments()
    clear_refs.write_text("5")  # the peak resident memory restarts from the current one
    before = peak_rss_bytes()
    fit = fit_gaussian(moments)
    growth = peak_rss_bytes() - before
    assert growth < 2 * matrix_bytes, f"the fit took {growth / matrix_bytes:.1f} D x D matrices"
    vectors = torch.randn(dim, 3, generator=generator, dtype=torch.float64)
    torch.testing.assert_close(fit.covariance @ (fit.precision @ vectors), vectors, rtol=0, atol=1e-8)
