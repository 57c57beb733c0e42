"""What every method shares: the score columns it returns from a test, and what it asks of the data.

A method implements :meth:`AnomalyMethod.score_batch`, which returns score
columns named ``"<score type>/<level>"`` (e.g. ``"mahalanobis/7"``) and
``"<score type>/sum"``; higher means more anomalous. ``test_step`` returns them
(with anomaly maps, for map-capable methods); the run's evaluation callback
(:class:`anomaly.evaluation.callback.RunReport`) gathers them over all processes,
computes the metrics and writes the files, asking the method for its own entries
(:meth:`~AnomalyMethod.extra_results`, :meth:`~AnomalyMethod.test_results`,
:meth:`~AnomalyMethod.decision_columns`). What the method needs from the data
(input size, shuffling, ...) it declares in :meth:`~AnomalyMethod.data_needs`;
the code that wires a run hands it to the data module (:func:`anomaly.methods.run.fit`).
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable
from pathlib import Path

import pytorch_lightning as pl
from torch import Tensor

from anomaly.columns import SUM
from anomaly.data.needs import DataNeeds
from anomaly.errors import UserError

__all__ = ["SUM", "AnomalyMethod"]


class AnomalyMethod(pl.LightningModule):
    """Base class of the sibling methods (Gaussian, oc-SVM, autoencoder, classifier)."""

    method_name: str = "method"
    primary_score: str = "sum"  # the column reported as ``image_auroc``
    epochs_are_samples: bool = False  # each augmented epoch adds one pass of samples to the fit
    reports_pixel_scores: bool = False  # results.json has pixel_auroc and pro (null without maps)
    overlays: int = 0  # how many of the highest-scoring test images get an anomaly-map overlay

    # ------------------------------------------------------------- to implement
    @abstractmethod
    def score_batch(self, batch: dict) -> dict[str, Tensor]:
        """Score columns for a batch: ``{"<type>/<level>": (B,) tensor}``."""

    def extra_results(self) -> dict:
        """Method-specific entries of ``results.json``."""
        return {}

    def test_results(self, rows: dict[str, Tensor], labels: Tensor) -> dict:
        """Entries of ``results.json`` computed from the test scores (e.g. working points)."""
        return {}

    def decision_columns(self, rows: dict[str, Tensor]) -> dict[str, Tensor]:
        """Extra per-image columns of ``scores.csv`` (e.g. 0/1 decisions at a threshold)."""
        return {}

    def run_name(self) -> str:
        """Folder name that tells this run's settings apart (``<backbone>[_<setting>...]``)."""
        return self.backbone_name() + self.weights_suffix()

    def weights_suffix(self) -> str:
        """``_weights-<file>`` for local weights, ``_random-init`` without pretrained weights, else ""."""
        if self.hparams.get("weights"):
            return f"_weights-{Path(self.hparams['weights']).stem}"
        return "" if self.hparams.get("pretrained", True) else "_random-init"

    def backbone_name(self) -> str:
        return str(self.hparams.get("backbone", "none"))

    def settings(self) -> dict:
        """The settings that distinguish runs of this method (for grouping in tables)."""
        return dict(self.hparams)

    # ------------------------------------------------------------------- data
    @property
    def datamodule(self):
        return self.trainer.datamodule if self.trainer is not None else None

    def data_needs(self) -> DataNeeds:
        """What this method asks of the data module (see :class:`~anomaly.data.needs.DataNeeds`)."""
        return DataNeeds()

    def setup(self, stage: str) -> None:
        if stage == "fit" and self._trainer is not None:
            self.check_fit_options(self.trainer.max_epochs)  # before any image is read

    def check_fit_options(self, epochs: int | None) -> None:
        """:class:`UserError` for trainer settings that cannot give this method a proper fit."""
        if epochs == 0 or (self.epochs_are_samples and epochs is not None and epochs < 0):
            raise UserError(
                f"--trainer.max_epochs {epochs} gives no fit: use a positive number of epochs "
                "(1, or e.g. 100 with --data.augment true)"
            )

    def calibrate(self, score_holdout: Callable[[], dict[str, Tensor] | None]) -> None:
        """The step after the fit that sets what the held-out normal images decide (nothing here).

        ``score_holdout()`` returns the score columns of the fold's held-out normal images, over
        all processes (``None`` when the fold holds none out); see :func:`anomaly.methods.run.fit`.
        """

    # ------------------------------------------------------------------- test
    def test_step(self, batch: dict, batch_idx: int) -> dict:
        """The batch's rows: ``{"scores": {column: (B,)}}`` (map-capable methods add ``"maps"``)."""
        return {"scores": self.score_batch(batch)}

    def predict_step(self, batch: dict, batch_idx: int) -> dict[str, Tensor]:
        """The batch's score columns."""
        return self.score_batch(batch)
