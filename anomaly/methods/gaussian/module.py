"""The paper's method as a LightningModule (Rippel et al., ICPR 2020).

* ``training_step`` streams each level's pooled features into float64 running
  moments on the batch's device; no feature is stored, so memory is flat in the
  number of images and epochs.
* ``on_train_end`` merges the moments of all processes, then fits the
  Ledoit-Wolf Gaussian per level (mean, shrunk covariance, precision).
* ``test_step`` scores each image per level by Mahalanobis (eq. 2), L2 and SED
  (eq. 9) from one forward pass; ``<type>/sum`` is the paper's sum mode.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from anomaly.errors import UserError
from anomaly.methods.base import SUM
from anomaly.methods.features import FeatureMethod
from anomaly.stats.distances import SCORE_TYPES
from anomaly.stats.gaussian import fit_gaussian
from anomaly.stats.moments import Moments, RunningMoments, merge_moments
from anomaly.stats.scorer import GaussianScorer


def all_gather_moments(moments: Moments) -> list[Moments]:
    """Every process's moments, in rank order (a list of one without DDP)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [moments]
    fields = [moments.count, moments.shift, moments.sum, moments.outer, moments.sqnorm_vec, moments.quartic]
    flat = torch.cat([f.reshape(-1) for f in fields])
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    out = []
    for buffer in gathered:
        parts, offset = [], 0
        for f in fields:
            parts.append(buffer[offset : offset + f.numel()].reshape(f.shape))
            offset += f.numel()
        out.append(Moments(*parts))
    return out


def merge_all(parts: list[Moments]) -> Moments:
    """Merge moments in order, skipping empty ones (a process may have seen no image)."""
    non_empty = [m for m in parts if m.count.item() > 0]
    if not non_empty:
        return parts[0]
    merged = non_empty[0]
    for m in non_empty[1:]:
        merged = merge_moments(merged, m)
    return merged


class GaussianAD(FeatureMethod):
    """Multivariate Gaussian per level of a frozen ImageNet classifier.

    Args:
        backbone: e.g. ``efficientnet-b4``, ``resnet18``, ``efficientnet-lite0``.
        levels: 1-based levels to fit and sum (default: all).
        weights: a local weights file instead of the backbone's usual download.
        pretrained: ``False`` gives random weights (for tests only).
    """

    method_name = "gaussian"
    primary_score = f"mahalanobis/{SUM}"

    def __init__(
        self,
        backbone: str = "efficientnet-lite0",
        levels: Sequence[int] | None = None,
        weights: str | None = None,
        pretrained: bool = True,
    ) -> None:
        super().__init__(backbone, levels, weights, pretrained)
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.moments = nn.ModuleList(RunningMoments(d) for d in self.level_dims)
        self.scorers = nn.ModuleList(GaussianScorer(d) for d in self.level_dims)
        self.fit_epochs = 0

    def configure_optimizers(self) -> None:
        return None

    # -------------------------------------------------------------------- fit
    def on_train_start(self) -> None:
        for accumulator in self.moments:
            accumulator.reset()
        self.fit_epochs = 0

    def training_step(self, batch: dict, batch_idx: int) -> None:
        with torch.no_grad():
            for accumulator, feats in zip(self.moments, self.batch_features(batch), strict=True):
                accumulator.update(feats)

    def on_train_epoch_end(self) -> None:
        self.fit_epochs += 1

    def on_train_end(self) -> None:
        """Merge the moments of all processes, then fit each level's Gaussian."""
        for accumulator in self.moments:
            accumulator.load_moments(merge_all(all_gather_moments(accumulator.moments())))
        self.finalise()

    def finalise(self) -> None:
        for accumulator, scorer in zip(self.moments, self.scorers, strict=True):
            scorer.set_fit(fit_gaussian(accumulator.moments()))

    # ------------------------------------------------------------------ score
    def score_batch(self, batch: dict) -> dict[str, Tensor]:
        return self.score_features(self.batch_features(batch))

    @torch.no_grad()
    def score_images(self, images: Tensor) -> dict[str, Tensor]:
        """Score columns for a batch of images (see :meth:`score_features`)."""
        return self.score_features(self.features(images))

    @torch.no_grad()
    def score_features(self, features: list[Tensor]) -> dict[str, Tensor]:
        """``{"<type>/<level>": (B,)}`` for every score type and level, plus ``"<type>/sum"``."""
        if not all(bool(s.fitted) for s in self.scorers):
            raise UserError("the detector is not fitted yet: run fit before test")
        columns: dict[str, Tensor] = {}
        for level, scorer, feats in zip(self.levels, self.scorers, features, strict=True):
            for score_type, values in scorer(feats).items():
                columns[f"{score_type}/{level}"] = values
        for score_type in SCORE_TYPES:
            columns[f"{score_type}/{SUM}"] = sum(columns[f"{score_type}/{level}"] for level in self.levels)
        return columns

    def extra_results(self) -> dict:
        return {
            "levels": self.levels,
            "level_dims": {str(lv): s.dim for lv, s in zip(self.levels, self.scorers, strict=True)},
            "shrinkage": {
                str(lv): float(s.shrinkage) for lv, s in zip(self.levels, self.scorers, strict=True)
            },
            "n_fit_vectors": self.moments[0].n,
            "epochs": self.fit_epochs,
        }
