"""The ``anomaly`` command: one entry point, one subcommand per task.

    anomaly fit [--config NAME|FILE] [--data.root DIR] ...   fit a detector and test it
    anomaly predict --detector FILE --input DIR|GLOB|IMAGE    score new images
    anomaly update --detector FILE --input DIR --out NEW      teach a detector new good images
    anomaly merge --detectors FILE FILE ... --out NEW         one detector of disjoint fits
    anomaly export --detector FILE --out FILE                 ONNX or TorchScript
    anomaly evaluate RUNS_DIR                                 tables of mean ± SEM over runs
    anomaly reproduce TABLE --data.root DIR                   a table of the paper, resumably
    anomaly benchmark --root DIR                              scale benchmarks
    anomaly min-anomaly-size --data.root DIR --data.category C
    anomaly configs                                           the shipped configs

``anomaly <subcommand> --help`` lists the subcommand's options. Option names accept
``-`` or ``_`` between words alike (``--batch_size`` = ``--batch-size``), so one
spelling works everywhere.
"""

from __future__ import annotations

import atexit
import ctypes
import importlib
import os
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NoReturn

from anomaly.console import USER_ERROR_EXIT

#: What a shell reports for a process whose reader went away (128 + SIGPIPE), as ``yes | head`` does.
BROKEN_PIPE_EXIT = 141


@dataclass(frozen=True)
class Subcommand:
    """``module.main(argv)`` behind ``anomaly <name>``; ``separator`` joins the words of its options."""

    module: str
    summary: str
    separator: str = "-"  # argparse commands; Lightning's options join words with "_"

    def run(self, argv: list[str]) -> int:
        main = importlib.import_module(self.module).main  # imported on use: `anomaly --help` stays fast
        return main(one_flag_style(argv, self.separator))


SUBCOMMANDS: dict[str, Subcommand] = {
    "fit": Subcommand("anomaly.cli", "fit a detector on one category and fold, then test it", "_"),
    "predict": Subcommand("anomaly.commands.predict", "score new images with a saved detector"),
    "update": Subcommand("anomaly.commands.update", "teach a saved detector new good images (a new file)"),
    "merge": Subcommand("anomaly.commands.merge", "combine detectors fitted on disjoint images"),
    "export": Subcommand("anomaly.export.__main__", "export a saved detector to ONNX or TorchScript"),
    "evaluate": Subcommand("anomaly.evaluation.evaluate", "tables of mean ± SEM from finished runs"),
    "reproduce": Subcommand("anomaly.experiments.cli", "run the grid of one of the paper's tables"),
    "benchmark": Subcommand("anomaly.tools.benchmark", "scale benchmarks (throughput, memory, time)"),
    "min-anomaly-size": Subcommand(
        "anomaly.tools.min_anomaly_size", "a category's minimum anomaly size (autoencoder CCA score)"
    ),
    "configs": Subcommand("anomaly.configs", "list the shipped configs (for --config NAME)"),
}


def one_flag_style(argv: Sequence[str], separator: str) -> list[str]:
    """Option names with ``separator`` between words, so ``--batch_size`` and ``--batch-size`` both work.

    Only option names change (``--a_b=value`` keeps its value); everything after ``--`` is left alone.
    """
    other = "_" if separator == "-" else "-"
    out: list[str] = []
    for at, token in enumerate(argv):
        if token == "--":
            return out + list(argv[at:])
        if token.startswith("--") and len(token) > 2:
            name, equals, value = token[2:].partition("=")
            token = "--" + name.replace(other, separator) + equals + value
        out.append(token)
    return out


def usage() -> str:
    width = max(map(len, SUBCOMMANDS))
    lines = [f"  {name:<{width}}  {sub.summary}" for name, sub in SUBCOMMANDS.items()]
    return "\n".join(
        [
            "usage: anomaly <subcommand> [options]      (anomaly <subcommand> --help: its options)",
            "",
            "Image anomaly detection with Gaussians on pretrained deep features (Rippel et al., ICPR 2020).",
            "",
            "subcommands:",
            *lines,
            "",
            "`anomaly fit` with no options fits and tests the offline demo.",
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(
            f"error: unknown subcommand '{name}': choose one of {', '.join(SUBCOMMANDS)} "
            "(anomaly --help describes them)",
            file=sys.stderr,
        )
        return USER_ERROR_EXIT
    try:
        return SUBCOMMANDS[name].run(rest)
    except BrokenPipeError:
        # The reader of our output closed it (``anomaly configs | head``): stop quietly, as Unix
        # tools do. Python would otherwise also fail flushing stdout at exit, so point it at devnull.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return BROKEN_PIPE_EXIT


def run(command: Callable[[], int] = main) -> NoReturn:
    """A command's process from start to end: :func:`reuse_freed_memory`, ``command()`` (the
    ``anomaly`` command's :func:`main` for the console script and ``python -m anomaly``; a module's
    own ``main`` for its ``python -m``), then :func:`exit_without_teardown`."""
    reuse_freed_memory()
    exit_without_teardown(command())


#: glibc's ``mallopt`` parameters (``malloc.h``).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8
#: Blocks up to this size come from the heap, where freed ones are reused (the largest value glibc
#: documents for 64-bit systems); larger ones are mapped from the kernel and returned when freed.
HEAP_BLOCK_LIMIT = 32 * 2**20
#: Free memory at the top of the heap that is kept for reuse rather than returned to the kernel.
HEAP_KEPT_FREE = 64 * 2**20
#: Heaps ("arenas") that the process's threads share: one. By default each thread that allocates
#: while another does gets a heap of its own, whose freed blocks it keeps: the threads that read a
#: batch's images added 25-35 MiB to the peak of a fit and test of 300 images (docs/benchmarks.md).
ARENAS = 1
#: Environment variables through which glibc's allocator is already set: then it is left alone.
ALLOCATOR_SETTINGS = (
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_ARENA_MAX",
    "GLIBC_TUNABLES",
)


def reuse_freed_memory() -> bool:
    """Have glibc's allocator reuse freed blocks of up to :data:`HEAP_BLOCK_LIMIT` instead of
    mapping fresh pages for each, in one heap for all threads (:data:`ARENAS`); whether it was set
    (not off glibc, nor where the environment sets the allocator: :data:`ALLOCATOR_SETTINGS`).

    By default glibc maps blocks above 128 KiB (a bound that rises to the largest block freed so far)
    from the kernel and returns the heap's free top above twice that bound. A network's activations,
    megabytes each, allocated and freed at every layer of every image, then come back as new pages
    that are faulted in one by one: about a million page faults and 2 s of system time in a fit and
    test of 300 images (docs/benchmarks.md). These are the settings of glibc's
    ``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_`` and ``MALLOC_ARENA_MAX``. They belong to
    the whole process, so the commands set them and the library never does (docs/cli.md).
    """
    if sys.platform != "linux" or any(name in os.environ for name in ALLOCATOR_SETTINGS):
        return False
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION"):
            return False
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError, ValueError):  # another C library
        return False
    settings = (
        (M_MMAP_THRESHOLD, HEAP_BLOCK_LIMIT),
        (M_TRIM_THRESHOLD, HEAP_KEPT_FREE),
        (M_ARENA_MAX, ARENAS),
    )
    return all([bool(mallopt(parameter, value)) for parameter, value in settings])


def join_threads() -> None:
    """What Python's exit does first: threading's own exit callbacks (``concurrent.futures`` shuts its
    thread pools down there), then every other non-daemon thread is joined. Joining a pool's idle
    thread before that callback would wait for ever."""
    shutdown = getattr(threading, "_shutdown", None)  # CPython's own call at exit
    if shutdown is not None:
        shutdown()
        return
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()


def exit_without_teardown(code: int) -> NoReturn:
    """End the process with ``code`` after Python's own exit work, skipping the native libraries'.

    What Python's exit does for the program runs as usual and in its order: the other non-daemon
    threads are joined, the ``atexit`` handlers run (logging's flush, multiprocessing's clean-up of
    worker processes) and the standard streams are flushed. What is skipped is the unloading of the
    C++ libraries (torch's static destructors): it pages their code back in, about 130 MiB of
    resident memory, which then set the peak of a whole ``anomaly fit``, and takes 0.4 s after
    ``import torch`` and over a second after Lightning. Every file a command writes is complete
    and in place before the command returns.
    """
    run_exit_handlers = getattr(atexit, "_run_exitfuncs", None)  # CPython's own call at exit
    if run_exit_handlers is None:  # a Python without it: end as Python ends, teardown included
        sys.exit(code)
    join_threads()
    run_exit_handlers()  # before the interpreter is finalised, as at Python's exit
    for stream in (sys.stdout, sys.stderr):
        if stream is None:  # no console (pythonw)
            continue
        try:
            stream.flush()
        except BrokenPipeError:  # the reader went away: as main() answers that
            os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())
            code = code or BROKEN_PIPE_EXIT
        except (OSError, ValueError):  # a closed or unusable stream: nothing more can reach it
            pass
    os._exit(code)
