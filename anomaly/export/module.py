"""The whole detector as one traceable module: images -> backbone -> pooling -> Gaussian score.

The backbone's TensorFlow-style "SAME" padding is computed from the input size
at run time; tracing fixes it for the detector's own square size, so exported
files take ``(B, 3, S, S)`` images with any batch size ``B`` and exactly that ``S``
(with tiles, ``(B, 3, rows*S, cols*S)``: the model cuts and merges the tiles itself;
the caller resizes, pads or crops as the detector's ``preprocessing`` says).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from anomaly.columns import ScoreColumn
from anomaly.detector.api import GaussianDetector
from anomaly.detector.model import MIXED_PRECISIONS, GaussianDetectorModel
from anomaly.errors import UserError


class ExportedDetector(nn.Module):
    """``forward(images) -> (score (B,), level_scores (B, L)[, map (B, k, k)])``: the detector's forward.

    ``images`` are (B, 3, S, S) RGB, uint8 in 0..255 or float in [0, 1]. This wraps
    the detector's own :class:`~anomaly.detector.model.GaussianDetectorModel` and
    only picks tensors out of its output: ``score`` is the decision score column,
    ``level_scores[:, i]`` level ``levels[i]``'s score of the same kind, and ``map``
    (map-capable poolings) the coarse anomaly map.
    """

    def __init__(self, detector: GaussianDetector) -> None:
        super().__init__()
        model = detector.model_
        if model is None or model.extractor is None:
            raise UserError("only a fitted image detector (with a backbone) can be exported")
        if model.precision in MIXED_PRECISIONS:
            raise UserError(
                f"the detector was trained with precision {model.precision}: export reproduces float32 "
                "arithmetic only; fit it with --trainer.precision 32-true to export it"
            )
        self.model: GaussianDetectorModel = model
        column = ScoreColumn.parse(detector.decision_score_)
        self.score_column = str(column)
        self.level_columns = [str(ScoreColumn(column.kind, level)) for level in model.levels]
        self.image_size = detector.image_size_
        self.input_shape = model.geometry.canvas(self.image_size)

    @property
    def output_names(self) -> list[str]:
        return ["score", "level_scores", *(["map"] if self.model.makes_maps else [])]

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        columns, maps = self.model(images)
        level_scores = torch.stack([columns[name] for name in self.level_columns], dim=1)
        outputs = (columns[self.score_column], level_scores)
        return outputs if maps is None else (*outputs, maps)


def example_input(
    image_size: int, input_dtype: str, batch: int = 2, shape: tuple[int, int] | None = None
) -> Tensor:
    """A fixed example batch of the exported input type (``uint8`` or ``float``), of ``(height,
    width)`` ``shape`` (default: square ``image_size``)."""
    generator = torch.Generator().manual_seed(0)
    height, width = shape or (image_size, image_size)
    images = torch.randint(0, 256, (batch, 3, height, width), dtype=torch.uint8, generator=generator)
    if input_dtype == "uint8":
        return images
    if input_dtype == "float":
        return images.float() / 255.0
    raise UserError(f"input_dtype must be uint8 or float, got {input_dtype!r}")


def prepare_export(
    detector: GaussianDetector, path: str | Path, input_dtype: str
) -> tuple[ExportedDetector, Path, Tensor]:
    """The module to export in eval mode, the output path and an example input."""
    module = ExportedDetector(detector).eval()
    path = Path(path)
    return (
        module,
        path,
        example_input(module.image_size, input_dtype, shape=module.input_shape).to(detector.device_),
    )
