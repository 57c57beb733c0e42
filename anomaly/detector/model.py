"""The fitted detector as one ``nn.Module``: optional backbone, per-level Gaussians, score columns.

It scores exactly like :class:`~anomaly.methods.gaussian.GaussianAD`: each
level's pooled features go through a :class:`~anomaly.stats.scorer.GaussianScorer`
(projection, then Mahalanobis eq. 2, L2 and SED eq. 9), and ``<type>/sum`` adds
the levels with equal weights (the paper's sum mode).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from anomaly.backbones import FeatureExtractor
from anomaly.errors import UserError
from anomaly.stats.distances import level_columns
from anomaly.stats.scorer import GaussianScorer


def scorer_from_tensors(tensors: dict[str, Tensor]) -> GaussianScorer:
    """A fitted scorer whose buffers take the saved shapes (a (D, k) projection after PCA/NPCA)."""
    in_dim, dim = tensors["projection"].shape
    scorer = GaussianScorer(int(in_dim), int(dim))
    for name, value in tensors.items():
        setattr(scorer, name, value.clone())
    scorer.fitted = torch.ones((), dtype=torch.bool)
    return scorer


class DetectorModel(nn.Module):
    """Per-level Gaussian scorers, with the frozen backbone that feeds them (``None``: features only).

    Args:
        extractor: the backbone, or ``None`` for a detector fitted on user features.
        levels: the backbone levels (1-based) of the scorers, in order.
        scorers: one fitted :class:`GaussianScorer` per level.
    """

    def __init__(
        self, extractor: FeatureExtractor | None, levels: Sequence[int], scorers: Sequence[GaussianScorer]
    ) -> None:
        super().__init__()
        if len(levels) != len(scorers) or not levels:
            raise ValueError(f"{len(levels)} levels but {len(scorers)} scorers")
        self.extractor = extractor
        self.levels = [int(level) for level in levels]
        self.scorers = nn.ModuleList(scorers)

    @property
    def in_dims(self) -> list[int]:
        """The feature width each level expects."""
        return [int(s.projection.shape[0]) for s in self.scorers]

    @torch.no_grad()
    def score_features(self, features: Sequence[Tensor]) -> dict[str, Tensor]:
        """Score columns for per-level feature batches ``[(B, D_l), ...]``."""
        if len(features) != len(self.scorers):
            raise UserError(f"expected features for {len(self.scorers)} levels, got {len(features)}")
        for level, feats, dim in zip(self.levels, features, self.in_dims, strict=True):
            if feats.ndim != 2 or feats.shape[1] != dim:
                raise UserError(
                    f"level {level} expects features of shape (n, {dim}), got {tuple(feats.shape)}"
                )
        device = self.scorers[0].mean.device
        per_level = [scorer(f.to(device)) for scorer, f in zip(self.scorers, features, strict=True)]
        return level_columns(self.levels, per_level)

    @torch.no_grad()
    def features(self, images: Tensor) -> list[Tensor]:
        """The backbone's pooled features of the detector's levels for (B, 3, S, S) images."""
        if self.extractor is None:
            raise UserError("this detector was fitted on features, not images: pass features instead")
        return self.extractor(images, self.levels)

    @torch.no_grad()
    def score_images(self, images: Tensor) -> dict[str, Tensor]:
        """Score columns for a batch of (B, 3, S, S) uint8 or [0, 1] float images."""
        return self.score_features(self.features(images))
