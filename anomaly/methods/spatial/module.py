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
  ``k x k`` anomaly map, which ``test_step`` returns beside the scores (the run's
  evaluation upsamples it for pixel AUROC, PRO and overlays).
* ``level_weighting: holdout``: every level's distance is standardised by its
  mean and standard deviation on the fold's held-out normal fifth before the
  levels are summed. Only normal training images are used, never test labels.

All statistics are still streamed; the float64 state of the chosen pooling is
checked against ``memory_budget_gb`` before anything is allocated.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

from torch import Tensor

from anomaly.backbones import backbone_spec, resolve_levels
from anomaly.data.needs import DataNeeds
from anomaly.detector.model import LEVEL_WEIGHTINGS, MapSummary, check_weighting, map_summary
from anomaly.errors import UserError
from anomaly.methods.gaussian.module import DEFAULT_DECISION_SCORE, DEFAULT_TARGET_FPR, GaussianAD
from anomaly.methods.gaussian.working_point import working_point_report
from anomaly.pooling import POOLINGS, Pooling, build_pooling
from anomaly.pooling.grid_maps import check_coarse_levels, fine_levels_among
from anomaly.stats.distances import SCORE_TYPES

#: The keys of the held-out predictions' map summary (each map's largest and median cell value, see
#: :func:`~anomaly.detector.model.map_summary`), beside the score columns.
MAP_PEAKS, MAP_MEDIANS = "map_peaks", "map_medians"


def state_bytes(
    pooling: str, grid_size: int, dims: Sequence[int], levels: Sequence[int] | None = None, **options
) -> int:
    """Float64 bytes of the streamed second moments and the precisions of all levels."""
    return build_pooling(pooling, grid_size=grid_size, **options).levels_state_bytes(dims, levels)


class SpatialGaussianAD(GaussianAD):
    """:class:`~anomaly.methods.gaussian.GaussianAD` with spatial pooling and level weighting.

    Args (besides those of ``GaussianAD``):
        pooling: ``global`` (the paper), ``grid`` (one Gaussian of the k x k pooled map)
            or ``cells`` (one Gaussian per cell; anomaly maps); see :mod:`anomaly.pooling`.
        grid_size: k, the cells per side of ``grid``, ``cells`` and ``grid_maps``.
        coarse_levels: ``grid_maps`` only: those of the levels pooled to ``coarse_grid_size`` cells
            per side (1: globally) whose distances add to the image score, not to the map (others
            are ignored, so that ``levels`` can be changed alone).
        coarse_grid_size: the coarse levels' cells per side.
        fine_levels: ``grid_maps`` only: those of the levels (map or coarse levels) also modelled by
            one Gaussian per cell of a ``fine_grid_size`` grid, whose distances (times ``fine_weight``)
            add to the map.
        fine_grid_size: the fine cells per side: one for all fine levels, or a list of one per fine
            level (the map's resolution is the finest).
        fine_weight: the fine cells' weight in the map.
        level_weighting: ``none`` (the paper's equal-weight sum) or ``holdout``
            (standardise each level by its held-out normal scores before summing).
        memory_budget_gb: the most float64 statistics state allowed (GiB).
        overlays: how many of the highest-scoring test images get an anomaly-map
            overlay PNG (``cells`` only).
    """

    method_name = "spatial"
    reports_pixel_scores = True

    def __init__(
        self,
        backbone: str = "efficientnet-lite0",
        levels: Sequence[int] | None = None,
        weights: str | None = None,
        pretrained: bool = True,
        reduction: str = "none",
        variance_threshold: float | None = None,
        target_fpr: float = DEFAULT_TARGET_FPR,
        decision_score: str = DEFAULT_DECISION_SCORE,
        threshold_method: str = "empirical",
        threshold: float | None = None,
        pooling: str = "global",
        grid_size: int = 4,
        coarse_levels: Sequence[int] = (),
        coarse_grid_size: int = 1,
        fine_levels: Sequence[int] = (),
        fine_grid_size: int | Sequence[int] = 28,
        fine_weight: float = 1.0,
        level_weighting: str = "none",
        memory_budget_gb: float = 4.0,
        overlays: int = 8,
    ) -> None:
        # every option is checked, and the statistics' size bounded, before anything is allocated
        spec = backbone_spec(backbone)
        resolved = resolve_levels(levels, spec.num_levels, backbone)
        coarse_levels = tuple(lv for lv in check_coarse_levels(coarse_levels) if lv in resolved)  # of these
        fine_levels, fine_grid_size = fine_levels_among(resolved, fine_levels, fine_grid_size)
        coarse = {"coarse_levels": coarse_levels, "coarse_grid_size": coarse_grid_size}
        fine = {"fine_levels": fine_levels, "fine_grid_size": fine_grid_size, "fine_weight": fine_weight}
        strategy = build_pooling(pooling, grid_size=grid_size, **coarse, **fine)
        coarse_levels = getattr(strategy, "coarse_levels", ())  # other poolings ignore them
        fine_levels = getattr(strategy, "fine_levels", ())
        fine_grid_size = getattr(strategy, "fine_grid_size", fine_grid_size)  # one size where all share it
        if strategy.makes_maps and not any(strategy.level_makes_maps(lv) for lv in resolved):
            raise UserError(
                f"every level of {resolved} is one of the coarse_levels, none with fine cells: leave at "
                "least one level for the anomaly map (--model.coarse_levels, --model.fine_levels)"
            )
        check_weighting(level_weighting)
        if not strategy.supports_reduction and reduction != "none":
            raise UserError(
                f"pooling {pooling} supports no PCA/NPCA reduction: use reduction none, or pooling grid"
            )
        # now what any fit needs (its n-independent part: two samples); with the samples, at the fit
        widths = [spec.level_dims[lv - 1] for lv in resolved]
        strategy.check_budget(widths, memory_budget_gb, resolved, samples=2)
        self._budget = (widths, memory_budget_gb, resolved)
        self._strategy, self._weighting = strategy, level_weighting
        super().__init__(
            backbone, levels, weights, pretrained, reduction, variance_threshold,
            target_fpr, decision_score, threshold_method, threshold,
        )  # fmt: skip
        self.grid_size = grid_size
        self.coarse_levels, self.coarse_grid_size = coarse_levels, coarse_grid_size
        self.fine_levels, self.fine_grid_size, self.fine_weight = fine_levels, fine_grid_size, fine_weight
        self.level_weighting = level_weighting
        self.overlays = overlays

    def make_pooling(self) -> Pooling:
        return self._strategy

    def make_level_weighting(self) -> str:
        return self._weighting

    @property
    def level_stats(self) -> Tensor:
        """Per score type and level: location and scale of the held-out normal scores."""
        return self.detector.level_stats

    def run_name(self) -> str:
        name = super().run_name()
        if self.pooling.name != "global":
            name += f"_{self.pooling.name}-{self.grid_size}"
        if self.coarse_levels:
            name += f"_coarse-{'-'.join(map(str, self.coarse_levels))}-{self.coarse_grid_size}"
        if self.fine_levels:
            sizes = (self.fine_grid_size,) if isinstance(self.fine_grid_size, int) else self.fine_grid_size
            name += f"_fine-{'-'.join(map(str, [*self.fine_levels, *sizes]))}-{self.fine_weight:g}"
        if self.level_weighting != "none":
            name += f"_weighting-{self.level_weighting}"
        return name

    def data_needs(self) -> DataNeeds:
        """Besides the base's needs, the test masks for a map-capable pooling (pixel AUROC, PRO)."""
        return replace(super().data_needs(), masks=self.pooling.makes_maps)

    # -------------------------------------------------------------------- fit
    def check_fit_options(self, epochs: int | None) -> None:
        """Besides the base's checks, the statistics of this fit's samples (images x epochs x tiles)
        within ``memory_budget_gb``: a level that sees fewer samples than its dimensions keeps them
        instead of its D x D moments."""
        super().check_fit_options(epochs)
        images = getattr(self.datamodule, "fit_samples", None)
        if images is not None:
            geometry = getattr(self.datamodule, "geometry", None)
            tiles = geometry.tiles.count if geometry is not None else 1
            samples = len(images) * (epochs if epochs is not None and epochs > 0 else 1) * tiles
            widths, budget_gb, levels = self._budget
            self.pooling.check_budget(widths, budget_gb, levels, samples=samples)

    def calibrate(self, score_holdout: Callable[[], dict[str, Tensor] | None]) -> None:
        """Standardise the levels on the held-out normal fifth (if asked), then set thresholds: the
        decision threshold on their scores, the map threshold and floor on their maps' summary."""

        def holdout_columns() -> dict[str, Tensor] | None:
            """The held-out score columns; their maps' summary (:meth:`predict_step`) set the map
            threshold and floor, so that the last scoring, with the final level weights, sets them."""
            columns = score_holdout()
            summary = None
            if columns is not None and MAP_PEAKS in columns:
                summary = MapSummary(columns.pop(MAP_PEAKS), columns.pop(MAP_MEDIANS))
            self.detector.calibrate_maps(summary, self.target_fpr)
            return columns

        if self.level_weighting == "holdout":
            self.detector.reset_level_weights()
            holdout = holdout_columns()
            if holdout is None:
                raise UserError(
                    "level_weighting holdout needs the fold's held-out normal images: set data.fold to 0..4"
                )
            self.detector.set_level_weights(holdout)
        super().calibrate(holdout_columns)

    def predict_step(self, batch: dict, batch_idx: int) -> dict[str, Tensor]:
        """The batch's score columns and, for a map-capable pooling, each map's largest and median
        cell value (:data:`MAP_PEAKS`, :data:`MAP_MEDIANS`, for the map threshold and floor; not
        score columns)."""
        columns, maps = self.detector.score(self.batch_features(batch))
        if maps is None:
            return columns
        peaks, medians = map_summary(maps)
        return {**columns, MAP_PEAKS: peaks, MAP_MEDIANS: medians}

    def set_level_weights(self, holdout_columns: dict[str, Tensor]) -> None:
        self.detector.set_level_weights(holdout_columns)

    # ------------------------------------------------------------------ score
    def maps(self, images: Tensor) -> Tensor:
        """Coarse anomaly maps ``(B, k, k)``: per-cell Mahalanobis distances summed over levels."""
        return self.detector.maps(images)

    # ------------------------------------------------------------------- test
    def test_step(self, batch: dict, batch_idx: int) -> dict:
        """The batch's score columns and, for a map-capable pooling, its coarse maps."""
        columns, maps = self.detector.score(self.batch_features(batch))
        return {"scores": columns} if maps is None else {"scores": columns, "maps": maps}

    def test_results(self, rows: dict[str, Tensor], labels: Tensor) -> dict:
        if self.pooling.chi2_calibratable:
            return super().test_results(rows, labels)
        # a max over cells has no chi-squared working point: empirical ones only
        report = working_point_report([], [], rows, labels, self.holdout_scores, self.target_fpr)
        return {"working_point": report}

    def extra_results(self) -> dict:
        if not self.pooling.makes_maps:
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
        results.update(
            pooling=self.pooling.name, grid_size=self.grid_size, level_weighting=self.level_weighting
        )
        if self.coarse_levels:
            results.update(coarse_levels=self.coarse_levels, coarse_grid_size=self.coarse_grid_size)
        if self.fine_levels:
            results.update(
                fine_levels=self.fine_levels, fine_grid_size=self.fine_grid_size, fine_weight=self.fine_weight
            )
        if self.level_weighting != "none":
            results["level_stats"] = {
                score_type: {str(lv): self.level_stats[t, i].tolist() for i, lv in enumerate(self.levels)}
                for t, score_type in enumerate(SCORE_TYPES)
            }
        return results


__all__ = [
    "LEVEL_WEIGHTINGS",
    "POOLINGS",
    "SpatialGaussianAD",
    "state_bytes",
]
