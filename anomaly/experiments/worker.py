"""One cell of a grid in its own process: ``python -m anomaly.experiments.worker JOB``.

``JOB`` is the JSON of :func:`anomaly.experiments.cells.job_text`. The worker runs the training command and
records the finished run in the grid's run index, exactly as the in-process sweep
does; ``anomaly reproduce --devices`` starts one worker per GPU.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from anomaly.console import run_command
from anomaly.evaluation.report import format_run_table
from anomaly.experiments.cells import job_from_text, run_cell


def run_job(text: str) -> int:
    from anomaly.cli import fit_and_test

    cell, command, index = job_from_text(text)
    results = run_cell(cell, command, fit_and_test)
    index.store(cell, results["run_dir"])
    print(format_run_table(results))  # into the worker's log
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if len(argv) != 1:
        print("usage: python -m anomaly.experiments.worker JOB_JSON", file=sys.stderr)
        return 2
    return run_command(lambda: run_job(argv[0]), on_interrupt="the run was stopped")


if __name__ == "__main__":
    from anomaly.commands import run

    run(main)
