"""The fitted detector as one ``nn.Module``: the one place that scores an image.

``GaussianDetectorModel`` holds the frozen backbone and its levels, a pooling
strategy (:mod:`anomaly.pooling`), each level's Gaussian(s) (with an optional
PCA/NPCA projection), the level weighting and the decision threshold.
``forward(images)`` returns the score columns of the batch and, for a
map-capable pooling, an anomaly map per image. Training (``GaussianAD`` and
``SpatialGaussianAD``), ``predict``, the Python API (``GaussianDetector``) and
the ONNX/TorchScript exports all call this forward.

Scores: each level's rows go through its scorer (Mahalanobis eq. 2, L2 and SED
eq. 9); the pooling turns the distances into the level's image score (and map);
``<kind>/sum`` adds the levels with equal weights (the paper's sum mode) or, with
``holdout`` weighting, after standardising each level on held-out normal scores.

Tiles (``tiles`` ``ROWSxCOLS``, for long or large images): the input is a
``rows*S x cols*S`` canvas (:class:`~anomaly.data.transforms.Geometry`);
:meth:`features` cuts it into its square tiles, so that every tile is one sample
of the fit's streamed statistics, and :meth:`score` gives each image the largest
score of its tiles, per score column, and stitches the tile maps back into one map.

Fitting: :meth:`update` streams a batch into float64 accumulators (when the
model was built by :meth:`for_fitting`), :meth:`finalise` fits the Gaussians
(Ledoit-Wolf, eq. 6), :meth:`set_level_weights` and :meth:`set_threshold` finish it.

Learning more: the accumulators stay with the fitted model (and in its file), so
:meth:`update` with new images' rows, or :meth:`merge` with a model fitted on other
images, followed by :meth:`refit`, gives the model of all the images. ``absorbed`` holds
the SHA-256 of every image absorbed. After a PCA/NPCA reduction the model also keeps the
absorbed rows: the reduced space's fourth moment (Ledoit-Wolf's shrinkage) cannot be
had from the streamed moments once the projection changes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import nullcontext
from typing import NamedTuple

import torch
from torch import Tensor, nn

from anomaly.backbones import FeatureExtractor
from anomaly.columns import ScoreColumn, column_name
from anomaly.data.transforms import DEFAULT_FIT, DEFAULT_RESIZE, Geometry, TileGrid, fit_rule, geometry
from anomaly.errors import UserError
from anomaly.pooling import Global, Pooling
from anomaly.stats.distances import SCORE_TYPES, level_columns
from anomaly.stats.moments import Moments, RunningMoments
from anomaly.stats.pca import check_reduction, reduction_projection
from anomaly.stats.threshold import empirical_threshold

LEVEL_WEIGHTINGS = ("none", "holdout")
#: Training precisions (Lightning's names) that prediction reproduces; mixed ones run the backbone
#: under autocast to the dtype here, as training did.
PRECISIONS = ("32-true", "32", "bf16-mixed", "16-mixed")
MIXED_PRECISIONS = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def check_weighting(weighting: object) -> str:
    if weighting not in LEVEL_WEIGHTINGS:
        raise UserError(f"level_weighting must be one of {', '.join(LEVEL_WEIGHTINGS)}, got {weighting!r}")
    return weighting


class MapSummary(NamedTuple):
    """Each anomaly map's largest value and its median cell's value: what the held-out normal
    images' maps give :meth:`GaussianDetectorModel.calibrate_maps`."""

    peaks: Tensor
    medians: Tensor


def map_summary(maps: Tensor) -> MapSummary:
    """The :class:`MapSummary` of ``(B, ...)`` maps (the lower median of an even number of cells)."""
    flat = maps.flatten(1)
    return MapSummary(flat.amax(dim=1), flat.median(dim=1).values)


class GaussianDetectorModel(nn.Module):
    """Backbone -> pooling -> per-level Gaussians -> score columns (+ maps), with a decision threshold.

    Args:
        extractor: the frozen backbone, or ``None`` for a detector fitted on user features.
        levels: the backbone levels (1-based, increasing) that are modelled.
        scorers: one scorer per level, made by ``pooling`` (fitted or not).
        pooling: the pooling strategy (default: the paper's global pooling).
        decision_score: the column decisions are made on (and whose kind the map shows).
        level_weighting: ``none`` (equal-weight sum) or ``holdout`` (standardised levels).
        threshold: the decision threshold on ``decision_score`` (``None``: none yet).
        image_size: the square input (tile) size the detector was fitted at.
        resize: how images were made square (``area``, ``linear``, ``cubic``: anomaly.data.transforms).
        fit: how an image of another aspect ratio fills the input (``stretch``, ``pad``, ``crop``).
        tiles: the input's tile grid, ``ROWSxCOLS`` (default ``1x1``: one tile).
        precision: the training precision (Lightning's name); a mixed one is reproduced.
    """

    def __init__(
        self,
        extractor: FeatureExtractor | None,
        levels: Sequence[int],
        scorers: Sequence[nn.Module],
        pooling: Pooling | None = None,
        decision_score: str | ScoreColumn = "mahalanobis/sum",
        level_weighting: str = "none",
        threshold: float | None = None,
        image_size: int | None = None,
        resize: str = DEFAULT_RESIZE,
        precision: str | None = None,
        fit: str = DEFAULT_FIT,
        tiles: str | TileGrid = "1x1",
    ) -> None:
        super().__init__()
        if len(levels) != len(scorers) or not levels:
            raise ValueError(f"{len(levels)} levels but {len(scorers)} scorers")
        if list(levels) != sorted(set(levels)):
            raise UserError(f"levels must be increasing and distinct, got {list(levels)}")
        self.extractor = extractor
        self.levels = [int(level) for level in levels]
        self.scorers = nn.ModuleList(scorers)
        self.moments = nn.ModuleList()  # the fit's accumulators (see for_fitting)
        self.reduction, self.variance_threshold = "none", None
        self.rows: list[list[Tensor]] = []  # per level, the absorbed rows (with a reduction only)
        self.absorbed: list[str] = []  # the SHA-256 of every absorbed image
        self.epochs = 1  # passes over every image (each with its own augmentation draws)
        self.augmentation: dict | None = None  # how the passes were augmented (a training run's data)
        #: The map value that the maps of at most ``fpr`` of the held-out normal images exceed anywhere
        #: (:meth:`calibrate_maps`): where a map's colours reach their top. None: not calibrated.
        self.map_threshold: float | None = None
        #: A held-out normal map's median cell value (the median over those images): where a map's
        #: colours start, so that the usual normal surface shows cold. None: not calibrated.
        self.map_floor: float | None = None
        self.pooling = pooling or Global()
        if self.pooling.makes_maps and not any(self.pooling.level_makes_maps(lv) for lv in self.levels):
            raise UserError(
                f"every level of {self.levels} is a coarse level of pooling {self.pooling.name}: "
                "leave at least one level for the anomaly map"
            )
        column = (
            decision_score if isinstance(decision_score, ScoreColumn) else ScoreColumn.parse(decision_score)
        )
        self.decision_score = column.validate(SCORE_TYPES, self.levels, "decision_score")
        self.level_weighting = check_weighting(level_weighting)
        self.image_size = image_size
        self.resize = resize
        self.precision = precision
        self.fit = fit_rule(fit).name
        self.tiles = TileGrid.parse(tiles)
        identity = torch.tensor([0.0, 1.0], dtype=torch.float64).repeat(len(SCORE_TYPES), len(self.levels), 1)
        #: Per score kind and level: location and scale of the held-out normal scores (holdout weighting).
        self.register_buffer("level_stats", identity)
        self.register_buffer("decision_threshold", torch.tensor(math.nan, dtype=torch.float64))
        self.set_threshold(threshold)

    @classmethod
    def for_fitting(
        cls,
        extractor: FeatureExtractor | None,
        levels: Sequence[int],
        in_channels: Sequence[int],
        pooling: Pooling | None = None,
        **kwargs,
    ) -> GaussianDetectorModel:
        """An unfitted model with empty accumulators, for levels of ``in_channels`` channels."""
        pooling = pooling or Global()
        per_level = [pooling.for_level(level) for level in levels]
        dims = [p.modelled_dim(c) for p, c in zip(per_level, in_channels, strict=True)]
        scorers = [p.scorer(d) for p, d in zip(per_level, dims, strict=True)]
        model = cls(extractor, levels, scorers, pooling, **kwargs)
        model.moments = nn.ModuleList(p.accumulator(d) for p, d in zip(per_level, dims, strict=True))
        return model

    def set_reduction(self, reduction: str, variance_threshold: float | None = None) -> None:
        """Fit the levels in a PCA/NPCA-reduced space (Table III); keeps the absorbed rows from now on."""
        reduction, variance_threshold = check_reduction(reduction, variance_threshold)
        if reduction != "none" and not self.pooling.supports_reduction:
            raise UserError(f"pooling {self.pooling.name} supports no PCA/NPCA reduction: use reduction none")
        self.reduction, self.variance_threshold = reduction, variance_threshold
        self.rows = [[] for _ in self.levels] if reduction != "none" else []

    # -------------------------------------------------------------- facts
    @property
    def fitted(self) -> bool:
        return all(bool(s.fitted) for s in self.scorers)

    @property
    def learns(self) -> bool:
        """Whether the model holds the streamed moments (and rows) it needs to absorb more images."""
        return len(self.moments) == len(self.scorers) and self.moments[0].n > 0

    @property
    def samples(self) -> int:
        """How many rows were absorbed (images x tiles x epochs)."""
        return self.moments[0].n if len(self.moments) else 0

    @property
    def in_dims(self) -> list[int]:
        """The width of the rows each level's scorer takes (after pooling, before any projection)."""
        return [s.in_dim for s in self.scorers]

    @property
    def dims(self) -> list[int]:
        """Each level's modelled dimensionality (after a PCA/NPCA reduction)."""
        return [s.dim for s in self.scorers]

    @property
    def makes_maps(self) -> bool:
        return self.pooling.makes_maps

    @property
    def device(self) -> torch.device:
        """Where the model's buffers (and so its inputs) live."""
        return self.level_stats.device

    @property
    def threshold(self) -> float | None:
        value = float(self.decision_threshold)
        return None if math.isnan(value) else value

    @property
    def geometry(self) -> Geometry:
        """How an image file becomes this detector's input (resize rule, fit rule, tiles)."""
        return geometry(self.resize, self.fit, self.tiles)

    def set_geometry(self, value: Geometry) -> None:
        """Take the data's resize rule, fit rule and tiles (before fitting)."""
        self.resize, self.fit, self.tiles = value.resize.name, value.fit.name, value.tiles

    def set_threshold(self, value: float | None) -> None:
        """Set the decision threshold (``None`` clears it); a non-finite one is refused."""
        if value is not None and not math.isfinite(value):
            raise UserError(f"the decision threshold must be a finite number, got {value!r}")
        self.decision_threshold.fill_(math.nan if value is None else float(value))

    def calibrate_maps(self, summary: MapSummary | None, fpr: float) -> None:
        """Set :attr:`map_threshold` and :attr:`map_floor` from the held-out normal images' map
        ``summary`` (:func:`map_summary`). The threshold is the smallest peak that at most ``fpr`` of
        them exceed, as the decision threshold is set on their scores; the floor is their median
        cell value's median. ``None`` or no maps: neither."""
        if summary is None or summary.peaks.numel() == 0:
            self.map_threshold = self.map_floor = None
            return
        self.map_threshold = empirical_threshold(summary.peaks, fpr)
        self.map_floor = float(summary.medians.double().median())

    # ----------------------------------------------------------- features
    @torch.no_grad()
    def features(self, images: Tensor) -> list[Tensor]:
        """The rows each level models, for (B, 3, S, S) uint8 or [0, 1] float images; with tiles,
        for (B, 3, rows*S, cols*S) images, the rows of their B*rows*cols tiles (image-major)."""
        if self.extractor is None:
            raise UserError("this detector was fitted on features, not images: pass features instead")
        dtype = MIXED_PRECISIONS.get(self.precision)
        device = self.device.type
        with torch.autocast(device, dtype=dtype) if dtype is not None else nullcontext():
            if self.tiles.count == 1:
                return self.pooling.pool(self.extractor, images, self.levels)
            return self.tile_features(images)

    def tile_size(self, images: Tensor) -> int:
        """The side S of the square tiles of (B, C, rows*S, cols*S) images; :class:`UserError` otherwise."""
        rows, cols = self.tiles.rows, self.tiles.cols
        height, width = images.shape[-2:]
        if height % rows or width % cols or height // rows != width // cols:
            raise UserError(
                f"a detector with tiles {self.tiles} takes images of {rows}S x {cols}S pixels, "
                f"got {height}x{width}"
            )
        return height // rows

    def split_tiles(self, images: Tensor) -> Tensor:
        """(B, C, rows*S, cols*S) -> (B*rows*cols, C, S, S): each image's tiles, row by row."""
        rows, cols = self.tiles.rows, self.tiles.cols
        if rows * cols == 1:
            return images
        size, channels = self.tile_size(images), images.shape[1]
        tiles = images.reshape(-1, channels, rows, size, cols, size).permute(0, 2, 4, 1, 3, 5)
        return tiles.reshape(-1, channels, size, size)

    def tile_features(self, images: Tensor) -> list[Tensor]:
        """The rows of the tiles of (B, C, rows*S, cols*S) images, in :meth:`split_tiles`' order.

        One tile position at a time goes through the backbone: B tiles per pass, so that a tiled
        batch needs the memory of an untiled batch of B images, not ``rows*cols`` times as much.
        """
        size = self.tile_size(images)
        per_position = [
            self.pooling.pool(
                self.extractor,
                images[:, :, r * size : (r + 1) * size, c * size : (c + 1) * size],
                self.levels,
            )
            for r in range(self.tiles.rows)
            for c in range(self.tiles.cols)
        ]
        # (B, positions, ...) -> (B * positions, ...): image-major, positions row by row
        return [torch.stack(level, dim=1).flatten(0, 1) for level in zip(*per_position, strict=True)]

    def merge_tiles(
        self, columns: dict[str, Tensor], maps: Tensor | None
    ) -> tuple[dict[str, Tensor], Tensor | None]:
        """Per image: the largest tile score of every column, and the tile maps stitched together."""
        rows, cols = self.tiles.rows, self.tiles.cols
        count = rows * cols
        if count == 1:
            return columns, maps
        n = next(iter(columns.values())).shape[0]
        if n % count:
            raise UserError(f"{n} rows are not whole images of {count} tiles ({self.tiles})")
        merged = {name: values.reshape(-1, count).amax(dim=1) for name, values in columns.items()}
        if maps is not None:
            height, width = maps.shape[-2:]
            grid = maps.reshape(-1, rows, cols, height, width).permute(0, 1, 3, 2, 4)
            maps = grid.reshape(-1, rows * height, cols * width)
        return merged, maps

    # ---------------------------------------------------------------- fit
    @torch.no_grad()
    def update(self, features: Sequence[Tensor]) -> None:
        """Stream one batch of every level's rows into the accumulators (and keep them, when reduced)."""
        for accumulator, feats in zip(self.moments, features, strict=True):
            accumulator.update(feats)
        for rows, feats in zip(self.rows, features, strict=False):
            rows.append(feats.detach().cpu())

    @torch.no_grad()
    def merge(self, other: GaussianDetectorModel) -> None:
        """Absorb what ``other`` absorbed (the same recipe, other images): its moments, rows and digests."""
        if not (self.learns and other.learns):
            raise UserError("only detectors that keep their streamed moments can be merged")
        for accumulator, theirs in zip(self.moments, other.moments, strict=True):
            accumulator.merge_(theirs.value())
        for rows, theirs in zip(self.rows, other.rows, strict=True):
            rows.extend(theirs)
        self.absorbed = [*self.absorbed, *other.absorbed]

    def refit(self) -> None:
        """Fit the Gaussians (and any PCA/NPCA projection) from everything absorbed so far."""
        if self.reduction == "none":
            self.finalise()
            return
        projections = self.reduction_projections(self.reduction, self.variance_threshold)
        reduced = []
        for rows, projection in zip(self.rows, projections, strict=True):
            accumulator = RunningMoments(projection.shape[1])
            for batch in rows:
                accumulator.update(batch.to(torch.float64) @ projection)
            reduced.append(accumulator.moments())
        self.finalise(reduced, projections)

    def reduction_projections(self, reduction: str, variance_threshold: float) -> list[Tensor]:
        """PCA/NPCA projections (Table III) of every level from the streamed moments."""
        if not self.pooling.supports_reduction:
            raise UserError(f"pooling {self.pooling.name} supports no PCA/NPCA reduction: use reduction none")
        projections = []
        for accumulator in self.moments:
            m = accumulator.moments()
            emp_cov = m.scatter() / m.count
            projections.append(reduction_projection(emp_cov, m.n, reduction, variance_threshold))
        return projections

    def finalise(
        self, moments: Sequence[Moments] | None = None, projections: Sequence[Tensor] | None = None
    ) -> None:
        """Fit every level's Gaussian(s) from streamed moments (default: the model's own accumulators).

        After a reduction, ``moments`` are those of the projected rows and ``projections`` the projections.
        """
        moments = [a.value() for a in self.moments] if moments is None else list(moments)
        projections = [None] * len(self.scorers) if projections is None else list(projections)
        for level, scorer, m, projection in zip(self.levels, self.scorers, moments, projections, strict=True):
            self.pooling.for_level(level).fit(scorer, m, projection)

    def set_level_weights(self, holdout_columns: dict[str, Tensor]) -> None:
        """Each level's location and scale from its unweighted held-out normal scores."""
        for t, kind in enumerate(SCORE_TYPES):
            for i, level in enumerate(self.levels):
                values = holdout_columns[column_name(kind, level)].to(torch.float64)
                scale = values.std() if values.numel() > 1 else torch.ones((), dtype=torch.float64)
                self.level_stats[t, i, 0] = values.mean()
                self.level_stats[t, i, 1] = scale if scale > 0 else 1.0

    def reset_level_weights(self) -> None:
        self.level_stats[..., 0], self.level_stats[..., 1] = 0.0, 1.0

    # -------------------------------------------------------------- score
    def standardise(self, kind: str, level_index: int, values: Tensor) -> Tensor:
        """A level's distances on the held-out normal scale (unchanged without weighting)."""
        location, scale = self.level_stats[SCORE_TYPES.index(kind), level_index]
        return (values - location) / scale

    @torch.no_grad()
    def score(self, features: Sequence[Tensor]) -> tuple[dict[str, Tensor], Tensor | None]:
        """(score columns ``{"<kind>/<level|sum>": (B,)}``, anomaly maps ``(B, h, w)`` or ``None``).

        The maps are the per-cell distances of the decision score's kind, summed over
        the levels (standardised with ``holdout`` weighting). With tiles, ``features`` hold
        the rows of whole images' tiles and every column is reduced by the max over an
        image's tiles (:meth:`merge_tiles`).
        """
        if not self.fitted:
            raise UserError("the detector is not fitted yet: run fit before scoring")
        if len(features) != len(self.scorers):
            raise UserError(f"expected features for {len(self.scorers)} levels, got {len(features)}")
        device = self.device
        map_kind = self.decision_score.kind
        per_level, maps = [], None
        for i, (level, scorer, feats) in enumerate(zip(self.levels, self.scorers, features, strict=True)):
            distances = scorer(feats.to(device))
            pooling = self.pooling.for_level(level)
            per_level.append({kind: pooling.image_distances(d) for kind, d in distances.items()})
            if self.pooling.level_makes_maps(level):
                level_map = pooling.to_map(self.standardise(map_kind, i, distances[map_kind]))
                maps = level_map if maps is None else maps + level_map
        columns = level_columns(self.levels, per_level)
        if self.level_weighting != "none":
            for kind in SCORE_TYPES:
                columns[column_name(kind, None)] = sum(
                    self.standardise(kind, i, columns[column_name(kind, level)])
                    for i, level in enumerate(self.levels)
                )
        return self.merge_tiles(columns, maps)

    def forward(self, images: Tensor) -> tuple[dict[str, Tensor], Tensor | None]:
        """(score columns, anomaly maps or ``None``) for (B, 3, S, S) uint8 or [0, 1] float images
        (``(B, 3, rows*S, cols*S)`` with tiles)."""
        return self.score(self.features(images))

    def check_features(self, features: Sequence[Tensor]) -> None:
        """:class:`UserError` unless ``features`` are one (n, D_l) batch per level of the right widths."""
        if len(features) != len(self.scorers):
            raise UserError(f"expected features for {len(self.scorers)} levels, got {len(features)}")
        for level, feats, dim in zip(self.levels, features, self.in_dims, strict=True):
            if feats.ndim != 2 or feats.shape[1] != dim:
                raise UserError(
                    f"level {level} expects features of shape (n, {dim}), got {tuple(feats.shape)}"
                )

    def score_features(self, features: Sequence[Tensor]) -> dict[str, Tensor]:
        """Score columns for per-level rows (see :meth:`score`)."""
        return self.score(features)[0]

    def score_images(self, images: Tensor) -> dict[str, Tensor]:
        """Score columns for a batch of images (see :meth:`forward`)."""
        return self(images)[0]

    def maps(self, images: Tensor) -> Tensor:
        """Anomaly maps ``(B, h, w)`` (map-capable poolings only)."""
        if not self.makes_maps:
            raise UserError(
                f"pooling {self.pooling.name} gives no anomaly maps: use pooling cells or grid_maps"
            )
        return self(images)[1]


#: The name the rest of the project has used for the fitted detector module.
DetectorModel = GaussianDetectorModel

__all__ = [
    "LEVEL_WEIGHTINGS",
    "MIXED_PRECISIONS",
    "PRECISIONS",
    "DetectorModel",
    "GaussianDetectorModel",
    "MapSummary",
    "check_weighting",
    "map_summary",
]
