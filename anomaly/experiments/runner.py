"""Run a table's grid (resumable, with a progress bar) and print it beside the paper's numbers.

Every (setting arguments, category, fold) is one run of the training entry point
(:func:`anomaly.cli.fit_and_test`, in-process). When it finishes, a small
record under ``<runs>/.experiments/`` links the run to its run directory; a run
whose record points at a complete ``results.json`` is skipped next time, in
this table and in every other table that needs the same run.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from tqdm import tqdm

from anomaly.atomic import open_atomically
from anomaly.errors import UserError
from anomaly.evaluation.aggregate import RunRecord, completeness_warnings
from anomaly.evaluation.tables import LevelColumn, Table
from anomaly.experiments.cells import Cell, RunIndex, job_text, run_cell
from anomaly.experiments.grids import Setting, TableSpec
from anomaly.experiments.layouts import build_table
from anomaly.experiments.sharding import run_on_devices


def grid_cells(spec: TableSpec, categories: Sequence[str], folds: Sequence[int]) -> list[Cell]:
    """The table's runs, each once, grouped so that runs of the same setting follow each other.

    The order (settings as in the table, then sorted categories, then sorted folds) is the
    canonical one that ``--shard`` splits, whatever order categories and folds were given in.
    """
    seen: dict[Cell, None] = {}
    for setting in spec.settings:
        for category in sorted(categories):
            for fold in sorted(folds):
                seen[Cell(setting.args, category, fold, setting.uses_feature_cache)] = None
    return list(seen)


def run_grid(
    cells: Sequence[Cell],
    data_root: Path,
    runs_dir: Path,
    extra: Sequence[str] = (),
    fit_and_test: Callable[[list[str]], dict] | None = None,
    feature_cache: Path | None = None,
    devices: Sequence[str] | None = None,
    launch: Callable[[Cell, str], int] | None = None,
) -> tuple[int, int]:
    """Run every cell without a complete result; returns (runs done now, runs skipped).

    With ``feature_cache``, feature-based runs extract each image's features once
    and share them across folds, score types, reductions and tables. With
    ``devices`` (GPU ids), the cells run in worker processes, one at a time on each
    GPU (``launch(cell, device)``, by default :func:`worker_launcher`); otherwise one
    after another in this process.
    """
    index = RunIndex(runs_dir, data_root, extra)
    todo = [c for c in cells if index.record(c) is None]
    with tqdm(total=len(todo), desc="runs", unit="run", file=sys.stderr, dynamic_ncols=True) as bar:
        if devices:
            launch = launch or worker_launcher(index, data_root, runs_dir, extra, feature_cache)
            failed = []
            for cell, status in run_on_devices(todo, devices, launch):
                if status != 0 or index.record(cell) is None:
                    failed.append(cell)
                bar.set_postfix_str(cell.describe()[-60:])
                bar.update()
            if failed:
                raise UserError(
                    f"{len(failed)} of {len(todo)} runs failed (the others are kept); their output is in "
                    f"{index.folder / LOG_DIR}, e.g. {log_path(index, failed[0]).name}"
                )
            return len(todo), len(cells) - len(todo)
        if fit_and_test is None:
            from anomaly.cli import fit_and_test
        for cell in todo:
            bar.set_postfix_str(cell.describe()[-60:])
            results = run_cell(cell, cell.command(data_root, runs_dir, extra, feature_cache), fit_and_test)
            index.store(cell, results["run_dir"])
            bar.update()
    return len(todo), len(cells) - len(todo)


LOG_DIR = "logs"


def log_path(index: RunIndex, cell: Cell) -> Path:
    """Where a worker's output goes: ``<runs>/.experiments/logs/<cell key>.log``."""
    return index.folder / LOG_DIR / f"{index.path(cell).stem}.log"


def worker_launcher(
    index: RunIndex, data_root: Path, runs_dir: Path, extra: Sequence[str], feature_cache: Path | None
) -> Callable[[Cell, str], int]:
    """Runs a cell in ``python -m anomaly.experiments.worker`` that sees one GPU; returns its exit status."""

    def launch(cell: Cell, device: str) -> int:
        job = job_text(cell, cell.command(data_root, runs_dir, extra, feature_cache), index)
        log = log_path(index, cell)
        log.parent.mkdir(parents=True, exist_ok=True)
        environment = {**os.environ, "CUDA_VISIBLE_DEVICES": device}
        with open_atomically(log) as output:  # whole when the worker has ended
            return subprocess.run(
                [sys.executable, "-m", "anomaly.experiments.worker", job],
                env=environment,
                stdout=output,
                stderr=subprocess.STDOUT,
                check=False,
            ).returncode

    return launch


def setting_records(setting: Setting, cells: Sequence[Cell], index: RunIndex) -> list[RunRecord]:
    records = [index.record(c) for c in cells if c.args == setting.args]
    return [r for r in records if r is not None]


def measured_table(
    spec: TableSpec, categories: Sequence[str], folds: Sequence[int], index: RunIndex
) -> tuple[Table, list[str]]:
    """The table from the finished runs of ``index``, and warnings for the runs it lacks."""
    cells = grid_cells(spec, categories, folds)
    columns, warnings = [], []
    for setting in spec.settings:
        records = setting_records(setting, cells, index)
        missing = sum(c.args == setting.args for c in cells) - len(records)
        if missing:
            warnings.append(f"{setting.label}: {missing} of the grid's runs have no complete results")
        warnings += completeness_warnings(setting.label, records, categories, folds)
        columns.append(LevelColumn(setting.label, records, setting.score_type, setting.paper_column))
    table = build_table(spec, columns)
    table.notes += warnings
    return table, warnings
