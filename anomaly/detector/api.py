"""A scikit-learn-like detector for people who already have features or images.

>>> detector = GaussianDetector(backbone="efficientnet-lite0").fit(normal_images)
>>> detector.score_samples(new_images)   # higher = more anomalous
>>> detector.predict(new_images)         # 1 = anomalous (score > threshold_), 0 = normal
>>> detector.save("detector.safetensors"); GaussianDetector.load("detector.safetensors")

With ``backbone=None`` it models feature vectors directly: ``fit(X)`` with ``X``
of shape (n, D), or a list of such arrays (one per level, scores summed).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from anomaly.backbones import FeatureExtractor, build_backbone
from anomaly.detector.file import level_tensors, read_detector, write_detector
from anomaly.detector.inputs import feature_list, image_batch, image_items
from anomaly.detector.model import DetectorModel, scorer_from_tensors
from anomaly.detector.weights import embedded_tensors, rebuild_backbone, weights_reference
from anomaly.errors import UserError
from anomaly.methods.base import SUM, split_column
from anomaly.methods.features import resolve_levels
from anomaly.stats.distances import SCORE_TYPES
from anomaly.stats.gaussian import fit_gaussian
from anomaly.stats.moments import RunningMoments
from anomaly.stats.scorer import GaussianScorer
from anomaly.stats.threshold import check_fpr, chi2_threshold, empirical_threshold


def primary_column(score: str) -> str:
    """``"mahalanobis"`` -> ``"mahalanobis/sum"``; a full column such as ``"mahalanobis/7"`` is kept."""
    score_type, level = split_column(score)
    if score_type not in SCORE_TYPES:
        raise UserError(f"unknown score {score!r}: choose one of {', '.join(SCORE_TYPES)}")
    if level != SUM and not (level.isdigit() and int(level) >= 1):
        raise UserError(f"score {score!r} names no level: use {score_type}/sum or {score_type}/<level>")
    return f"{score_type}/{level}"


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


def single_path_as_list(X):
    """A single file path (str or Path) as a one-element list; anything else unchanged."""
    return [X] if isinstance(X, (str, Path)) else X


def is_identity(matrix: Tensor) -> bool:
    """An unreduced level's projection, which the file leaves out (it would double its size)."""
    return matrix.shape[0] == matrix.shape[1] and torch.equal(
        matrix, torch.eye(matrix.shape[0], dtype=matrix.dtype)
    )


class GaussianDetector:
    """Multivariate Gaussian anomaly detector (Rippel et al., ICPR 2020) with a scikit-learn-like API.

    Args:
        backbone: ImageNet backbone that turns images into pooled features per
            level; ``None`` fits the Gaussian on the features you pass.
        levels: backbone levels (1-based) to fit and sum; ``None``: all.
        weights: a local state-dict file for the backbone instead of its ImageNet weights.
        image_size: square input size; ``None``: the backbone's native resolution.
        score: score type (``mahalanobis``, ``l2``, ``sed``) summed over levels,
            or one column such as ``mahalanobis/7``.
        fpr: working point. ``threshold_`` is the score that a fraction ``fpr`` of
            normal data exceeds: eq. (8)'s χ² closed form for Mahalanobis on one
            level; otherwise the empirical ``1 - fpr`` quantile of the training
            scores (in-sample, so optimistic when there are few images per
            feature dimension: then better set ``threshold_`` from held-out
            normal images). ``None`` leaves ``threshold_`` unset.
        batch_size: images per backbone pass.
        device: where the backbone and the scoring run.

    Attributes (after ``fit`` or ``load``):
        threshold_: decision threshold on :meth:`score_samples` (``None`` if unset).
        levels_: the fitted levels. model_: the :class:`DetectorModel`.
    """

    def __init__(
        self,
        backbone: str | None = "efficientnet-lite0",
        levels: Sequence[int] | None = None,
        weights: str | None = None,
        image_size: int | None = None,
        score: str = "mahalanobis",
        fpr: float | None = 0.05,
        batch_size: int = 32,
        device: str | torch.device = "cpu",
    ) -> None:
        if fpr is not None:
            check_fpr(fpr)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise UserError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.backbone = backbone
        self.levels = levels
        self.weights = weights
        self.image_size = image_size
        self.score = primary_column(score)
        self.fpr = fpr
        self.batch_size = batch_size
        self.device = check_device(device)
        self.model_: DetectorModel | None = None
        self.threshold_: float | None = None
        self.thresholds_: dict | None = None
        self.levels_: list[int] | None = None
        self.image_size_: int | None = None
        self.source_: dict = {}

    # -------------------------------------------------------------------- fit
    def fit(self, X, y=None) -> GaussianDetector:
        """Fit one Gaussian per level on normal data ``X`` (images, or features when ``backbone=None``).

        Images: a sequence of file paths or (H, W[, 3]) uint8 arrays, an (n, H, W[, 3])
        uint8 array, or an (n, 3, S, S) tensor. ``y`` is ignored (all of ``X`` is normal).
        """
        extractor = None
        if self.backbone is not None:
            extractor = build_backbone(self.backbone, weights=self.weights).to(self.device)
            levels = resolve_levels(self.levels, extractor.num_levels, self.backbone)
            self.image_size_ = self.image_size or extractor.image_size
            self.levels_ = levels
        else:
            self.levels_ = list(range(1, len(self._as_feature_list(X)) + 1))
        self._check_score_column()
        accumulators: list[RunningMoments] | None = None
        # The training features are kept only for an empirical threshold (their scores' quantile).
        keep = self.fpr is not None and self._chi2_level() is None
        kept: list[list[Tensor]] = [[] for _ in self.levels_]
        for features in self._feature_batches(X, extractor):
            if accumulators is None:
                accumulators = [RunningMoments(f.shape[1]) for f in features]
            for accumulator, store, feats in zip(accumulators, kept, features, strict=True):
                accumulator.update(feats.cpu())
                if keep:
                    store.append(feats.cpu())
        if accumulators is None or accumulators[0].n < 2:
            raise UserError("fit needs at least 2 normal samples")
        scorers = []
        for accumulator in accumulators:
            scorer = GaussianScorer(accumulator.moments().mean.shape[0])
            scorer.set_fit(fit_gaussian(accumulator.moments()))
            scorers.append(scorer)
        self.model_ = DetectorModel(extractor, self.levels_, scorers).to(self.device)
        self.threshold_ = self._working_point(kept)
        self.source_ = {"fitted_with": "GaussianDetector.fit", "n_fit": accumulators[0].n}
        return self

    def _chi2_level(self) -> int | None:
        """Index of the level whose Mahalanobis distance has eq. (8)'s χ² threshold, if the score is one."""
        score_type, level = split_column(self.score)
        if score_type == "mahalanobis" and (level != SUM or len(self.levels_) == 1):
            return 0 if level == SUM else self.levels_.index(int(level))
        return None

    def _working_point(self, train_features: list[list[Tensor]]) -> float | None:
        """The threshold at ``fpr``: χ² closed form, or the quantile of the training features' scores."""
        if self.fpr is None:
            return None
        index = self._chi2_level()
        if index is not None:
            return chi2_threshold(self.model_.scorers[index].dim, self.fpr)
        train_scores = self.model_.score_features([torch.cat(batches) for batches in train_features])
        return empirical_threshold(train_scores[self.score].cpu(), self.fpr)

    def _check_score_column(self) -> None:
        _, level = split_column(self.score)
        if level != SUM and int(level) not in self.levels_:
            raise UserError(f"score {self.score!r} names a level that is not fitted (levels {self.levels_})")

    # ------------------------------------------------------------------ input
    @staticmethod
    def _as_feature_list(X) -> list[Tensor]:
        return feature_list(X)  # checked: see anomaly.detector.inputs

    def _feature_batches(self, X, extractor: FeatureExtractor | None) -> Iterator[list[Tensor]]:
        """Per-level feature batches of ``X``: sliced features, or backbone features of image batches."""
        if extractor is None:
            features = self._as_feature_list(X)
            for start in range(0, features[0].shape[0], self.batch_size):
                yield [f[start : start + self.batch_size] for f in features]
            return
        X = image_items(X)
        for start in range(0, len(X), self.batch_size):
            images = image_batch(X[start : start + self.batch_size], self.image_size_)
            yield extractor(images.to(self.device), self.levels_)

    # ------------------------------------------------------------------ score
    def score_columns(self, X) -> dict[str, np.ndarray]:
        """Every score column (``"<type>/<level>"``, ``"<type>/sum"``) for ``X``; higher = more anomalous.

        A single path (str or Path) counts as one image; an empty ``X`` is a :class:`UserError`.
        """
        if self.model_ is None:
            raise UserError("this detector is not fitted yet: call fit(X) first")
        parts: dict[str, list[np.ndarray]] = {}
        for features in self._feature_batches(X, self.model_.extractor):
            for name, values in self.model_.score_features(features).items():
                parts.setdefault(name, []).append(values.cpu().numpy())
        if not parts:
            raise UserError(
                "no samples to score: the input is empty (pass at least one image or feature row)"
            )
        return {name: np.concatenate(values) for name, values in parts.items()}

    def score_samples(self, X) -> np.ndarray:
        """Anomaly score of each sample of ``X`` (the ``score`` column): HIGHER = MORE ANOMALOUS.

        Note the sign: scikit-learn's outlier detectors return the opposite
        (lower = more abnormal); here the score is the distance to the normal data.
        """
        return self.score_columns(X)[self.score]

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
        scores = torch.from_numpy(np.asarray(self.score_samples(X), dtype=np.float64))
        self.fpr, self.threshold_ = fpr, empirical_threshold(scores, fpr)
        self.source_ = {**self.source_, "calibrated_on": int(scores.numel())}
        return self

    def decide(self, scores: np.ndarray) -> np.ndarray:
        """0 (normal) or 1 (anomalous: score > ``threshold_``) for given scores."""
        if self.threshold_ is None:
            raise UserError("this detector has no threshold: set threshold_ (or fit with fpr=...) first")
        return (np.asarray(scores) > self.threshold_).astype(np.int64)

    def predict(self, X) -> np.ndarray:
        """1 for anomalous samples (score above ``threshold_``), 0 for normal ones."""
        return self.decide(self.score_samples(X))

    # -------------------------------------------------------------- save/load
    def metadata(self, embed_weights: bool = False) -> dict:
        """All but the tensors: backbone, weights reference, preprocessing, levels, score, threshold."""
        if self.model_ is None:
            raise UserError("this detector is not fitted yet: call fit(X) first")
        extractor = self.model_.extractor
        spec = extractor.spec if extractor is not None else None
        return {
            "backbone": self.backbone if extractor is not None else None,
            "weights": None
            if extractor is None
            else weights_reference(extractor, self.weights, embed_weights),
            "preprocessing": None
            if spec is None
            else {
                "image_size": self.image_size_,
                "input": "RGB (grey replicated), made square by anomaly.data.transforms.resize_square",
                "resize": "cv2 INTER_AREA when shrinking, INTER_LINEAR when enlarging",
                "dtype": "uint8 0..255 (or float 0..1)",
                "normalise_mean": list(spec.mean),
                "normalise_std": list(spec.std),
            },
            "levels": self.levels_,
            "in_dims": self.model_.in_dims,
            "dims": [s.dim for s in self.model_.scorers],
            "score_types": list(SCORE_TYPES),
            "decision_score": self.score,
            "threshold": self.threshold_,
            "decision": "anomalous (1) when the decision_score column > threshold, else normal (0)",
            "thresholds": self.thresholds_,
            "fpr": self.fpr,
            "source": self.source_,
        }

    def save(self, path: str | Path, embed_weights: bool = False) -> Path:
        """Write the detector file (see :mod:`anomaly.detector.file`); the backbone's weights are
        referenced, not stored, unless ``embed_weights`` (or the backbone was randomly initialised)."""
        metadata = self.metadata(embed_weights)
        unfitted = [
            level for level, s in zip(self.model_.levels, self.model_.scorers, strict=True) if not s.fitted
        ]
        if unfitted:
            raise UserError(
                f"the detector is not fitted (no Gaussian for level(s) {unfitted}): fit it before saving"
            )
        tensors: dict[str, Tensor] = {}
        for index, scorer in enumerate(self.model_.scorers):
            for name, value in scorer.named_buffers():
                if name != "fitted" and not (name == "projection" and is_identity(value)):
                    tensors[f"level.{index}.{name}"] = value
        if metadata["weights"] is not None and metadata["weights"]["kind"] == "embedded":
            tensors.update(embedded_tensors(self.model_.extractor))
        return write_detector(path, tensors, metadata)

    @classmethod
    def load(
        cls, path: str | Path, weights: str | None = None, device: str | torch.device = "cpu"
    ) -> GaussianDetector:
        """A detector from its file; needs no training images. ``weights`` overrides the backbone file."""
        tensors, meta = read_detector(path)
        extractor = None
        if meta["backbone"] is not None:
            extractor = rebuild_backbone(meta["backbone"], meta["weights"], tensors, weights)
        levels = list(meta["levels"])
        scorers = [scorer_from_tensors(level_tensors(tensors, i)) for i in range(len(levels))]
        detector = cls(
            backbone=meta["backbone"],
            levels=levels,
            weights=weights or (meta["weights"] or {}).get("path"),
            image_size=(meta["preprocessing"] or {}).get("image_size"),
            score=meta["decision_score"],
            fpr=meta.get("fpr"),
            device=device,
        )
        detector.levels_ = levels
        detector.image_size_ = detector.image_size
        detector.model_ = DetectorModel(extractor, levels, scorers).to(detector.device)
        detector.threshold_ = meta.get("threshold")
        detector.thresholds_ = meta.get("thresholds")
        detector.source_ = meta.get("source") or {}
        return detector

    @classmethod
    def from_method(cls, model, image_size: int) -> GaussianDetector:
        """The detector of a fitted :class:`~anomaly.methods.gaussian.GaussianAD` run.

        ``threshold_`` is whatever the module exposes as ``model.threshold`` (a float
        on its ``decision_score`` column, by default its primary score, or ``None``);
        a dict ``model.thresholds`` is kept too.
        """
        hparams = dict(model.hparams)
        score = getattr(model, "decision_score", None) or model.primary_score
        detector = cls(
            backbone=hparams.get("backbone"),
            levels=model.levels,
            weights=hparams.get("weights"),
            image_size=image_size,
            score=score,
            fpr=None,
            device=model.device,
        )
        detector.levels_ = list(model.levels)
        detector.image_size_ = image_size
        detector.model_ = DetectorModel(model.extractor, model.levels, list(model.scorers))
        threshold = getattr(model, "threshold", None)
        detector.threshold_ = None if threshold is None else float(threshold)
        thresholds = getattr(model, "thresholds", None)
        detector.thresholds_ = dict(thresholds) if isinstance(thresholds, dict) else None
        detector.source_ = {"method": model.method_name, "settings": hparams}
        return detector

    def __repr__(self) -> str:
        fitted = "fitted" if self.model_ is not None else "not fitted"
        return (
            f"GaussianDetector(backbone={self.backbone!r}, levels={self.levels_}, "
            f"score={self.score!r}, {fitted})"
        )
