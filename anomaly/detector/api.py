"""A scikit-learn-like detector for people who already have features or images.

>>> detector = GaussianDetector(backbone="efficientnet-lite0").fit(normal_images)
>>> detector.decision_function(new_images)   # the distance: higher = more anomalous (PyOD)
>>> detector.score_samples(new_images)       # its negation: higher = more normal (scikit-learn)
>>> detector.predict(new_images)             # 1 = anomalous (distance > threshold_), 0 = normal
>>> detector.save("detector.safetensors"); GaussianDetector.load("detector.safetensors")

With ``backbone=None`` it models feature vectors directly: ``fit(X)`` with ``X``
of shape (n, D), or a list of such arrays (one per level, scores summed).

>>> GaussianDetector(pooling=Cells(grid_size=8)).fit(normal_images).anomaly_maps(new_images)
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from sklearn.base import BaseEstimator, OutlierMixin
from torch import Tensor

from anomaly.backbones import build_backbone
from anomaly.columns import ScoreColumn
from anomaly.data.transforms import DEFAULT_FIT, DEFAULT_RESIZE, TileGrid, fit_rule, resize_rule
from anomaly.detector.inputs import feature_list, image_batch, image_items
from anomaly.detector.io import load_model, model_metadata, save_model
from anomaly.detector.model import GaussianDetectorModel
from anomaly.errors import UserError
from anomaly.methods.features import resolve_levels
from anomaly.pooling import RECOMMENDED_LEVELS, Global, Pooling, build_pooling, recommended_pooling
from anomaly.stats.distances import SCORE_TYPES
from anomaly.stats.threshold import DEFAULT_TARGET_FPR, check_fpr, chi2_threshold, empirical_threshold


def primary_column(score: str) -> str:
    """``"mahalanobis"`` -> ``"mahalanobis/sum"``; a full column such as ``"mahalanobis/7"`` is kept."""
    column = ScoreColumn.parse(score)
    if column.kind not in SCORE_TYPES:
        raise UserError(f"unknown score {score!r}: choose one of {', '.join(SCORE_TYPES)}")
    return str(column)


def check_device(device: str | torch.device, hint: str = "device='cpu'") -> torch.device:
    """``device`` as a :class:`torch.device`; :class:`UserError` if malformed or absent on this machine.

    ``hint`` is how the caller spells the CPU fallback (e.g. ``--device cpu``).
    """
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise UserError(f"unknown device {str(device)!r}: use e.g. cpu, cuda or cuda:0") from exc
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UserError(
                f"device {str(device)!r} is not available: PyTorch finds no CUDA GPU here; use {hint}"
            )
        if resolved.index is not None and resolved.index >= count:
            raise UserError(f"device {str(device)!r} is not available: this machine has {count} CUDA GPU(s)")
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"device {str(device)!r} is not available on this machine; use {hint}")
    return resolved


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
            recommended detector (``anomaly/configs/recommended.yaml``: ``grid_maps`` 7x7 of levels
            3-5 with anomaly maps, levels 6-9 pooled globally); features passed with
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
        self.decision_score_ = primary_column(self.score)
        self.resize_ = resize_rule(self.resize).name
        self.fit_rule_ = fit_rule(self.fit_rule).name
        self.tiles_ = TileGrid.parse(self.tiles)
        self.device_ = check_device(self.device)

    def _fitted_model(self) -> GaussianDetectorModel:
        model = getattr(self, "model_", None)
        if model is None:
            raise UserError("this detector is not fitted yet: call fit(X) first")
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
            self.image_size_ = self.image_size or extractor.image_size
            channels = [extractor.level_dims[level - 1] for level in self.levels_]
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
            batches = self._feature_batches(X, None)
            first = next(batches, None)
            if first is None:
                raise UserError("fit needs at least 2 normal samples")
            self.levels_ = list(range(1, len(first) + 1))
            channels = [f.shape[1] for f in first]
            batches = itertools.chain([first], batches)
        pooling.check_budget(channels, self.memory_budget_gb, self.levels_)
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
        if extractor is not None:
            batches = self._feature_batches(X, model.features, model.geometry)
        # The training rows are kept only for an empirical threshold (their scores' quantile).
        keep = self.fpr is not None and self._chi2_level(pooling) is None
        kept: list[list[Tensor]] = [[] for _ in self.levels_]
        for features in batches:
            features = [f.cpu() for f in features]  # the float64 statistics are accumulated on the CPU
            model.update(features)
            if keep:
                for store, feats in zip(kept, features, strict=True):
                    store.append(feats)
        fitted_on = model.moments[0].n
        if fitted_on < 2:
            raise UserError("fit needs at least 2 normal samples")
        model.finalise()
        model.moments = torch.nn.ModuleList()  # the accumulators are not part of the fitted detector
        self.model_ = model.to(self.device_)
        self.threshold_ = self._working_point(kept)
        self.source_ = {"fitted_with": "GaussianDetector.fit", "n_fit": fitted_on}
        return self

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

    def _feature_batches(self, X, pool, geometry=None) -> Iterator[list[Tensor]]:
        """Per-level feature batches of ``X``: sliced features, or ``pool(images)`` of image batches
        (prepared by ``geometry``, a fitted model's resize/fit/tiles; default: the ``resize`` rule)."""
        if pool is None:
            features = self._as_feature_list(single_path_as_list(X))  # a path: "fitted on features"
            for start in range(0, features[0].shape[0], self.batch_size):
                yield [f[start : start + self.batch_size] for f in features]
            return
        X = image_items(X)
        for start in range(0, len(X), self.batch_size):
            batch = X[start : start + self.batch_size]
            images = image_batch(batch, self.image_size_, geometry or self.resize_)
            yield pool(images.to(self.device_))

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
        it is not optimistic when there are few images per feature dimension.
        """
        fpr = self.fpr if fpr is None else fpr
        if fpr is None:
            raise UserError("calibrate needs a target false-positive rate: pass fpr=...")
        check_fpr(fpr)
        scores = torch.from_numpy(np.asarray(self.decision_function(X), dtype=np.float64))
        self.fpr_, self.threshold_ = fpr, empirical_threshold(scores, fpr)
        self.source_ = {**self.source_, "calibrated_on": int(scores.numel())}
        return self

    def decide(self, scores: np.ndarray) -> np.ndarray:
        """0 (normal) or 1 (anomalous: distance > ``threshold_``) for :meth:`decision_function` values."""
        if getattr(self, "threshold_", None) is None:
            raise UserError("this detector has no threshold: set threshold_ (or fit with fpr=...) first")
        return (np.asarray(scores) > self.threshold_).astype(np.int64)

    def predict(self, X) -> np.ndarray:
        """1 for anomalous samples (distance above ``threshold_``), 0 for normal ones (PyOD's labels)."""
        return self.decide(self.decision_function(X))

    # -------------------------------------------------------------- save/load
    def metadata(self, embed_weights: bool = False) -> dict:
        """All but the tensors: backbone, weights, preprocessing, levels, pooling, score, threshold."""
        self._fitted_model().set_threshold(self.threshold_)
        return {
            **model_metadata(self.model_, self.weights, embed_weights),
            "thresholds": self.thresholds_,
            "fpr": self.fpr_,
            "source": self.source_,
        }

    def save(self, path: str | Path, embed_weights: bool = False) -> Path:
        """Write the detector file (see :mod:`anomaly.detector.file`); the backbone's weights are
        referenced, not stored, unless ``embed_weights`` (or the backbone was randomly initialised)."""
        self._fitted_model().set_threshold(self.threshold_)
        extra = {"thresholds": self.thresholds_, "fpr": self.fpr_, "source": self.source_}
        return save_model(self.model_, path, extra, self.weights, embed_weights)

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
            device=device if device is not None else model.level_stats.device,
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
        a dict ``model.thresholds`` is kept too.
        """
        hparams = dict(model.hparams)
        detector_model = model.detector
        detector_model.image_size = image_size
        detector_model.resize = resize_rule(resize).name
        thresholds = getattr(model, "thresholds", None)
        return cls.from_model(
            detector_model,
            weights=hparams.get("weights"),
            thresholds=dict(thresholds) if isinstance(thresholds, dict) else None,
            source={"method": model.method_name, "settings": hparams},
        )
