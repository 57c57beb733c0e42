"""A scikit-learn-like detector for people who already have features or images.

>>> detector = GaussianDetector(backbone="efficientnet-lite0").fit(normal_images)
>>> detector.decision_function(new_images)   # the distance: higher = more anomalous (PyOD)
>>> detector.score_samples(new_images)       # its negation: higher = more normal (scikit-learn)
>>> detector.predict(new_images)             # 1 = anomalous (distance > threshold_), 0 = normal
>>> detector.save("detector.safetensors"); GaussianDetector.load("detector.safetensors")

With ``backbone=None`` it models feature vectors directly: ``fit(X)`` with ``X``
of shape (n, D), or a list of such arrays (one per level, scores summed).

>>> GaussianDetector(pooling=Cells(grid_size=8)).fit(normal_images).anomaly_maps(new_images)

It keeps learning exactly: ``partial_fit(more_images)`` (scikit-learn's incremental
convention) and :func:`merge` of detectors fitted on disjoint images give the detector
of all the images, as ``fit`` on their union would.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from sklearn.base import BaseEstimator, OutlierMixin
from sklearn.exceptions import NotFittedError
from torch import Tensor

from anomaly.backbones import backbone_spec, build_backbone, resolve_levels
from anomaly.columns import ScoreColumn
from anomaly.data.images import read_in_threads
from anomaly.data.transforms import (
    DEFAULT_FIT,
    DEFAULT_RESIZE,
    TileGrid,
    check_image_size,
    fit_rule,
    resize_rule,
)
from anomaly.detector.inputs import feature_list, image_batch, image_items
from anomaly.detector.io import check_device, load_model, model_metadata, save_model
from anomaly.detector.learning import (
    CANNOT_LEARN,
    augmented_batches,
    fresh_indices,
    item_digest,
    merged_model,
    row_digests,
)
from anomaly.detector.model import GaussianDetectorModel, map_summary
from anomaly.errors import UserError
from anomaly.pooling import RECOMMENDED_LEVELS, Global, Pooling, build_pooling, recommended_pooling
from anomaly.stats.distances import SCORE_TYPES
from anomaly.stats.threshold import DEFAULT_TARGET_FPR, check_fpr, chi2_threshold, empirical_threshold


def primary_column(score: str) -> str:
    """``"mahalanobis"`` -> ``"mahalanobis/sum"``; a full column such as ``"mahalanobis/7"`` is kept."""
    column = ScoreColumn.parse(score)
    if column.kind not in SCORE_TYPES:
        raise UserError(f"unknown score {score!r}: choose one of {', '.join(SCORE_TYPES)}")
    return str(column)


def check_backbone(backbone: object) -> str | None:
    """A known backbone's name, or ``None`` (the detector models the feature vectors it is given)."""
    if backbone is None:
        return None
    if not isinstance(backbone, str):
        raise UserError(
            f"backbone must be a backbone's name such as 'efficientnet-lite0', or None to fit on feature "
            f"vectors, got {backbone!r}"
        )
    backbone_spec(backbone)  # unknown: lists the choices
    return backbone


def check_image_size_param(image_size: object) -> int | None:
    """``image_size``: ``None`` (the backbone's resolution) or a positive whole number of pixels."""
    if image_size is None:
        return None
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)):
        raise UserError(
            f"image_size must be a whole number of pixels (e.g. 224) or None, got {image_size!r} "
            f"({type(image_size).__name__})"
        )
    check_image_size(int(image_size))
    return int(image_size)


def check_threshold(value: object, name: str = "threshold_") -> float | None:
    """A decision threshold: ``None`` (unset) or a finite real number, as a float."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise UserError(f"{name} must be a number or None, got {value!r} ({type(value).__name__})")
    if not np.isfinite(value):
        raise UserError(f"{name} must be a finite number or None, got {value!r}")
    return float(value)


#: The statistics the API's fit may hold, as the training runs' default ``memory_budget_gb``.
DEFAULT_MEMORY_BUDGET_GB = 4.0


def check_pooling(pooling: str | Pooling | None) -> Pooling | None:
    """A pooling strategy from its name (with its default options) or as given (``None``: chosen by fit)."""
    if pooling is None or isinstance(pooling, Pooling):
        return pooling
    return build_pooling(pooling)


def single_path_as_list(X):
    """A single file path (str or Path) as a one-element list; anything else unchanged."""
    return [X] if isinstance(X, (str, Path)) else X


def pool_batch(pool, images: Tensor) -> list[Tensor]:
    """``pool(images)``, with a batch of one image run as two: the backbone's float32 kernels for a
    single image differ from those for larger batches in the last bits (oneDNN on CPU), and an
    image's features must not depend on how many images share its batch (exact updates)."""
    if images.shape[0] != 1:
        return pool(images)
    return [rows[: rows.shape[0] // 2] for rows in pool(images.expand(2, *images.shape[1:]))]


class NotFitted(UserError, NotFittedError):
    """A detector used before ``fit``: scikit-learn's :class:`~sklearn.exceptions.NotFittedError`,
    and a :class:`UserError` (one line at the command line)."""


class GaussianDetector(OutlierMixin, BaseEstimator):
    """Multivariate Gaussian anomaly detector (Rippel et al., ICPR 2020), a scikit-learn estimator.

    ``__init__`` only stores its parameters (so ``get_params``, ``set_params`` and
    ``sklearn.base.clone`` work); they are checked by ``fit`` and ``load``. Signs:
    :meth:`decision_function` is the distance (higher = more anomalous, as PyOD's),
    :meth:`score_samples` its negation (higher = more normal, as scikit-learn's),
    :meth:`predict` 1 = anomalous, 0 = normal (PyOD's labels).

    Args:
        backbone: ImageNet backbone that turns images into pooled features per
            level; ``None`` fits the Gaussian on the features you pass.
        levels: backbone levels (1-based) to fit and sum; ``None``: those of the recommended
            detector (3-9) with the default pooling, else all.
        weights: a local state-dict file for the backbone instead of its ImageNet weights.
        pooling: how each level's feature map becomes the modelled vectors: ``"global"`` (the
            paper), ``"grid"``, ``"cells"`` (anomaly maps), ... by name with default options, or a
            :mod:`anomaly.pooling` object such as ``Cells(grid_size=8)``. ``None`` (default): the
            recommended detector (``configs/recommended.yaml``: ``grid_maps`` 7x7 of levels
            3-5 with anomaly maps, level 4 also as 28x28 cells, levels 6-9 pooled globally);
            features passed with
            ``backbone=None`` are already pooled, and get ``global``, the only pooling for them.
        image_size: square input size; ``None``: the backbone's native resolution.
        resize: how images are made square (``area``, ``linear``, ``cubic``: see
            :mod:`anomaly.data.transforms`), as in the run that made the detector.
        fit_rule: how an image of another aspect ratio fills the input: ``stretch`` (default),
            ``pad`` or ``crop`` (``--data.fit``; docs/own-data.md, long and large images).
        tiles: ``"ROWSxCOLS"`` square tiles of ``image_size`` per image (``--data.tiles``): every
            tile is one fitted sample, an image scores the max over its tiles, maps are stitched.
        score: score type (``mahalanobis``, ``l2``, ``sed``) summed over levels,
            or one column such as ``mahalanobis/7``.
        fpr: working point (default: the training runs' and the CLI's 0.01). ``threshold_``
            is the distance that a fraction ``fpr`` of normal data exceeds: eq. (8)'s χ² closed
            form for Mahalanobis on one level; otherwise the empirical ``1 - fpr`` quantile of the training
            scores (in-sample, so optimistic when there are few images per
            feature dimension: then better set ``threshold_`` from held-out
            normal images). ``None`` leaves ``threshold_`` unset.
        batch_size: images per backbone pass.
        device: where the backbone and the scoring run.
        memory_budget_gb: the most float64 statistics the fit may hold (fine grids need much).
        reduction: ``none``, ``pca`` or ``npca`` (Table III): each level's Gaussian is fitted in
            the projected space; the detector then keeps its absorbed rows to stay updatable.
        variance_threshold: the reduction's cumulative explained-variance threshold (default 0.99).

    Attributes (after ``fit`` or ``load``):
        threshold_: decision threshold on :meth:`decision_function` (``None`` if unset).
        decision_score_: the checked score column (e.g. ``mahalanobis/sum``). device_: the
        checked :class:`torch.device`. resize_: the resize rule's name. pooling_: the checked
        pooling strategy. fpr_: the false-positive rate ``threshold_`` was set for.
        levels_: the fitted levels. model_: the :class:`~anomaly.detector.model.GaussianDetectorModel`
        that scores (the same module a training run, ``predict`` and the exports use).
    """

    def __init__(
        self,
        backbone: str | None = "efficientnet-lite0",
        levels: Sequence[int] | None = None,
        weights: str | None = None,
        pooling: str | Pooling | None = None,
        image_size: int | None = None,
        resize: str = DEFAULT_RESIZE,
        fit_rule: str = DEFAULT_FIT,
        tiles: str = "1x1",
        score: str = "mahalanobis",
        fpr: float | None = DEFAULT_TARGET_FPR,
        batch_size: int = 32,
        device: str | torch.device = "cpu",
        memory_budget_gb: float = DEFAULT_MEMORY_BUDGET_GB,
        reduction: str = "none",
        variance_threshold: float | None = None,
    ) -> None:
        self.backbone = backbone
        self.levels = levels
        self.weights = weights
        self.pooling = pooling
        self.image_size = image_size
        self.resize = resize
        self.fit_rule = fit_rule
        self.tiles = tiles
        self.score = score
        self.fpr = fpr
        self.batch_size = batch_size
        self.device = device
        self.memory_budget_gb = memory_budget_gb
        self.reduction = reduction
        self.variance_threshold = variance_threshold

    def _validate_params(self) -> None:
        """Check the parameters; set ``decision_score_``, ``resize_``, ``pooling_``, ``fpr_`` and
        ``device_`` (by fit and load)."""
        if self.fpr is not None:
            check_fpr(self.fpr)
        self.fpr_ = self.fpr
        self.pooling_ = check_pooling(self.pooling)
        batch_size = self.batch_size
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise UserError(f"batch_size must be a positive integer, got {batch_size!r}")
        check_backbone(self.backbone)
        check_image_size_param(self.image_size)
        self.decision_score_ = primary_column(self.score)
        self.resize_ = resize_rule(self.resize).name
        self.fit_rule_ = fit_rule(self.fit_rule).name
        self.tiles_ = TileGrid.parse(self.tiles)
        self.device_ = check_device(self.device)

    def _fitted_model(self) -> GaussianDetectorModel:
        model = getattr(self, "model_", None)
        if model is None:
            raise NotFitted("this detector is not fitted yet: call fit(X) first")
        return model

    # -------------------------------------------------------------------- fit
    def fit(self, X, y=None) -> GaussianDetector:
        """Fit one Gaussian per level on normal data ``X`` (images, or features when ``backbone=None``).

        Images: a sequence of file paths or (H, W[, 3]) uint8 arrays, an (n, H, W[, 3])
        uint8 array, or an (n, 3, S, S) tensor. ``y`` is ignored (all of ``X`` is normal).
        """
        self._validate_params()
        self.thresholds_ = None
        pooling, extractor = self.pooling_, None
        if self.backbone is not None:
            extractor = build_backbone(self.backbone, weights=self.weights).to(self.device_)
            levels = RECOMMENDED_LEVELS if pooling is None and self.levels is None else self.levels
            self.levels_ = resolve_levels(levels, extractor.num_levels, self.backbone)
            pooling = self.pooling_ = recommended_pooling(self.levels_) if pooling is None else pooling
            self.image_size_ = check_image_size_param(self.image_size) or extractor.image_size
            channels = [extractor.level_dims[level - 1] for level in self.levels_]
            X = image_items(X)  # a generator is read once
        else:
            pooling = self.pooling_ = Global() if pooling is None else pooling
            if self.tiles_.count > 1:
                raise UserError(
                    f"tiles {self.tiles_} cut images, but features passed with backbone=None are "
                    "already pooled vectors: use tiles='1x1', or pass images with a backbone"
                )
            if not isinstance(pooling, Global):
                raise UserError(
                    f"pooling {pooling.name} needs feature maps, but features passed with backbone=None "
                    "are already pooled vectors: use pooling='global', or pass images with a backbone"
                )
            self.image_size_ = None
            X = self._as_feature_list(single_path_as_list(X))
            self.levels_ = list(range(1, len(X) + 1))
            channels = [f.shape[1] for f in X]
        samples = len(X) * self.tiles_.count if self.backbone is not None else int(X[0].shape[0])
        pooling.check_budget(channels, self.memory_budget_gb, self.levels_, samples=samples)
        self._check_score_column()
        model = GaussianDetectorModel.for_fitting(
            extractor,
            self.levels_,
            channels,
            pooling,
            decision_score=self.decision_score_,
            image_size=self.image_size_,
            resize=self.resize_,
            fit=self.fit_rule_,
            tiles=self.tiles_,
        )
        model.set_reduction(self.reduction, self.variance_threshold)
        # The training rows are kept only for an empirical threshold (their scores' quantile).
        keep = self.fpr is not None and self._chi2_level(pooling) is None
        kept = self._absorb(model, X, self._digests(X), keep)
        if model.samples < 2:
            raise UserError("fit needs at least 2 normal samples")
        model.refit()
        self.model_ = model.to(self.device_)
        self.threshold_ = self._working_point(kept)
        self.source_ = {"fitted_with": "GaussianDetector.fit", "n_fit": model.samples}
        return self

    def partial_fit(self, X, y=None) -> GaussianDetector:
        """Absorb more normal data ``X`` and refit: the result equals ``fit`` on all the data so far.

        As scikit-learn's ``IncrementalPCA.partial_fit``: the first call on an unfitted detector
        fits it. Later calls merge ``X``'s streamed moments into the detector's and refit the
        Gaussians (and any PCA/NPCA projection). Images (or feature rows) absorbed before are
        skipped with a warning, never counted twice. ``threshold_`` follows eq. (8) where it
        applies; otherwise it is kept (the in-sample quantile needs the old rows): set it from
        held-out normal images with :meth:`calibrate`.
        """
        model = getattr(self, "model_", None)
        if model is None:
            return self.fit(X, y)
        if not model.learns:
            raise UserError(f"this detector cannot be updated: {CANNOT_LEARN}")
        if model.extractor is None:
            X = self._as_feature_list(single_path_as_list(X))
            model.check_features(X)
        else:
            X = image_items(X)  # a generator is read once
        digests = self._digests(X)
        fresh, repeated = fresh_indices(digests, model.absorbed)
        if repeated:
            warnings.warn(
                f"{len(repeated)} of {len(digests)} sample(s) were absorbed before (or are repeated): "
                "skipped, never counted twice",
                stacklevel=2,
            )
        if not fresh:
            return self
        check_model_budget(model, self.memory_budget_gb, model.samples + len(fresh) * model.tiles.count)
        follows_eq8 = self._threshold_is_eq8()  # before the refit changes a reduced dimension
        model.moments.cpu()  # the float64 statistics are accumulated on the CPU
        self._absorb(model, self._subset(X, fresh), [digests[i] for i in fresh], keep=False)
        model.refit()
        self.model_ = model.to(self.device_)
        if follows_eq8:
            self.threshold_ = self._eq8_threshold()
        self.source_ = {**self.source_, "n_fit": model.samples}
        return self

    def _digests(self, X) -> list[str]:
        """The identity of every image (or feature row) of ``X`` (see anomaly.detector.learning)."""
        if self.backbone is None:
            return row_digests(X)
        items = image_items(X)
        return read_in_threads(item_digest, [items[i] for i in range(len(items))])

    def _subset(self, X, indices: list[int]):
        if self.backbone is None:
            return [f[indices] for f in X]
        items = image_items(X)
        return items[indices] if isinstance(items, Tensor) else [items[i] for i in indices]

    def _absorb(self, model: GaussianDetectorModel, X, digests: list[str], keep: bool) -> list[list[Tensor]]:
        """Stream ``X``'s rows into ``model`` (on the CPU); with ``keep``, return them per level."""
        if model.extractor is None:
            batches = self._row_batches(X)  # checked by the caller
        elif model.augmentation is not None:
            images = augmented_batches(model, image_items(X), digests, self.batch_size)
            batches = (pool_batch(model.features, batch.to(self.device_)) for batch in images)
        else:
            batches = self._feature_batches(X, model.features, model.geometry)
        kept: list[list[Tensor]] = [[] for _ in model.levels]
        for features in batches:
            features = [f.cpu() for f in features]
            model.update(features)
            if keep:
                for store, feats in zip(kept, features, strict=True):
                    store.append(feats)
        model.absorbed = [*model.absorbed, *digests]
        return kept

    def _eq8_threshold(self) -> float | None:
        """Eq. (8)'s χ² threshold at ``fpr_`` for the fitted dimension, where the score has one."""
        index = self._chi2_level(self.model_.pooling)
        if index is None or self.fpr_ is None:
            return None
        return chi2_threshold(self.model_.scorers[index].dim, self.fpr_)

    def _threshold_is_eq8(self) -> bool:
        """Whether ``threshold_`` is eq. (8)'s (:meth:`_eq8_threshold`): then it follows a refit's
        dimension. Any other is kept: one set on held-out images (a training run's, ``calibrate``'s)
        or by hand."""
        eq8 = self._eq8_threshold()
        return (
            eq8 is not None
            and self.threshold_ is not None
            and math.isclose(self.threshold_, eq8, rel_tol=1e-12)
        )

    def _chi2_level(self, pooling: Pooling) -> int | None:
        """Index of the level whose Mahalanobis distance has eq. (8)'s χ² threshold, if the score is one."""
        column = ScoreColumn.parse(self.decision_score_)
        if not pooling.chi2_calibratable or self.tiles_.count > 1:  # a max is not chi-squared
            return None
        if column.kind == "mahalanobis" and (not column.is_sum or len(self.levels_) == 1):
            return 0 if column.is_sum else self.levels_.index(column.level)
        return None

    def _working_point(self, train_features: list[list[Tensor]]) -> float | None:
        """The threshold at ``fpr``: χ² closed form, or the quantile of the training features' scores."""
        if self.fpr is None:
            return None
        index = self._chi2_level(self.model_.pooling)
        if index is not None:
            return chi2_threshold(self.model_.scorers[index].dim, self.fpr)
        train_scores = self.model_.score_features([torch.cat(batches) for batches in train_features])
        return empirical_threshold(train_scores[self.decision_score_].cpu(), self.fpr)

    def _check_score_column(self) -> None:
        level = ScoreColumn.parse(self.decision_score_).level
        if level is not None and level not in self.levels_:
            raise UserError(
                f"score {self.decision_score_!r} names a level that is not fitted (levels {self.levels_})"
            )

    # ------------------------------------------------------------------ input
    @staticmethod
    def _as_feature_list(X) -> list[Tensor]:
        return feature_list(X)  # checked: see anomaly.detector.inputs

    def _row_batches(self, features: list[Tensor]) -> Iterator[list[Tensor]]:
        for start in range(0, features[0].shape[0], self.batch_size):
            yield [f[start : start + self.batch_size] for f in features]

    def _feature_batches(self, X, pool, geometry=None) -> Iterator[list[Tensor]]:
        """Per-level feature batches of ``X``: sliced features, or ``pool(images)`` of image batches
        (prepared by ``geometry``, a fitted model's resize/fit/tiles; default: the ``resize`` rule)."""
        if pool is None:
            yield from self._row_batches(self._as_feature_list(single_path_as_list(X)))  # a path: refused
            return
        X = image_items(X)
        for start in range(0, len(X), self.batch_size):
            batch = X[start : start + self.batch_size]
            images = image_batch(batch, self.image_size_, geometry or self.resize_)
            yield pool_batch(pool, images.to(self.device_))

    # ------------------------------------------------------------------ score
    def score_columns(self, X) -> dict[str, np.ndarray]:
        """Every score column (``"<type>/<level>"``, ``"<type>/sum"``) for ``X``; higher = more anomalous.

        A single path (str or Path) counts as one image; an empty ``X`` is a :class:`UserError`.
        """
        columns, _ = self._score(X, maps=False)
        return columns

    def anomaly_maps(self, X) -> np.ndarray:
        """Anomaly maps ``(n, h, w)`` of ``X`` (detectors with a map-capable pooling: ``cells``,
        ``grid_maps``): per-cell distances of the decision score's kind, summed over the levels."""
        model = self._fitted_model()
        if not model.makes_maps:
            raise UserError(
                f"pooling {model.pooling.name} gives no anomaly maps: fit with a map-capable pooling, "
                "pooling='cells' or 'grid_maps'"
            )
        return self._score(X, maps=True)[1]

    def _score(self, X, maps: bool) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
        """Score columns (and maps) of ``X``, batch by batch, through the model's one forward."""
        model = self._fitted_model()
        pool = None if model.extractor is None else model.features
        parts: dict[str, list[np.ndarray]] = {}
        map_parts: list[np.ndarray] = []
        for features in self._feature_batches(X, pool, model.geometry):
            if pool is None:
                model.check_features(features)
            columns, batch_maps = model.score(features) if maps else (model.score_features(features), None)
            for name, values in columns.items():
                parts.setdefault(name, []).append(values.cpu().numpy())
            if batch_maps is not None:
                map_parts.append(batch_maps.cpu().numpy())
        if not parts:
            raise UserError(
                "no samples to score: the input is empty (pass at least one image or feature row)"
            )
        columns = {name: np.concatenate(values) for name, values in parts.items()}
        return columns, np.concatenate(map_parts) if map_parts else None

    def decision_function(self, X) -> np.ndarray:
        """The anomaly score of each sample of ``X``, its distance (the ``score`` column):
        HIGHER = MORE ANOMALOUS, as PyOD's ``decision_function``; compared with ``threshold_``."""
        return self.score_columns(X)[self.decision_score_]

    def score_samples(self, X) -> np.ndarray:
        """The negated distance of each sample of ``X``: HIGHER = MORE NORMAL, as scikit-learn's
        outlier detectors (``IsolationForest``, ``LocalOutlierFactor``) return it."""
        return -self.decision_function(X)

    def calibrate(self, X, fpr: float | None = None) -> GaussianDetector:
        """Set ``threshold_`` from held-out NORMAL samples ``X`` (not those fitted on).

        The threshold becomes the smallest score that at most a fraction ``fpr``
        (default: the detector's own) of them exceed, as the training runs do with
        their fold's held-out fifth. Unlike the in-sample threshold of :meth:`fit`,
        it is not optimistic when there are few images per feature dimension. A detector
        with anomaly maps also sets its map threshold (``model_.map_threshold``, the top of
        ``anomaly predict``'s overlay colours) the same way, on each map's largest value, and its
        map floor (``model_.map_floor``, where the colours start: the median map's median cell).
        """
        fpr = self.fpr if fpr is None else fpr
        if fpr is None:
            raise UserError("calibrate needs a target false-positive rate: pass fpr=...")
        check_fpr(fpr)
        model = self._fitted_model()
        columns, maps = self._score(X, maps=model.makes_maps)
        scores = torch.from_numpy(np.asarray(columns[self.decision_score_], dtype=np.float64))
        if maps is not None:
            model.calibrate_maps(map_summary(torch.from_numpy(maps)), fpr)
        self.fpr_, self.threshold_ = fpr, empirical_threshold(scores, fpr)
        self.source_ = {**self.source_, "calibrated_on": int(scores.numel())}
        return self

    def decide(self, scores: np.ndarray) -> np.ndarray:
        """0 (normal) or 1 (anomalous: distance > ``threshold_``) for :meth:`decision_function` values."""
        threshold = check_threshold(getattr(self, "threshold_", None))
        if threshold is None:
            raise UserError("this detector has no threshold: set threshold_ (or fit with fpr=...) first")
        return (np.asarray(scores) > threshold).astype(np.int64)

    def predict(self, X) -> np.ndarray:
        """1 for anomalous samples (distance above ``threshold_``), 0 for normal ones (PyOD's labels)."""
        return self.decide(self.decision_function(X))

    # -------------------------------------------------------------- save/load
    def metadata(self, embed_weights: bool = False) -> dict:
        """All but the tensors: backbone, weights, preprocessing, levels, pooling, score, threshold."""
        self._fitted_model().set_threshold(check_threshold(self.threshold_))
        return {
            **model_metadata(self.model_, self.weights, embed_weights),
            "thresholds": self.thresholds_,
            "fpr": self.fpr_,
            "source": self.source_,
        }

    def save(self, path: str | Path, embed_weights: bool = False, moments: bool = True) -> Path:
        """Write the detector file (see :mod:`anomaly.detector.file`); the backbone's weights are
        referenced, not stored, unless ``embed_weights`` (or the backbone was randomly initialised).
        ``moments=False`` leaves out the streamed moments: a smaller file that cannot be updated."""
        self._fitted_model().set_threshold(check_threshold(self.threshold_))
        extra = {"thresholds": self.thresholds_, "fpr": self.fpr_, "source": self.source_}
        return save_model(self.model_, path, extra, self.weights, embed_weights, moments)

    @classmethod
    def load(
        cls, path: str | Path, weights: str | None = None, device: str | torch.device = "cpu"
    ) -> GaussianDetector:
        """A detector from its file; needs no training images. ``weights`` overrides the backbone file."""
        device = check_device(device)
        model, meta = load_model(path, weights, device)
        return cls.from_model(
            model,
            weights=weights or (meta["weights"] or {}).get("path"),
            fpr=meta.get("fpr"),
            thresholds=meta.get("thresholds"),
            source=meta.get("source") or {},
            device=device,
        )

    @classmethod
    def from_model(
        cls,
        model: GaussianDetectorModel,
        weights: str | None = None,
        fpr: float | None = None,
        thresholds: dict | None = None,
        source: dict | None = None,
        device: str | torch.device | None = None,
    ) -> GaussianDetector:
        """The API around a fitted model (of a run, or loaded from a file)."""
        extractor = model.extractor
        detector = cls(
            backbone=None if extractor is None else extractor.spec.name,
            levels=list(model.levels),
            weights=weights,
            pooling=model.pooling,
            image_size=model.image_size,
            resize=model.resize,
            fit_rule=model.fit,
            tiles=str(model.tiles),
            score=str(model.decision_score),
            fpr=fpr,
            device=device if device is not None else model.device,
            reduction=model.reduction,
            variance_threshold=model.variance_threshold,
        )
        detector._validate_params()
        detector.levels_ = list(model.levels)
        detector.image_size_ = model.image_size
        detector.model_ = model
        detector.threshold_ = model.threshold
        detector.thresholds_ = thresholds
        detector.source_ = source or {}
        return detector

    @classmethod
    def from_method(cls, model, image_size: int, resize: str = DEFAULT_RESIZE) -> GaussianDetector:
        """The detector of a fitted :class:`~anomaly.methods.gaussian.GaussianAD` run (its very module).

        ``threshold_`` is the module's decision threshold on its ``decision_score``;
        a dict ``model.thresholds`` is kept too. ``fpr_`` is the run's target rate where the run set
        the threshold for it (on its held-out images, or eq. (8)), not where it was given.
        """
        hparams = dict(model.hparams)
        detector_model = model.detector
        detector_model.image_size = image_size
        detector_model.resize = resize_rule(resize).name
        thresholds = getattr(model, "thresholds", None)
        aimed = hparams.get("threshold") is None and detector_model.threshold is not None
        return cls.from_model(
            detector_model,
            weights=hparams.get("weights"),
            fpr=model.target_fpr if aimed else None,
            thresholds=dict(thresholds) if isinstance(thresholds, dict) else None,
            source={"method": model.method_name, "settings": hparams},
        )


def check_model_budget(model: GaussianDetectorModel, budget_gb: float, samples: int) -> None:
    """Refuse to grow ``model`` to ``samples`` rows beyond ``budget_gb``: a level that kept its rows
    switches to D x D moments once it has seen more rows than dimensions."""
    channels = (
        model.in_dims
        if model.extractor is None
        else [model.extractor.level_dims[level - 1] for level in model.levels]
    )
    model.pooling.check_budget(channels, budget_gb, model.levels, samples=samples)


def merge(detectors: Sequence[GaussianDetector], names: Sequence[str] | None = None) -> GaussianDetector:
    """The detector of the union of the images ``detectors`` were fitted on (disjoint sets, same recipe).

    Equal to ``fit`` on the union (moments exactly, scores to rounding). The result keeps the first
    detector's threshold (eq. (8)'s when that applies): recalibrate it with
    :meth:`GaussianDetector.calibrate`.
    :class:`UserError` names the first field in which two detectors differ (and ``names`` the detectors),
    or says that the union's statistics would pass the first detector's ``memory_budget_gb``.
    """
    detectors = list(detectors)
    models = [d._fitted_model() for d in detectors]
    first = detectors[0]
    check_model_budget(models[0], first.memory_budget_gb, sum(m.samples for m in models))
    model = merged_model(models, names)
    merged = GaussianDetector.from_model(
        model,
        weights=first.weights,
        fpr=first.fpr_,
        thresholds=first.thresholds_,
        source={"merged_from": [d.source_ for d in detectors], "n_fit": model.samples},
        device=first.device_,
    )
    merged.threshold_ = first.threshold_  # the first detector's as it stands, set by hand or loaded
    if first._threshold_is_eq8():
        merged.threshold_ = merged._eq8_threshold()
    return merged
