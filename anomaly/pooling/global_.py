"""The paper's pooling (Sec. III-A): each level's map averaged over space to one C-dim vector."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from anomaly.backbones import FeatureExtractor
from anomaly.pooling.base import FLOAT64_BYTES, Pooling
from anomaly.stats.low_rank import fit_streamed
from anomaly.stats.moments import Moments, Rows, RunningMoments
from anomaly.stats.scorer import GaussianScorer, precision_shapes


class VectorPooling(Pooling):
    """One Gaussian per level over one vector per image (global and grid pooling share this)."""

    def state_bytes(self, channels: Sequence[int], samples: int | None = None) -> int:
        dims = [self.modelled_dim(c) for c in channels]
        return sum(2 * d * (d if samples is None else min(d, samples)) * FLOAT64_BYTES for d in dims)

    def accumulator(self, dim: int) -> RunningMoments:
        return RunningMoments(dim)

    def scorer(self, dim: int) -> GaussianScorer:
        return GaussianScorer(dim)

    def fit(self, scorer: nn.Module, moments: Moments | Rows, projection: Tensor | None = None) -> None:
        scorer.set_fit(fit_streamed(moments), projection)

    def expected_shapes(self, in_dim: int, tensors: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        projection = tensors.get("projection")
        dim = projection[1] if projection is not None and len(projection) == 2 else in_dim
        shapes = precision_shapes(dim, tensors)
        if projection is not None:
            shapes["projection"] = (in_dim, dim)
        return shapes

    def scorer_from_tensors(self, tensors: dict[str, Tensor], in_dim: int) -> GaussianScorer:
        scorer = GaussianScorer(1)  # placeholders, replaced below
        scorer.projection = tensors.get("projection", torch.zeros(in_dim, 0, dtype=torch.float64))
        scorer.set_tensors(tensors)
        return scorer


class Global(VectorPooling):
    """Global average pooling: a level of C channels gives one C-dim vector per image."""

    name = "global"

    def pool(self, extractor: FeatureExtractor, images: Tensor, levels: Sequence[int]) -> list[Tensor]:
        return extractor(images, levels)

    def modelled_dim(self, channels: int) -> int:
        return channels


__all__ = ["Global", "VectorPooling"]
