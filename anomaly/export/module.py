"""The whole detector as one traceable module: images -> backbone -> pooling -> Gaussian score.

The backbone's TensorFlow-style "SAME" padding is computed from the input size
at run time; tracing fixes it for the detector's own square size, so exported
files take ``(B, 3, S, S)`` images with any batch size ``B`` and exactly that ``S``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from anomaly.detector.api import GaussianDetector
from anomaly.errors import UserError
from anomaly.methods.base import SUM, split_column
from anomaly.stats.distances import l2_distance, mahalanobis

EXPORTABLE_TYPES = ("mahalanobis", "l2")


class ExportedDetector(nn.Module):
    """``forward(images) -> (score (B,), level_scores (B, L))`` for the detector's decision score.

    ``images`` are (B, 3, S, S) RGB, uint8 in 0..255 or float in [0, 1];
    ``level_scores[:, i]`` is level ``levels[i]``'s Mahalanobis (eq. 2) or L2
    distance, and ``score`` is their sum (sum mode) or the decision level's column.
    """

    def __init__(self, detector: GaussianDetector) -> None:
        super().__init__()
        model = detector.model_
        if model is None or model.extractor is None:
            raise UserError("only a fitted image detector (with a backbone) can be exported")
        score_type, level = split_column(detector.score)
        if score_type not in EXPORTABLE_TYPES:
            raise UserError(f"export supports the {' and '.join(EXPORTABLE_TYPES)} scores, not {score_type}")
        self.extractor = model.extractor
        self.scorers = model.scorers
        self.levels = list(model.levels)
        self.score_type = score_type
        self.decision_index = None if level == SUM else self.levels.index(int(level))
        self.image_size = detector.image_size_

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        features = self.extractor(images, self.levels)
        per_level = []
        for scorer, feats in zip(self.scorers, features, strict=True):
            z = scorer.project(feats)
            if self.score_type == "mahalanobis":
                per_level.append(mahalanobis(z, scorer.mean, scorer.precision))
            else:
                per_level.append(l2_distance(z, scorer.mean))
        level_scores = torch.stack(per_level, dim=1)
        score = (
            level_scores.sum(dim=1) if self.decision_index is None else level_scores[:, self.decision_index]
        )
        return score, level_scores


def example_input(image_size: int, input_dtype: str, batch: int = 2) -> Tensor:
    """A fixed example batch of the exported input type (``uint8`` or ``float``)."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch, 3, image_size, image_size), dtype=torch.uint8, generator=generator)
    if input_dtype == "uint8":
        return images
    if input_dtype == "float":
        return images.float() / 255.0
    raise UserError(f"input_dtype must be uint8 or float, got {input_dtype!r}")


def prepare_export(
    detector: GaussianDetector, path: str | Path, input_dtype: str
) -> tuple[ExportedDetector, Path, Tensor]:
    """The module to export in eval mode, the output path (its folder created) and an example input."""
    module = ExportedDetector(detector).eval()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return module, path, example_input(module.image_size, input_dtype).to(detector.device)
