"""PCA/NPCA selection and the working-point arithmetic, against sklearn and scipy."""

import math

import numpy as np
import pytest
import torch
from scipy.stats import chi2
from sklearn.decomposition import PCA

from anomaly.errors import UserError
from anomaly.stats.pca import check_reduction, principal_components, reduction_projection, select_components
from anomaly.stats.threshold import (
    chi2_threshold,
    empirical_threshold,
    rates_at_threshold,
    sigma_fpr,
)


def sklearn_selection(x: np.ndarray, reduction: str, t: float) -> int:
    """The DESIGN's rule on sklearn's PCA: k = first index with cumulative ratio > t.

    Components beyond the rank n - 1 of the centred features (sklearn's last one when n <= D)
    have zero variance and an arbitrary direction; they are not counted.
    """
    ratio = PCA(n_components=None).fit(x).explained_variance_ratio_[: len(x) - 1]
    k = int(np.argmax(np.cumsum(ratio) > t))
    return k + 1 if reduction == "pca" else len(ratio) - (k - 1)


@pytest.mark.parametrize(("n", "dim"), [(200, 30), (25, 60)])
@pytest.mark.parametrize(("reduction", "t"), [("pca", 0.95), ("pca", 0.99), ("npca", 0.99), ("npca", 0.999)])
def test_retained_dimensionality_equals_sklearn(n, dim, reduction, t):
    rng = np.random.default_rng(n + dim)
    x = rng.normal(size=(n, dim)) @ np.diag(np.geomspace(10, 0.01, dim)) @ rng.normal(size=(dim, dim))
    centred = x - x.mean(0)
    emp_cov = torch.from_numpy(centred.T @ centred / n)
    projection = reduction_projection(emp_cov, n, reduction, t)
    assert projection.shape == (dim, sklearn_selection(x, reduction, t))
    ratio, _ = principal_components(emp_cov, n)
    reference = PCA(n_components=None).fit(x).explained_variance_ratio_
    np.testing.assert_allclose(ratio.numpy(), reference[: min(n - 1, dim)], atol=1e-12)
    if n <= dim:
        assert reference[n - 1] < 1e-12  # the component sklearn adds: no variance, no meaning


def test_few_images_keep_only_directions_they_span():
    """n <= D: every kept NPCA direction lies in the span of the centred features (none is arbitrary)."""
    rng = np.random.default_rng(3)
    n, dim = 12, 40
    x = rng.normal(size=(n, dim)) * np.geomspace(5, 0.1, dim)
    centred = x - x.mean(0)
    projection = reduction_projection(torch.from_numpy(centred.T @ centred / n), n, "npca", 0.99).numpy()
    assert projection.shape[1] <= n - 1
    inside = np.linalg.lstsq(centred.T, projection, rcond=None)[0]  # projection = centred.T @ coefficients
    np.testing.assert_allclose(centred.T @ inside, projection, atol=1e-10)


def test_npca_keeps_the_low_variance_components():
    ratio = torch.tensor([0.6, 0.3, 0.095, 0.004, 0.001])
    # cumulative ratio 0.6, 0.9, 0.995, ...: k = 2 is the first index above 0.99
    assert select_components(ratio, "npca", 0.99) == slice(1, 5)  # components k-1..end
    assert select_components(ratio, "pca", 0.99) == slice(0, 3)  # components 0..k
    assert select_components(ratio, "pca", 0.5) == slice(0, 1)


@pytest.mark.parametrize(
    ("reduction", "threshold", "message"),
    [
        ("pca", 1.0, "between 0 and 1"),
        ("npca", 0.0, "between 0 and 1"),
        ("pca+npca", 0.99, "not both"),
        ("lda", 0.9, "unknown reduction"),
    ],
)
def test_bad_reduction_options(reduction, threshold, message):
    with pytest.raises(UserError, match=message):
        check_reduction(reduction, threshold)


def test_npca_that_keeps_nothing_is_an_error():
    ratio = torch.tensor([0.5, 0.3, 0.2])  # the cumulative ratio never exceeds 0.999999999...
    ratio = ratio / ratio.sum() * (1 - 1e-12)
    with pytest.raises(UserError, match="zero components"):
        select_components(ratio, "npca", 1 - 1e-13)


def test_sigma_rows_match_table_iv():
    expected = [0.3173, 0.0455, 0.0027, 6.33e-5, 5.73e-7]
    for n, value in zip(range(1, 6), expected, strict=True):
        assert sigma_fpr(n) == pytest.approx(value, rel=2e-3)


@pytest.mark.parametrize("dim", [1, 17, 272, 1792])
@pytest.mark.parametrize("fpr", [0.3173, 0.01, 2.7e-3, 5.7e-7])
def test_chi2_threshold_inverts_the_cdf(dim, fpr):
    t = chi2_threshold(dim, fpr)
    assert chi2.cdf(t**2, dim) == pytest.approx(1 - fpr, rel=1e-9, abs=1e-12)
    assert chi2.sf(t**2, dim) == pytest.approx(fpr, rel=1e-6)
    assert t == pytest.approx(math.sqrt(chi2.ppf(1 - fpr, dim)), rel=1e-6)


def test_bad_target_fpr():
    for fpr in (0.0, 1.0, -0.1, 2):
        with pytest.raises(UserError, match="target_fpr"):
            chi2_threshold(5, fpr)


def test_achieved_rates_and_empirical_threshold():
    scores = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0])
    labels = torch.tensor([0, 0, 0, 0, 1, 0, 1, 1])
    fpr, tpr = rates_at_threshold(scores, labels, 3.5)
    assert fpr == pytest.approx(2 / 5) and tpr == pytest.approx(1.0)
    fpr, tpr = rates_at_threshold(scores, labels, 6.5)
    assert fpr == 0.0 and tpr == pytest.approx(2 / 3)
    normal = torch.arange(1.0, 101.0)
    t = empirical_threshold(normal, 0.05)
    assert t == 95.0 and (normal > t).double().mean() == pytest.approx(0.05)
    assert empirical_threshold(normal, 1e-6) == 100.0  # tiny FPR: the largest held-out score
