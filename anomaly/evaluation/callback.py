"""The run's evaluation as a Lightning callback: metrics and every file a test writes.

A method's ``test_step`` only returns its rows: ``{"scores": {column: (B,)}, "maps": (B, k, k)}``
(maps for map-capable models only). :class:`RunReport` collects them with the batch's indices,
labels and masks, gathers them over all processes (each image once, sorted by index), and then

* computes the image AUROC of every score column (and, with maps and masks, pixel AUROC and PRO
  over the images whose ground truth is known: normal ones, and defective ones with a mask)
  and logs them (``test/auroc/<type>/<level>``, ``test/pixel_auroc``, ``test/pro``);
* asks the method for its own entries (:meth:`~anomaly.methods.base.AnomalyMethod.extra_results`,
  ``test_results``, ``decision_columns``, ``overlays``);
* on global rank zero writes ``results.json``, ``scores.csv``, the figures, the TensorBoard output
  and the anomaly-map overlays into the run directory (the logger's, else the trainer's root).

The command that runs a fit (:mod:`anomaly.cli`) installs it; :attr:`RunReport.results` holds the
last test's ``results.json`` content.
"""

from __future__ import annotations

import time
import warnings
from collections import defaultdict
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import Tensor

from anomaly.columns import SUM, ScoreColumn
from anomaly.evaluation.metrics import image_auroc
from anomaly.evaluation.overlays import write_overlays
from anomaly.evaluation.pixel import pixel_auroc, pixel_pro
from anomaly.evaluation.results import OVERLAYS_DIR, write_results, write_scores_csv
from anomaly.evaluation.tensorboard import report_run
from anomaly.methods.distributed import gather_rows

INDEX, LABEL, MAP, MASK, HAS_MASK = "index", "label", "map", "mask", "has_mask"


def summarise_aurocs(columns: dict[str, Tensor], labels: Tensor) -> dict[str, dict]:
    """``{score_type: {"sum": auroc, "per_level": {level: auroc}}}`` for every column."""
    summary: dict[str, dict] = defaultdict(lambda: {"sum": None, "per_level": {}})
    for name, scores in columns.items():
        column = ScoreColumn.parse(name)
        auroc = image_auroc(scores, labels)
        if column.is_sum:
            summary[column.kind]["sum"] = auroc
        else:
            summary[column.kind]["per_level"][column.level_name] = auroc
    return dict(summary)


class RunReport(pl.Callback):
    """Computes a test's metrics from the rows the method returns, and writes the run's files.

    Args:
        figures: also draw the PNGs and TensorBoard figures and images (off in sweeps: drawing
            takes about a second a run; results, scores and histograms are kept).
    """

    def __init__(self, figures: bool = True) -> None:
        self.figures = figures
        self.results: dict | None = None
        self._parts: dict[str, list[Tensor]] = defaultdict(list)
        self._fit_started: float | None = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fit_started = time.perf_counter()

    # ------------------------------------------------------------------ collect
    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._parts = defaultdict(list)
        self.results = None

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._parts[INDEX].append(batch["index"].detach().cpu())
        self._parts[LABEL].append(batch["label"].detach().cpu())
        for name, values in outputs["scores"].items():
            self._parts[name].append(values.detach().to(torch.float64).cpu())
        if outputs.get("maps") is not None:
            self._parts[MAP].append(outputs["maps"].detach().float().cpu())
            if MASK in batch:
                self._parts[MASK].append(batch[MASK].detach().cpu())
                self._parts[HAS_MASK].append(torch.as_tensor(batch[HAS_MASK]).to(torch.uint8).cpu())

    def gathered_rows(self) -> dict[str, Tensor]:
        """Every process's rows, sorted by image index (a collective under DDP)."""
        rows = gather_rows({k: torch.cat(v) for k, v in self._parts.items()})
        order = torch.argsort(rows[INDEX])
        rows = {k: v[order] for k, v in rows.items()}
        if rows[INDEX].unique().numel() != rows[INDEX].numel():
            raise RuntimeError("a test image was scored more than once")
        return rows

    # ------------------------------------------------------------------ report
    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        rows = self.gathered_rows()
        indices, labels = rows.pop(INDEX), rows.pop(LABEL)
        maps, masks, has_mask = rows.pop(MAP, None), rows.pop(MASK, None), rows.pop(HAS_MASK, None)
        if trainer.is_global_zero and labels.unique().numel() < 2:
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
                    pl_module.log(f"test/auroc/{score_type}/{level}", value, rank_zero_only=True)
        pixel = {}
        if maps is not None and masks is not None:
            known = self.known_truth(trainer, indices, labels, has_mask)
            if bool((labels[known] == 1).any()):
                known_maps, known_masks = maps[known], masks[known]
                pixel = {
                    "pixel_auroc": pixel_auroc(known_maps, known_masks),
                    "pro": pixel_pro(known_maps, known_masks),
                }
                for name, value in pixel.items():
                    pl_module.log(f"test/{name}", value, rank_zero_only=True)
                pixel["n_pixel_images"] = int(known.sum())
        self.results = self.compose(trainer, pl_module, summary, labels, rows, pixel)
        run_dir = Path(trainer.log_dir or trainer.default_root_dir)  # a collective under DDP
        if not trainer.is_global_zero:
            return
        self.write_scores(trainer, pl_module, run_dir, indices, labels, rows)
        write_results(run_dir, self.results)
        report_run(pl_module, self.results, run_dir, labels, rows, indices, figures=self.figures)
        if maps is not None and self.figures and pl_module.overlays > 0:
            self.write_overlays(trainer, run_dir, maps, rows[pl_module.primary_score], pl_module.overlays)

    @staticmethod
    def known_truth(trainer, indices: Tensor, labels: Tensor, has_mask: Tensor) -> Tensor:
        """Which test images' pixels are known: the normal ones (all normal) and the defective ones
        with a mask. A defective image without a mask is not all normal: it is left out of the pixel
        metrics, with one warning naming how many and their defect folders."""
        known = (labels == 0) | has_mask.bool()
        if trainer.is_global_zero and not bool(known.all()):
            samples = trainer.datamodule.test_samples
            defects = sorted({samples[i].defect for i in indices[~known].tolist()})
            warnings.warn(
                f"{int((~known).sum())} defective test image(s) have no ground-truth mask (in "
                f"{', '.join(defects)}): pixel AUROC and PRO are computed over the other "
                f"{int(known.sum())} images",
                stacklevel=1,
            )
        return known

    def compose(self, trainer, pl_module, summary: dict, labels: Tensor, rows: dict, pixel: dict) -> dict:
        """The content of ``results.json``: the common entries, then the method's own."""
        dm = trainer.datamodule
        primary = ScoreColumn.parse(pl_module.primary_score)
        entry = summary[primary.kind]
        method_results = pl_module.test_results(rows, labels)
        if pl_module.reports_pixel_scores:
            method_results.update({"pixel_auroc": None, "pro": None, "n_pixel_images": 0, **pixel})
        return {
            "method": pl_module.method_name,
            "backbone": pl_module.backbone_name(),
            "category": getattr(dm, "category", None),
            "dataset": getattr(dm, "dataset", None),
            "fold": getattr(dm, "fold", None),
            "n_train": len(dm.fit_samples) if dm is not None else None,
            "n_test": int(labels.numel()),
            "n_test_anomalous": int(labels.sum().item()),
            "primary_score": pl_module.primary_score,
            "image_auroc": entry["sum"] if primary.is_sum else entry["per_level"][primary.level_name],
            "per_level": entry["per_level"],
            "scores": summary,
            "settings": pl_module.settings(),
            "fit_seconds": None if self._fit_started is None else time.perf_counter() - self._fit_started,
            **pl_module.extra_results(),
            **method_results,
        }

    def write_scores(self, trainer, pl_module, run_dir: Path, indices: Tensor, labels: Tensor, rows) -> None:
        """``scores.csv``: each test image's path, label, defect, scores and the method's decisions."""
        samples = trainer.datamodule.test_samples
        columns: dict[str, list] = {
            "path": [samples[i].path for i in indices.tolist()],
            "label": labels.tolist(),
            "defect": [samples[i].defect for i in indices.tolist()],
        }
        for name, values in rows.items():
            columns[ScoreColumn.parse(name).csv_name] = values.tolist()
        for name, values in pl_module.decision_columns(rows).items():
            columns[name] = values.tolist()
        write_scores_csv(run_dir, columns)

    def write_overlays(self, trainer, run_dir: Path, maps: Tensor, primary: Tensor, count: int) -> None:
        """Overlays of the ``count`` highest-scoring test images' maps (rows sorted by image index)."""
        top = torch.argsort(primary, descending=True)[:count].tolist()
        dm = trainer.datamodule
        samples = dm.test_samples
        write_overlays(
            run_dir / OVERLAYS_DIR,
            [samples[i] for i in top],
            maps[top],
            dm.image_size,
            [float(primary[i]) for i in top],
            geometry=getattr(dm, "geometry", None),
        )


__all__ = ["RunReport", "summarise_aurocs"]
