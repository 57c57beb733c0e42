"""Run a table's grid (resumable, with a progress bar) and print it beside the paper's numbers.

Every (setting arguments, category, fold) is one run of the training entry point
(:func:`anomaly.cli.fit_and_test`, in-process). When it finishes, a small
record under ``<runs>/.experiments/`` links the run to its run directory; a run
whose record points at a complete ``results.json`` is skipped next time, in
this table and in every other table that needs the same run.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from anomaly.console import interrupted_exit
from anomaly.errors import ArgumentsError, UserError
from anomaly.evaluation.aggregate import IncompleteResults, RunRecord, completeness_warnings, load_run
from anomaly.evaluation.results import RESULTS_FILE, write_atomic
from anomaly.evaluation.tables import LevelColumn, Table
from anomaly.experiments.grids import Setting, TableSpec
from anomaly.experiments.layouts import build_table
from anomaly.experiments.sharding import run_on_devices

INDEX_DIR = ".experiments"
QUIET = ("--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false")


@dataclass(frozen=True)
class Cell:
    """One run of the grid."""

    args: tuple[str, ...]  # the setting's training arguments
    category: str
    fold: int
    cacheable: bool = field(default=False, compare=False)  # a feature-based method (reads cached features)

    def command(
        self, data_root: Path, runs_dir: Path, extra: Sequence[str] = (), feature_cache: Path | None = None
    ) -> list[str]:
        """The training arguments; the feature cache is shared by every feature-based run."""
        cache = ["--data.feature_cache", str(feature_cache)] if feature_cache and self.cacheable else []
        return [
            *self.args,
            "--data.root", str(data_root), "--data.category", self.category, "--data.fold", str(self.fold),
            "--trainer.default_root_dir", str(runs_dir), *cache, *QUIET, *extra,
        ]  # fmt: skip

    def key(self, context: Sequence[str] = ()) -> str:
        """The cell's identity, within a ``context`` of data root and result-changing extra arguments."""
        text = json.dumps([list(self.args), self.category, self.fold, list(context)])
        return hashlib.sha1(text.encode()).hexdigest()[:16]

    def describe(self) -> str:
        return f"{' '.join(self.args)} | {self.category} fold {self.fold}"


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


#: Extra training options that change how a run is computed, not its results.
NEUTRAL_OPTIONS = (
    "--data.image_cache", "--data.feature_cache", "--data.num_workers", "--figures",
    "--trainer.accelerator", "--trainer.devices", "--trainer.num_nodes", "--trainer.strategy",
    "--trainer.enable_progress_bar",
)  # fmt: skip
#: ... and for methods on frozen features (statistics need no batches), the batch size too.
FEATURE_NEUTRAL_OPTIONS = (*NEUTRAL_OPTIONS, "--data.batch_size")


def run_context(data_root: Path, extra: Sequence[str], feature_based: bool = False) -> list[str]:
    """What besides its own arguments decides a cell's results: the data and the other extra options.

    The batch size counts for methods trained by gradient descent, not for feature-based ones.
    """
    neutral = FEATURE_NEUTRAL_OPTIONS if feature_based else NEUTRAL_OPTIONS
    kept, tokens = [], iter(extra)
    for token in tokens:
        name = token.split("=", 1)[0]
        if name in neutral:
            if "=" not in token:
                next(tokens, None)  # its value
            continue
        kept.append(token)
    return [str(Path(data_root).resolve()), *kept]


class RunIndex:
    """Which run directory each finished cell wrote (``<runs>/.experiments/<key>.json``).

    A cell counts as done only for the same data root and the same result-changing
    extra arguments (see :func:`run_context`): other ones make it a new run.
    """

    def __init__(self, runs_dir: Path, data_root: Path, extra: Sequence[str] = ()) -> None:
        self.folder = Path(runs_dir) / INDEX_DIR
        self.data_root, self.extra = data_root, list(extra)

    def context(self, cell: Cell) -> list[str]:
        return run_context(self.data_root, self.extra, feature_based=cell.cacheable)

    def path(self, cell: Cell) -> Path:
        return self.folder / f"{cell.key(self.context(cell))}.json"

    def record(self, cell: Cell) -> RunRecord | None:
        """The cell's finished run, or None when it has not run or its results are incomplete."""
        try:
            entry = json.loads(self.path(cell).read_text())
            return load_run(Path(entry["run_dir"]) / RESULTS_FILE)
        except (OSError, ValueError, KeyError, TypeError, IncompleteResults):
            return None

    def store(self, cell: Cell, run_dir: str) -> None:
        entry = {
            "args": list(cell.args), "category": cell.category, "fold": cell.fold,
            "context": self.context(cell), "run_dir": run_dir,
        }  # fmt: skip
        write_atomic(self.path(cell), json.dumps(entry, indent=1) + "\n")


RUN_NOISE = (
    ".*val_dataloader.*but have no.*validation_step.*",
    ".*module\\(s\\) in eval mode.*",
    ".*isinstance\\(treespec, LeafSpec\\).*",
)


@contextmanager
def quiet_run() -> Iterator[None]:
    """Hide the warnings every run repeats, and the grid's own arguments from LightningCLI."""
    argv = sys.argv
    with warnings.catch_warnings():
        for pattern in RUN_NOISE:
            warnings.filterwarnings("ignore", message=pattern)
        sys.argv = argv[:1]
        try:
            yield
        finally:
            sys.argv = argv


def run_cell(cell: Cell, command: list[str], fit_and_test: Callable[[list[str]], dict]) -> dict:
    """One training run; an argument the training command rejects becomes one clear error line.

    Ctrl-C and SIGTERM pass through as interrupts (exit 130 and 143), also when Lightning turned
    them into ``sys.exit(1)``.
    """
    try:
        with quiet_run():
            return fit_and_test(command)
    except ArgumentsError as error:
        raise ArgumentsError(
            f"the training command rejected the arguments of run '{cell.describe()}': {error}"
        ) from None
    except SystemExit as error:
        if error.code in (0, None) or interrupted_exit(error) is not None:
            raise  # Lightning exits 1 on Ctrl-C: that is an interrupt, not a rejected argument
        raise UserError(
            f"the training command rejected the arguments of run '{cell.describe()}' "
            "(see the message above); this version may not offer one of its options"
        ) from None


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
    from anomaly.experiments.worker import job_text

    def launch(cell: Cell, device: str) -> int:
        job = job_text(cell, cell.command(data_root, runs_dir, extra, feature_cache), index)
        log = log_path(index, cell)
        log.parent.mkdir(parents=True, exist_ok=True)
        environment = {**os.environ, "CUDA_VISIBLE_DEVICES": device}
        with open(log, "w") as output:
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
