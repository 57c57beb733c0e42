"""Spatially-aware Gaussians and label-free level weighting (beyond the paper).

The paper pools every level globally (Sec. III-A) and sums the levels' Mahalanobis
distances with equal weight (sum mode). :class:`SpatialGaussianAD` keeps that as
its default (``pooling: global``, ``level_weighting: none``: the paper's method
exactly) and adds, opt-in:

* ``pooling: grid``: each level's map is average-pooled adaptively to ``k x k``
  cells and the ``k^2 C`` vector is modelled by one Ledoit-Wolf Gaussian (eq. 6);
  PCA/NPCA work as for global pooling.
* ``pooling: cells``: one Gaussian per cell and level (:mod:`anomaly.stats.cells`).
  A level's image score is the largest distance over its cells; the sum over levels
  is the paper's sum mode. The per-cell distances summed over levels form a coarse
  ``k x k`` anomaly map, upsampled to the image for pixel AUROC, PRO and overlays.
* ``level_weighting: holdout``: every level's distance is standardised by its
  mean and standard deviation on the fold's held-out normal fifth before the
  levels are summed. Only normal training images are used, never test labels.

All statistics are still streamed; the float64 state of the chosen pooling is
checked against ``memory_budget_gb`` before anything is allocated.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchmetrics.functional.classification import binary_auroc

from anomaly.backbones import backbone_spec
from anomaly.errors import UserError
from anomaly.evaluation.metrics import to_unit_interval
from anomaly.evaluation.pro import pro_score
from anomaly.evaluation.results import OVERLAYS_DIR
from anomaly.methods.base import SUM, gather_rows
from anomaly.methods.features import resolve_levels
from anomaly.methods.gaussian.module import GaussianAD
from anomaly.methods.gaussian.working_point import working_point_report
from anomaly.methods.spatial.overlays import write_overlays
from anomaly.stats.cells import (
    CellGaussianScorer,
    CellMoments,
    cells_memory_bytes,
    fit_cells,
)
from anomaly.stats.distances import SCORE_TYPES, level_columns
from anomaly.stats.moments import synchronise

POOLINGS = ("global", "grid", "cells")
LEVEL_WEIGHTINGS = ("none", "holdout")
GIB = 1024**3


def state_bytes(pooling: str, grid_size: int, dims: Sequence[int]) -> int:
    """Float64 bytes of the streamed second moments and the precisions of all levels."""
    cells = 1 if pooling == "global" else grid_size * grid_size
    if pooling == "cells":
        return sum(cells_memory_bytes(cells, d) for d in dims)
    return sum(cells_memory_bytes(1, cells * d) for d in dims)


class SpatialGaussianAD(GaussianAD):
    """:class:`~anomaly.methods.gaussian.GaussianAD` with spatial pooling and level weighting.

    Args (besides those of ``GaussianAD``):
        pooling: ``global`` (the paper), ``grid`` (one Gaussian of the k x k pooled map)
            or ``cells`` (one Gaussian per cell; anomaly maps).
        grid_size: k, the cells per side of ``grid`` and ``cells``.
        level_weighting: ``none`` (the paper's equal-weight sum) or ``holdout``
            (standardise each level by its held-out normal scores before summing).
        memory_budget_gb: the most float64 statistics state allowed (GiB).
        overlays: how many of the highest-scoring test images get an anomaly-map
            overlay PNG (``cells`` only).
    """

    method_name = "spatial"

    def __init__(
        self,
        backbone: str = "efficientnet-lite0",
        levels: Sequence[int] | None = None,
        weights: str | None = None,
        pretrained: bool = True,
        reduction: str = "none",
        variance_threshold: float | None = None,
        target_fpr: float = 0.01,
        decision_score: str = f"mahalanobis/{SUM}",
        threshold_method: str = "empirical",
        threshold: float | None = None,
        pooling: str = "global",
        grid_size: int = 4,
        level_weighting: str = "none",
        memory_budget_gb: float = 4.0,
        overlays: int = 8,
    ) -> None:
        self._check_options(backbone, levels, pooling, grid_size, level_weighting, memory_budget_gb)
        if pooling == "cells" and reduction != "none":
            raise UserError(
                "pooling cells supports no PCA/NPCA reduction: use reduction none, or pooling grid"
            )
        if pooling == "cells" and threshold_method == "chi2":
            raise UserError("a max over cells is not chi-squared distributed: use threshold_method empirical")
        self.pooling, self.grid_size = pooling, grid_size
        super().__init__(
            backbone, levels, weights, pretrained, reduction, variance_threshold,
            target_fpr, decision_score, threshold_method, threshold,
        )  # fmt: skip
        self.level_weighting = level_weighting
        self.overlays = overlays
        if pooling == "cells":
            cells = grid_size * grid_size
            self.moments = nn.ModuleList(CellMoments(cells, d) for d in self.level_dims)
            self.scorers = nn.ModuleList(CellGaussianScorer(cells, d) for d in self.level_dims)
        #: Per score type and level: location and scale of the held-out normal scores.
        identity = torch.tensor([0.0, 1.0], dtype=torch.float64).repeat(len(SCORE_TYPES), len(self.levels), 1)
        self.register_buffer("level_stats", identity)
        self._test_maps: list[tuple[Tensor, Tensor, Tensor | None]] = []
        self._last_maps: Tensor | None = None
        self.pixel_auroc: float | None = None
        self.pro: float | None = None

    @staticmethod
    def _check_options(
        backbone: str, levels, pooling: str, grid_size: int, weighting: str, budget_gb: float
    ) -> None:
        if pooling not in POOLINGS:
            raise UserError(f"pooling must be one of {', '.join(POOLINGS)}, got '{pooling}'")
        if weighting not in LEVEL_WEIGHTINGS:
            raise UserError(
                f"level_weighting must be one of {', '.join(LEVEL_WEIGHTINGS)}, got '{weighting}'"
            )
        if isinstance(grid_size, bool) or not isinstance(grid_size, int) or grid_size < 1:
            raise UserError(f"grid_size must be a whole number of cells per side >= 1, got {grid_size!r}")
        spec = backbone_spec(backbone)
        dims = [spec.level_dims[lv - 1] for lv in resolve_levels(levels, spec.num_levels, backbone)]
        need = state_bytes(pooling, grid_size, dims) / GIB
        if need > budget_gb:
            raise UserError(
                f"pooling {pooling} with grid_size {grid_size} needs {need:.3g} GiB of statistics for "
                f"levels of widths {dims}, over memory_budget_gb {budget_gb:g}: lower grid_size, choose "
                "fewer or narrower levels, or raise memory_budget_gb"
            )

    @property
    def level_dims(self) -> list[int]:
        """Each level's modelled width: C (global, and per cell), or k^2 C (grid)."""
        dims = super().level_dims
        return [d * self.grid_size**2 for d in dims] if self.pooling == "grid" else dims

    @property
    def exportable(self) -> bool:
        """Whether the saved detector (global pooling, equal-weight sum) scores as this module does."""
        return self.pooling == "global" and self.level_weighting == "none"

    def run_name(self) -> str:
        name = super().run_name()
        if self.pooling != "global":
            name += f"_{self.pooling}-{self.grid_size}"
        if self.level_weighting != "none":
            name += f"_weighting-{self.level_weighting}"
        return name

    # --------------------------------------------------------------- features
    def arrange(self, grid_maps: Tensor) -> Tensor:
        """A level's ``(B, C, k, k)`` pooled map as modelled: ``(B, k^2 C)`` (grid) or ``(B, k^2, C)``."""
        if self.pooling == "grid":
            return grid_maps.flatten(1)
        return grid_maps.flatten(2).transpose(1, 2)

    def features(self, images: Tensor) -> list[Tensor]:
        if self.pooling == "global":
            return super().features(images)
        return [self.arrange(m) for m in self.extractor(images, self.levels, grid=self.grid_size)]

    def batch_features(self, batch: dict) -> list[Tensor]:
        if "features" in batch and self.pooling != "global":
            raise UserError(
                "data.feature_cache holds globally pooled features: use pooling global, or no feature_cache"
            )
        return super().batch_features(batch)

    # -------------------------------------------------------------------- fit
    def on_train_end(self) -> None:
        if self.pooling != "cells":
            super().on_train_end()
            return
        synchronise(list(self.moments))
        self.finalise()
        self.calibrate()

    def finalise(self) -> None:
        if self.pooling != "cells":
            super().finalise()
            return
        for accumulator, scorer in zip(self.moments, self.scorers, strict=True):
            scorer.set_fit(fit_cells(accumulator.moments()))

    def calibrate(self) -> None:
        """Standardise the levels on the held-out normal fifth (if asked), then set thresholds."""
        if self.level_weighting == "holdout":
            self.level_stats[..., 0], self.level_stats[..., 1] = 0.0, 1.0
            holdout = self.score_holdout()
            if holdout is None:
                raise UserError(
                    "level_weighting holdout needs the fold's held-out normal images: set data.fold to 0..4"
                )
            self.set_level_weights(holdout)
        super().calibrate()

    def set_level_weights(self, holdout_columns: dict[str, Tensor]) -> None:
        """Each level's location and scale from its unweighted held-out normal scores."""
        for t, score_type in enumerate(SCORE_TYPES):
            for i, level in enumerate(self.levels):
                values = holdout_columns[f"{score_type}/{level}"].to(torch.float64)
                scale = values.std() if values.numel() > 1 else torch.ones((), dtype=torch.float64)
                self.level_stats[t, i, 0] = values.mean()
                self.level_stats[t, i, 1] = scale if scale > 0 else 1.0

    # ------------------------------------------------------------------ score
    def standardise(self, score_type: str, level_index: int, values: Tensor) -> Tensor:
        """A level's distances on the held-out normal scale (unchanged without weighting)."""
        location, scale = self.level_stats[SCORE_TYPES.index(score_type), level_index].to(values.device)
        return (values - location) / scale

    @torch.no_grad()
    def score_features(self, features: list[Tensor]) -> dict[str, Tensor]:
        """Score columns as in ``GaussianAD``; ``cells`` also keeps the batch's maps (see :meth:`maps`)."""
        cells = self.pooling == "cells"
        columns = self._score_cells(features) if cells else super().score_features(features)
        if self.level_weighting != "none":
            for score_type in SCORE_TYPES:
                columns[f"{score_type}/{SUM}"] = sum(
                    self.standardise(score_type, i, columns[f"{score_type}/{level}"])
                    for i, level in enumerate(self.levels)
                )
        return columns

    def _score_cells(self, features: list[Tensor]) -> dict[str, Tensor]:
        if not all(bool(s.fitted) for s in self.scorers):
            raise UserError("the detector is not fitted yet: run fit before test")
        per_level = []
        maps = 0.0
        map_type = self.primary_score.partition("/")[0]
        for i, (scorer, feats) in enumerate(zip(self.scorers, features, strict=True)):
            cells = scorer(feats)  # {type: (B, cells)}
            per_level.append({score_type: distances.amax(dim=1) for score_type, distances in cells.items()})
            maps = maps + self.standardise(map_type, i, cells[map_type])
        columns = level_columns(self.levels, per_level)
        self._last_maps = maps.reshape(-1, self.grid_size, self.grid_size)
        return columns

    def maps(self, images: Tensor) -> Tensor:
        """Coarse anomaly maps ``(B, k, k)``: per-cell Mahalanobis distances summed over levels."""
        if self.pooling != "cells":
            raise UserError("anomaly maps need pooling cells")
        self.score_images(images)
        return self._last_maps

    # ------------------------------------------------------------------- test
    def on_test_epoch_start(self) -> None:
        super().on_test_epoch_start()
        self._test_maps = []
        self.pixel_auroc = self.pro = None

    def test_step(self, batch: dict, batch_idx: int) -> None:
        super().test_step(batch, batch_idx)
        if self.pooling == "cells":
            masks = batch["mask"].cpu() if "mask" in batch else None
            self._test_maps.append((batch["index"].cpu(), self._last_maps.float().cpu(), masks))

    def on_test_epoch_end(self) -> None:
        maps = None
        if self.pooling == "cells" and self._test_maps:
            parts = {"index": torch.cat([i for i, _, _ in self._test_maps])}
            parts["map"] = torch.cat([m for _, m, _ in self._test_maps])
            parts["score"] = torch.cat(self._test_rows[self.primary_score])
            if self._test_maps[0][2] is not None:
                parts["mask"] = torch.cat([k for _, _, k in self._test_maps])
            parts = gather_rows(parts)
            order = torch.argsort(parts["index"])
            maps = {k: v[order] for k, v in parts.items()}
            if "mask" in maps:
                self.pixel_auroc = pixel_auroc(maps["map"], maps["mask"])
                self.pro = pixel_pro(maps["map"], maps["mask"])
                self.log("test/pixel_auroc", self.pixel_auroc, rank_zero_only=True)
                self.log("test/pro", self.pro, rank_zero_only=True)
        super().on_test_epoch_end()
        if maps is not None and self.trainer.is_global_zero and self.overlays > 0 and self.report_figures:
            run_dir = Path(self.trainer.log_dir or self.trainer.default_root_dir)
            primary = maps["score"]
            top = torch.argsort(primary, descending=True)[: self.overlays].tolist()
            samples = self.datamodule.test_samples
            write_overlays(
                run_dir / OVERLAYS_DIR,
                [samples[i] for i in top],
                maps["map"][top],
                self.datamodule.image_size,
                [float(primary[i]) for i in top],
            )

    def test_results(self, rows: dict[str, Tensor], labels: Tensor) -> dict:
        if self.pooling != "cells":
            results = super().test_results(rows, labels)
        else:  # a max over cells has no chi-squared working point: empirical ones only
            results = {
                "working_point": working_point_report(
                    [], [], rows, labels, self.holdout_scores, self.target_fpr
                )
            }
        results["pixel_auroc"], results["pro"] = self.pixel_auroc, self.pro
        return results

    def extra_results(self) -> dict:
        if self.pooling != "cells":
            results = super().extra_results()
        else:  # per-cell shrinkage intensities
            per_level = list(zip(self.levels, self.scorers, strict=True))
            results = {
                "levels": self.levels,
                "reduction": self.reduction,
                "level_dims": {str(lv): s.dim for lv, s in per_level},
                "shrinkage": {str(lv): s.shrinkage.tolist() for lv, s in per_level},
                "n_fit_vectors": self.moments[0].n,
                "epochs": self.fit_epochs,
            }
        results.update(pooling=self.pooling, grid_size=self.grid_size, level_weighting=self.level_weighting)
        if self.level_weighting != "none":
            results["level_stats"] = {
                score_type: {str(lv): self.level_stats[t, i].tolist() for i, lv in enumerate(self.levels)}
                for t, score_type in enumerate(SCORE_TYPES)
            }
        return results


def upsample_maps(maps: Tensor, size: int) -> Tensor:
    """Coarse ``(N, k, k)`` maps bilinearly upsampled to ``(N, size, size)``."""
    return F.interpolate(maps[:, None].float(), size=(size, size), mode="bilinear", align_corners=False)[:, 0]


def pixel_auroc(maps: Tensor, masks: Tensor) -> float:
    """Pixel-level AUROC of coarse maps ``(N, k, k)`` against masks ``(N, 1, S, S)`` (torchmetrics).

    NaN when every pixel has the same label.
    """
    target = (masks[:, 0] > 0).reshape(-1).to(torch.long)
    if target.min() == target.max():
        return math.nan
    preds = upsample_maps(maps, masks.shape[-1]).reshape(-1)
    return float(binary_auroc(to_unit_interval(preds), target).item())


def pixel_pro(maps: Tensor, masks: Tensor) -> float:
    """PRO up to FPR 0.3 (:func:`~anomaly.evaluation.pro.pro_score`) of maps ``(N, k, k)`` upsampled
    to masks ``(N, 1, S, S)`` as for :func:`pixel_auroc`. NaN without an anomalous region."""
    return pro_score(upsample_maps(maps, masks.shape[-1]).to(torch.float32), masks[:, 0] > 0)


__all__ = ["POOLINGS", "SpatialGaussianAD", "pixel_auroc", "pixel_pro", "state_bytes", "upsample_maps"]
