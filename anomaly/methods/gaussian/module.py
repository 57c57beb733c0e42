"""The paper's method as a LightningModule (Rippel et al., ICPR 2020).

* ``training_step`` streams each level's pooled features into float64 running
  moments on the batch's device; no feature is stored, so memory is flat in the
  number of images and epochs.
* ``on_train_end`` merges the moments of all processes, then fits the
  Ledoit-Wolf Gaussian per level (mean, shrunk covariance, precision). With a
  PCA/NPCA reduction (Table III) the projection comes from the streamed moments and
  the Gaussian is fitted again in the reduced space from the streamed rows, which
  the detector keeps (it needs them to absorb more images later).
* :meth:`GaussianAD.calibrate`, the step the wiring runs after the fit
  (:func:`anomaly.methods.run.fit`), sets the empirical threshold on the fold's
  held-out normal images.
* ``test_step`` scores each image per level by Mahalanobis (eq. 2), L2 and SED
  (eq. 9) from one forward pass; ``<type>/sum`` is the paper's sum mode.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import replace

import torch
from torch import Tensor, nn

from anomaly.columns import SUM, ScoreColumn
from anomaly.data.needs import DataNeeds
from anomaly.detector.model import GaussianDetectorModel
from anomaly.errors import UserError
from anomaly.methods.distributed import gather_batches
from anomaly.methods.features import FeatureMethod
from anomaly.methods.gaussian.working_point import working_point_report
from anomaly.pooling import Global, Pooling
from anomaly.stats.distances import SCORE_TYPES
from anomaly.stats.moments import synchronise
from anomaly.stats.pca import check_reduction
from anomaly.stats.threshold import DEFAULT_TARGET_FPR, check_fpr, chi2_threshold, empirical_threshold

THRESHOLD_METHODS = ("empirical", "chi2")  # the first is the default
DEFAULT_DECISION_SCORE = f"mahalanobis/{SUM}"


class GaussianAD(FeatureMethod):
    """Multivariate Gaussian per level of a frozen ImageNet classifier.

    Args:
        backbone: e.g. ``efficientnet-b4``, ``resnet18``, ``efficientnet-lite0``.
        levels: 1-based levels to fit and sum (default: all).
        weights: a local weights file instead of the backbone's usual download.
        pretrained: ``False`` gives random weights (for tests only).
        reduction: ``none``, ``pca`` or ``npca`` (Table III).
        variance_threshold: the cumulative explained-variance threshold t of the
            reduction (default 0.99): ``pca`` 0.99 is "PCA 99%", ``npca`` 0.99 /
            0.999 / 0.9999 are "NPCA 1% / 0.1% / 0.01%".
        target_fpr: the false-positive rate the working point aims at.
        decision_score: the score column decisions are made on, e.g.
            ``mahalanobis/sum`` or ``mahalanobis/7``.
        threshold_method: ``empirical`` (held-out normal fifth; any score) or
            ``chi2`` (eq. 8; a single level's Mahalanobis score only).
        threshold: a fixed decision threshold instead of a calibrated one.
    """

    method_name = "gaussian"
    primary_score = f"mahalanobis/{SUM}"

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
        threshold_method: str = THRESHOLD_METHODS[0],
        threshold: float | None = None,
    ) -> None:
        super().__init__(backbone, levels, weights, pretrained)
        self.reduction, self.variance_threshold = check_reduction(reduction, variance_threshold)
        self.target_fpr = check_fpr(target_fpr)
        pooling = self.make_pooling()
        self.decision_score = self._check_decision(decision_score, threshold_method, pooling)
        self.threshold_method = threshold_method
        self.save_hyperparameters()
        self.automatic_optimization = False
        #: The fitted detector: the one module that scores (see anomaly.detector.model).
        self.detector = GaussianDetectorModel.for_fitting(
            self.extractor,
            self.levels,
            super().level_dims,
            pooling,
            decision_score=decision_score,
            level_weighting=self.make_level_weighting(),
            threshold=threshold,
            image_size=self.extractor.image_size,
        )
        self.detector.set_reduction(self.reduction, self.variance_threshold)
        self.fit_epochs = 0
        self.holdout_scores: dict[str, Tensor] | None = None

    def make_pooling(self) -> Pooling:
        """The pooling strategy (the paper's global pooling; subclasses choose others)."""
        return Global()

    def make_level_weighting(self) -> str:
        """How the levels are summed (the paper's equal weights)."""
        return "none"

    def data_needs(self) -> DataNeeds:
        """Besides the base's needs: the detector model scores tiles (``--data.tiles``)."""
        return replace(super().data_needs(), tiles=True)

    def setup(self, stage: str) -> None:
        """Besides the base's set-up, the detector takes the data's resize rule, fit rule and tiles."""
        super().setup(stage)
        geometry = getattr(self.datamodule, "geometry", None)
        if geometry is not None:
            self.detector.set_geometry(geometry)

    @property
    def moments(self) -> nn.ModuleList:
        """The detector's streamed accumulators, one per level."""
        return self.detector.moments

    @property
    def scorers(self) -> nn.ModuleList:
        """The detector's per-level scorers."""
        return self.detector.scorers

    @property
    def pooling(self) -> Pooling:
        return self.detector.pooling

    @property
    def level_dims(self) -> list[int]:
        """Each level's modelled width (before any reduction), as the pooling gives it."""
        pooling = self.detector.pooling
        widths = zip(self.levels, super().level_dims, strict=True)
        return [pooling.for_level(lv).modelled_dim(c) for lv, c in widths]

    def _check_decision(self, column: str, method: str, pooling: Pooling) -> str:
        decision = ScoreColumn.parse(column).validate(SCORE_TYPES, self.levels, "decision_score")
        if method not in THRESHOLD_METHODS:
            raise UserError(f"threshold_method must be one of {', '.join(THRESHOLD_METHODS)}, got '{method}'")
        if method == "chi2" and not pooling.chi2_calibratable:
            raise UserError("a max over cells is not chi-squared distributed: use threshold_method empirical")
        if method == "chi2" and (decision.kind != "mahalanobis" or decision.is_sum):
            raise UserError(
                "threshold_method chi2 needs a single level's Mahalanobis score, e.g. mahalanobis/7"
            )
        return str(decision)

    @property
    def threshold(self) -> float | None:
        """The decision threshold on ``decision_score`` (None when none could be set)."""
        return self.detector.threshold

    @property
    def decision_threshold(self) -> Tensor:
        return self.detector.decision_threshold

    def run_name(self) -> str:
        """Besides the base's name: the reduction, and a working point other than the default one.

        The working point changes the run's decisions and ``results.json``, so runs that differ
        only in it get folders of their own instead of replacing each other's files.
        """
        name = super().run_name()
        if self.reduction != "none":
            name += f"_{self.reduction}-{self.variance_threshold:g}"
        if self.hparams.get("threshold") is not None:
            name += f"_threshold{self.hparams['threshold']:g}"
        else:
            if self.threshold_method != THRESHOLD_METHODS[0]:
                name += f"_{self.threshold_method}"
            if self.target_fpr != DEFAULT_TARGET_FPR:
                name += f"_fpr{self.target_fpr:g}"
        if str(self.decision_score) != DEFAULT_DECISION_SCORE:
            name += f"_decide-{str(self.decision_score).replace('/', '-')}"
        return name

    def configure_optimizers(self) -> None:
        return None

    # -------------------------------------------------------------------- fit
    def check_fit_options(self, epochs: int | None) -> None:
        """Besides the base's checks, refuse repeated passes over identical images (a faked larger sample)."""
        super().check_fit_options(epochs)
        if self.datamodule is not None and not getattr(self.datamodule, "augment", False) and epochs != 1:
            raise UserError(
                f"--trainer.max_epochs {epochs} without augmentation streams the same images {epochs} "
                "times, and Ledoit-Wolf would take them for more images (less shrinkage): use "
                "--trainer.max_epochs 1, or --data.augment true"
            )

    def on_train_start(self) -> None:
        for accumulator in self.moments:
            accumulator.reset()
        self.detector.set_reduction(self.reduction, self.variance_threshold)  # no rows yet
        self.fit_epochs = 0

    def batch_features(self, batch: dict) -> list[Tensor]:
        """The batch's modelled rows: cached globally pooled features, or the detector's pooling."""
        if "features" in batch:
            if not isinstance(self.pooling, Global):
                raise UserError(
                    "data.feature_cache holds globally pooled features: "
                    "use pooling global, or no feature_cache"
                )
            return super().batch_features(batch)
        return self.features(batch["image"])

    def features(self, images: Tensor) -> list[Tensor]:
        """The detector's rows of each level for a batch of images."""
        return self.detector.features(images)

    def training_step(self, batch: dict, batch_idx: int) -> None:
        with torch.no_grad():
            self.detector.update(self.batch_features(batch))

    def on_train_epoch_end(self) -> None:
        self.fit_epochs += 1

    def on_train_end(self) -> None:
        """Merge the moments (and kept rows) of all processes and fit each level's Gaussian."""
        synchronise(list(self.moments))
        self.detector.rows = [gather_batches(rows) for rows in self.detector.rows]
        self.detector.precision = str(self.trainer.precision) if self._trainer is not None else None
        self.detector.refit()

    def calibrate(self, score_holdout: Callable[[], dict[str, Tensor] | None]) -> None:
        """Score the held-out normal fifth (``score_holdout()``) and set the decision threshold."""
        self.holdout_scores = score_holdout()
        if self.hparams.threshold is not None:
            return
        value = None
        if self.threshold_method == "chi2":
            level = ScoreColumn.parse(self.decision_score).level
            value = chi2_threshold(self.scorers[self.levels.index(level)].dim, self.target_fpr)
        elif self.holdout_scores is not None:
            held_out = self.holdout_scores[self.decision_score]
            value = empirical_threshold(held_out, self.target_fpr)
        else:
            warnings.warn(
                "no held-out images (fold: null): no empirical decision threshold; "
                "set threshold or threshold_method chi2",
                stacklevel=2,
            )
        self.detector.set_threshold(value)

    # ------------------------------------------------------------------ score
    def score_batch(self, batch: dict) -> dict[str, Tensor]:
        return self.score_features(self.batch_features(batch))

    @torch.no_grad()
    def score_images(self, images: Tensor) -> dict[str, Tensor]:
        """Score columns for a batch of images: the detector's forward."""
        return self.detector.score_images(images)

    @torch.no_grad()
    def score_features(self, features: list[Tensor]) -> dict[str, Tensor]:
        """``{"<type>/<level>": (B,)}`` for every score type and level, plus ``"<type>/sum"``."""
        return self.detector.score_features(features)

    # ---------------------------------------------------------------- results
    def extra_results(self) -> dict:
        per_level = list(zip(self.levels, self.scorers, strict=True))
        return {
            "levels": self.levels,
            "reduction": self.reduction,
            "variance_threshold": self.variance_threshold,
            "level_dims": {str(lv): s.dim for lv, s in per_level},
            "input_dims": {str(lv): d for lv, d in zip(self.levels, self.level_dims, strict=True)},
            "shrinkage": {str(lv): float(s.shrinkage) for lv, s in per_level},
            "n_fit_vectors": self.moments[0].n,
            "epochs": self.fit_epochs,
        }

    def test_results(self, rows: dict[str, Tensor], labels: Tensor) -> dict:
        report = working_point_report(
            self.levels, [s.dim for s in self.scorers], rows, labels, self.holdout_scores, self.target_fpr
        )
        report["decision"] = {
            "score": self.decision_score,
            "method": self.threshold_method if self.hparams.threshold is None else "fixed",
            "threshold": self.threshold,
        }
        return {"working_point": report}

    def decision_columns(self, rows: dict[str, Tensor]) -> dict[str, Tensor]:
        if self.threshold is None:
            return {}
        return {"decision": (rows[self.decision_score] > self.threshold).to(torch.int64)}
