import math

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from anomaly.evaluation.metrics import image_auroc


@pytest.mark.parametrize("scale", [1e-3, 1.0, 50.0, 1e4])
def test_auroc_equals_sklearn_for_distances_of_any_scale(scale):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, size=200)
    scores = (rng.normal(size=200) + labels * 0.8) * scale + 10 * scale  # large positive distances
    scores[:10] = scores[10]  # ties
    expected = roc_auc_score(labels, scores)
    assert image_auroc(torch.from_numpy(scores), torch.from_numpy(labels)) == pytest.approx(
        expected, rel=1e-15
    )


def test_auroc_keeps_nearby_large_distances_apart():
    """float32 rounds these to one value (AUROC 0.5); in float64 every anomaly scores higher."""
    labels = torch.tensor([0] * 50 + [1] * 50)
    scores = 1e4 + torch.arange(100, dtype=torch.float64) * 1e-7
    assert torch.unique(scores.float()).numel() == 1
    assert image_auroc(scores, labels) == 1.0


def test_auroc_is_nan_for_a_single_class():
    assert math.isnan(image_auroc(torch.rand(5), torch.zeros(5)))
