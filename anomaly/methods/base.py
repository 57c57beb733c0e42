"""What every method shares: test-time score collection, AUROC, and the run's files.

A method implements :meth:`AnomalyMethod.score_batch`, which returns score
columns named ``"<score type>/<level>"`` (e.g. ``"mahalanobis/7"``) and
``"<score type>/sum"``; higher means more anomalous. This class gathers the
columns over the test set (over all processes under DDP, each image once),
computes the image AUROC of every column, logs it, and writes
``results.json`` and ``scores.csv`` into the run directory.
"""

from __future__ import annotations

import time
import warnings
from abc import abstractmethod
from collections import defaultdict
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from torch import Tensor

from anomaly.columns import SUM, ScoreColumn
from anomaly.errors import UserError
from anomaly.evaluation.metrics import image_auroc
from anomaly.evaluation.results import write_results, write_scores_csv
from anomaly.evaluation.tensorboard import report_run


def split_column(name: str) -> tuple[str, str]:
    """(kind, ``"<level>"`` or ``"sum"``) of a score column (see :class:`anomaly.columns.ScoreColumn`)."""
    column = ScoreColumn.parse(name)
    return column.kind, column.level_name


def gather_rows(rows: dict[str, Tensor]) -> dict[str, Tensor]:
    """Concatenate every process's rows (of possibly different lengths) on every process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return rows
    gathered: list[dict[str, Tensor] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, {k: v.cpu() for k, v in rows.items()})
    return {k: torch.cat([g[k] for g in gathered if g is not None]) for k in rows}


def summarise_aurocs(columns: dict[str, Tensor], labels: Tensor) -> dict[str, dict]:
    """``{score_type: {"sum": auroc, "per_level": {level: auroc}}}`` for every column."""
    summary: dict[str, dict] = defaultdict(lambda: {"sum": None, "per_level": {}})
    for name, scores in columns.items():
        score_type, level = split_column(name)
        auroc = image_auroc(scores, labels)
        if level == SUM:
            summary[score_type]["sum"] = auroc
        else:
            summary[score_type]["per_level"][level] = auroc
    return dict(summary)


class AnomalyMethod(pl.LightningModule):
    """Base class of the sibling methods (Gaussian, oc-SVM, autoencoder, classifier)."""

    method_name: str = "method"
    primary_score: str = "sum"  # the column reported as ``image_auroc``
    report_figures: bool = True  # PNGs and TensorBoard figures after the test (``--figures``)
    epochs_are_samples: bool = False  # each augmented epoch adds one pass of samples to the fit

    def __init__(self) -> None:
        super().__init__()
        self._test_rows: dict[str, list[Tensor]] = defaultdict(list)
        self._fit_started: float | None = None
        self.test_summary: dict | None = None

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

    def setup(self, stage: str) -> None:
        if stage == "fit" and self._trainer is not None:
            self.check_fit_options(self.trainer.max_epochs)  # before any image is read
        size = getattr(self, "input_size", None)
        if self.datamodule is not None and size is not None:
            self.datamodule.set_image_size(size)

    def check_fit_options(self, epochs: int | None) -> None:
        """:class:`UserError` for trainer settings that cannot give this method a proper fit."""
        if epochs == 0 or (self.epochs_are_samples and epochs is not None and epochs < 0):
            raise UserError(
                f"--trainer.max_epochs {epochs} gives no fit: use a positive number of epochs "
                "(1, or e.g. 100 with --data.augment true)"
            )

    def on_fit_start(self) -> None:
        self._fit_started = time.perf_counter()

    # ------------------------------------------------------------------- test
    def on_test_epoch_start(self) -> None:
        self._test_rows = defaultdict(list)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self.record_test_rows(batch, self.score_batch(batch))

    def record_test_rows(self, batch: dict, columns: dict[str, Tensor]) -> None:
        """Keep a test batch's score columns (with its indices and labels) for the epoch's end."""
        self._test_rows["index"].append(batch["index"].detach().cpu())
        self._test_rows["label"].append(batch["label"].detach().cpu())
        for name, value in columns.items():
            self._test_rows[name].append(value.detach().to(torch.float64).cpu())

    def on_test_epoch_end(self) -> None:
        rows = gather_rows({k: torch.cat(v) for k, v in self._test_rows.items()})
        order = torch.argsort(rows["index"])
        rows = {k: v[order] for k, v in rows.items()}
        if rows["index"].unique().numel() != rows["index"].numel():
            raise RuntimeError("a test image was scored more than once")
        labels = rows.pop("label")
        indices = rows.pop("index")
        if self.trainer.is_global_zero and labels.unique().numel() < 2:
            only = "anomalous" if bool(labels.all()) else "normal"
            warnings.warn(
                f"the test set holds only {only} images: AUROC is undefined (null in results.json); "
                "every image's score is in scores.csv",
                stacklevel=1,
            )
        summary = summarise_aurocs(rows, labels)
        for score_type, entry in summary.items():
            for level, value in [(SUM, entry["sum"]), *entry["per_level"].items()]:
                if value is not None:
                    self.log(f"test/auroc/{score_type}/{level}", value, rank_zero_only=True)
        self.test_summary = self._results(summary, indices, labels, rows)
        run_dir = Path(self.trainer.log_dir or self.trainer.default_root_dir)  # a collective under DDP
        if self.trainer.is_global_zero:
            self._write(run_dir, indices, labels, rows)
            report_run(self, run_dir, labels, rows, indices, figures=self.report_figures)

    def _results(self, summary: dict, indices: Tensor, labels: Tensor, rows: dict[str, Tensor]) -> dict:
        dm = self.datamodule
        primary_type, primary_level = split_column(self.primary_score)
        primary = summary[primary_type]
        return {
            "method": self.method_name,
            "backbone": self.backbone_name(),
            "category": getattr(dm, "category", None),
            "dataset": getattr(dm, "dataset", None),
            "fold": getattr(dm, "fold", None),
            "n_train": len(dm.fit_samples) if dm is not None else None,
            "n_test": int(labels.numel()),
            "n_test_anomalous": int(labels.sum().item()),
            "primary_score": self.primary_score,
            "image_auroc": primary["sum"] if primary_level == SUM else primary["per_level"][primary_level],
            "per_level": primary["per_level"],
            "scores": summary,
            "settings": self.settings(),
            "fit_seconds": None if self._fit_started is None else time.perf_counter() - self._fit_started,
            **self.extra_results(),
            **self.test_results(rows, labels),
        }

    def _write(self, run_dir: Path, indices: Tensor, labels: Tensor, rows: dict[str, Tensor]) -> None:
        samples = self.datamodule.test_samples
        columns: dict[str, list] = {
            "path": [samples[i].path for i in indices.tolist()],
            "label": labels.tolist(),
            "defect": [samples[i].defect for i in indices.tolist()],
        }
        for name, values in {**rows, **self.decision_columns(rows)}.items():
            columns[name.replace("/", "_")] = values.tolist()
        write_scores_csv(run_dir, columns)
        write_results(run_dir, self.test_summary)
