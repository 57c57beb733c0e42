"""One cell of a grid: its training command, its record in the grid's run index, running it, and
the job text that hands it to a worker process (shared by the in-process sweep and the worker)."""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from anomaly.console import interrupted_exit
from anomaly.errors import ArgumentsError, UserError
from anomaly.evaluation.aggregate import IncompleteResults, RunRecord, load_run
from anomaly.evaluation.results import RESULTS_FILE, write_atomic

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
    """Hide the warnings every run repeats."""
    with warnings.catch_warnings():
        for pattern in RUN_NOISE:
            warnings.filterwarnings("ignore", message=pattern)
        yield


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


def job_text(cell: Cell, command: Sequence[str], index: RunIndex) -> str:
    """Everything a worker needs: the cell, its training arguments, and the index to record it in."""
    return json.dumps(
        {
            "cell": [list(cell.args), cell.category, cell.fold, cell.cacheable],
            "command": list(command),
            "runs_dir": str(index.folder.parent),
            "data_root": str(index.data_root),
            "extra": index.extra,
        }
    )


def job_from_text(text: str) -> tuple[Cell, list[str], RunIndex]:
    """The cell, training arguments and run index of :func:`job_text`'s ``text``."""
    job = json.loads(text)
    args, category, fold, cacheable = job["cell"]
    index = RunIndex(Path(job["runs_dir"]), Path(job["data_root"]), job["extra"])
    return Cell(tuple(args), category, fold, cacheable), job["command"], index
