"""One run at a time in a run folder, and never a run of other data on top of another's results.

A training run writes into ``<root>/<method>/<name>/<category>/fold_<k>/``. While it
runs it holds an exclusive lock on ``.lock`` in that folder (``flock``, so the
system releases it when the process dies: a lock left by a killed run is simply
taken over). A second run into the same folder is refused with one line instead of
mixing its files with the first's. A folder whose ``results.json`` comes from
another data root (another dataset with the same category name) is refused too,
before anything in it is removed.

An earlier run's outputs in the folder stay until the new run succeeds
(:func:`replacing_outputs`): moved aside into ``.previous`` while it runs, removed
when it succeeds, put back when it fails or is interrupted.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from anomaly.errors import UserError
from anomaly.evaluation.results import RESULTS_FILE, read_results

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; runs are not guarded
    fcntl = None

LOCK_FILE = ".lock"
#: Where an earlier run's outputs wait while a new run replaces them.
PREVIOUS_RUN = ".previous"


def name_limit(path: Path) -> int:
    """The longest file name (bytes) the file system under ``path`` allows (usually 255)."""
    existing = next((p for p in (path, *path.parents) if os.path.isdir(p)), Path("."))
    try:
        return os.pathconf(existing, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def check_folder_names(folder: Path, what: str) -> None:
    """:class:`UserError` when a component of ``folder`` is longer than the file system allows."""
    limit = name_limit(folder)
    for part in folder.parts:
        if len(os.fsencode(part)) > limit:
            raise UserError(
                f"the run folder name '{part[:40]}...' is {len(os.fsencode(part))} bytes, over the file "
                f"system's limit of {limit}: shorten {what}"
            )


def check_same_dataset(run_dir: Path, dataset: str | None) -> None:
    """Refuse to replace the results of another data root that share this run folder."""
    path = run_dir / RESULTS_FILE
    if dataset is None or not path.is_file():
        return
    try:
        recorded = read_results(path).get("dataset")
    except (OSError, ValueError, AttributeError):
        return  # unreadable results are replaced like any stale file
    if recorded and recorded != dataset:
        raise UserError(
            f"run folder {run_dir} holds the results of data root {recorded}, not {dataset}: give this "
            "run its own --trainer.default_root_dir (or move the earlier results away)"
        )


class RunLock:
    """An exclusive ``flock`` on ``<run_dir>/.lock``; :meth:`release` unlocks and removes the file."""

    def __init__(self, path: Path, descriptor: int) -> None:
        self.path, self.descriptor = path, descriptor

    @classmethod
    def acquire(cls, run_dir: Path) -> RunLock:
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / LOCK_FILE
        while True:
            descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            if fcntl is None:
                return cls(path, descriptor)
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.read(descriptor, 32).decode(errors="replace").strip() or "unknown"
                os.close(descriptor)
                raise UserError(
                    f"run folder {run_dir} is in use by another run (process {holder}): wait for it to "
                    "finish, or give this run another --trainer.default_root_dir"
                ) from None
            if cls._still_linked(path, descriptor):  # not removed by its last holder meanwhile
                os.ftruncate(descriptor, 0)
                os.write(descriptor, f"{os.getpid()}\n".encode())
                return cls(path, descriptor)
            os.close(descriptor)

    @staticmethod
    def _still_linked(path: Path, descriptor: int) -> bool:
        try:
            return os.stat(path).st_ino == os.fstat(descriptor).st_ino
        except FileNotFoundError:
            return False

    def release(self) -> None:
        self.path.unlink(missing_ok=True)  # before unlocking: a waiting run then locks a new file
        os.close(self.descriptor)


def remove_empty_folders(folder: Path, root: Path) -> None:
    """``folder`` and its parents below ``root`` (not ``root`` itself), as far as they are empty."""
    while folder != root and root in folder.parents:
        with contextlib.suppress(OSError):
            folder.rmdir()  # only an empty folder
        folder = folder.parent


@contextlib.contextmanager
def hold_run_folder(run_dir: Path, root: Path, dataset: str | None, enabled: bool = True) -> Iterator[None]:
    """Check and lock ``run_dir`` for one run; on failure, folders the run left empty go too.

    ``enabled`` is false on every process but the first of a distributed run.
    """
    if not enabled:
        yield
        return
    check_folder_names(run_dir, "--data.category, --trainer.default_root_dir or the model's options")
    missing = [folder for folder in (run_dir, *run_dir.parents) if not folder.exists()]
    keep = missing[-1].parent if missing else root  # a failed run removes the folders it created
    lock = RunLock.acquire(run_dir)
    try:
        check_same_dataset(run_dir, dataset)
        yield
    except BaseException:
        lock.release()
        remove_empty_folders(run_dir, keep)
        raise
    lock.release()


def remove_paths(paths: list[Path]) -> None:
    for path in paths:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _move_back(stash: Path, run_dir: Path, outputs: Callable[[Path], list[Path]]) -> None:
    """This run's outputs go; the earlier run's come back from ``stash``."""
    remove_paths(outputs(run_dir))
    for path in sorted(stash.iterdir()):
        os.replace(path, run_dir / path.name)
    stash.rmdir()


@contextlib.contextmanager
def replacing_outputs(run_dir: Path, outputs: Callable[[Path], list[Path]]) -> Iterator[None]:
    """An earlier run's ``outputs(run_dir)`` are kept aside in ``.previous`` while inside: removed when
    the block succeeds, put back (and this run's outputs removed) when it fails or is interrupted.

    A ``.previous`` left by a run that was killed holds the last complete run: it comes back first.
    Call it holding the folder's lock (:func:`hold_run_folder`).
    """
    stash = run_dir / PREVIOUS_RUN
    if stash.is_dir():
        _move_back(stash, run_dir, outputs)
    earlier = outputs(run_dir)
    if earlier:
        stash.mkdir()
        for path in earlier:
            os.replace(path, stash / path.name)
    try:
        yield
    except BaseException:
        if stash.is_dir():
            _move_back(stash, run_dir, outputs)
        else:
            remove_paths(outputs(run_dir))
        raise
    shutil.rmtree(stash, ignore_errors=True)
