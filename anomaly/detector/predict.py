"""Scoring image files with a saved detector, streamed to CSV.

Images are read by a DataLoader (optionally in worker processes), scored batch
by batch, and each batch's rows are written and flushed at once: memory stays
flat for any number of images, and an interrupted run keeps every row already
scored. An unreadable file gets a row with its ``error`` and empty scores;
when not a single file can be scored, nothing is written and it is an error.
"""

from __future__ import annotations

import csv
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from torch.utils.data import DataLoader
from tqdm import tqdm

from anomaly.detector.api import GaussianDetector
from anomaly.detector.inputs import PredictionDataset
from anomaly.errors import UserError
from anomaly.methods.base import split_column


@dataclass
class PredictionSummary:
    scored: int = 0
    failed: int = 0
    anomalous: int = 0


def output_columns(detector: GaussianDetector) -> tuple[list[str], list[str]]:
    """(CSV header, the score columns written after ``score``): the primary type on every level."""
    score_type, _ = split_column(detector.score)
    per_level = [f"{score_type}/{level}" for level in detector.levels_]
    header = ["path", "score", *(c.replace("/", "_") for c in per_level), "decision", "error"]
    return header, per_level


def predict_files(
    detector: GaussianDetector,
    paths: Iterable[Path],
    out: TextIO,
    batch_size: int = 32,
    num_workers: int = 0,
    progress: bool = True,
) -> PredictionSummary:
    """Score every file in ``paths`` and write one CSV row per file to ``out``, in order.

    ``score`` is the detector's primary score (higher = more anomalous);
    ``decision`` is 1 (anomalous: score > threshold) or 0, and empty when the
    detector has no threshold. Nothing is written until the first image is
    scored: when none can be, :class:`UserError` names the first reason.
    """
    check_loader_options(batch_size, num_workers)
    if detector.model_ is None or detector.model_.extractor is None:
        raise UserError("this detector was fitted on features, not images: it cannot score image files")
    paths = list(paths)
    if not paths:
        raise UserError("no image files found in the input")
    dataset = PredictionDataset(paths, detector.image_size_, detector.resize)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    header, per_level = output_columns(detector)
    writer = csv.writer(out)
    pending: list[list] | None = [header]  # held back until an image is scored; None once written
    summary = PredictionSummary()
    threshold = detector.threshold_
    with tqdm(total=len(paths), unit="img", disable=not progress, file=sys.stderr) as bar:
        for batch in loader:
            ok = [i for i, error in enumerate(batch["error"]) if not error]
            columns = detector.model_.score_images(batch["image"][ok].to(detector.device)) if ok else {}
            scored = {i: position for position, i in enumerate(ok)}
            for i, index in enumerate(batch["index"].tolist()):
                row = [str(paths[index])]
                if i in scored:
                    value = float(columns[detector.score][scored[i]])
                    levels = [f"{float(columns[c][scored[i]]):.10g}" for c in per_level]
                    decision = "" if threshold is None else int(value > threshold)
                    row += [f"{value:.10g}", *levels, decision, ""]
                    summary.scored += 1
                    summary.anomalous += decision == 1
                else:
                    row += [""] * (1 + len(per_level)) + ["", batch["error"][i]]
                    summary.failed += 1
                if pending is None:
                    writer.writerow(row)
                else:
                    pending.append(row)
                    if summary.scored:
                        writer.writerows(pending)
                        pending = None
            out.flush()
            bar.update(len(batch["index"]))
    if not summary.scored:
        path, error = pending[1][0], pending[1][-1]
        raise UserError(
            f"no image could be scored: all {summary.failed} input file(s) are unreadable "
            f"(the first, {path}: {error})"
        )
    return summary


def check_loader_options(batch_size: int, num_workers: int) -> None:
    """:class:`UserError` unless ``batch_size`` >= 1 and ``num_workers`` >= 0."""
    if batch_size < 1:
        raise UserError(f"the batch size (--batch-size) must be at least 1, got {batch_size}")
    if num_workers < 0:
        raise UserError(f"the number of workers (--num-workers) must be 0 or more, got {num_workers}")
