"""What a command may write: never an input, the detector, or a file it did not write itself.

Every command that writes files a user names (``predict --out`` and ``--maps``,
``export --out``, ...) claims them here before it reads a single image:

* :func:`claim_output` for one file. Refused, with one line naming the file: an
  empty name; a folder; a path below a file; the same file as one of the command's
  inputs (the images, the detector and its ``.json``, the weights; also through a
  symbolic or hard link), whatever ``--overwrite`` says; and an existing file that
  is not of the kind the command writes (``ours``), unless ``overwrite``. A file
  the command wrote before (a rerun) is replaced, as users of ``--out`` expect.
* :class:`OutputFolder` for a folder of many files named by the command (``--maps``).
  The folder must be new, empty (hidden files aside), or one the command wrote before: it keeps the
  list of the files it wrote in :data:`MANIFEST`, and only those are replaced.
  Its files are never taken as input of the command.
* :func:`claim_json` and :func:`write_json` for a JSON document (a benchmark's ``--out``): its
  first key, :data:`WRITTEN_BY`, names the command, which is how a rerun recognises it.
* The tables of ``anomaly evaluate --out`` and ``anomaly reproduce --out``
  (:func:`anomaly.evaluation.tables.claim_table_file`): their first line is a comment in the
  format's syntax naming the command, ``<!-- written by anomaly evaluate -->`` (md),
  ``# written by anomaly evaluate`` (csv, whose tables already carry ``# title`` lines) or
  ``% written by anomaly evaluate`` (latex); a rerun replaces a table of the command in any format.
  No fixed header row could do for CSV: the columns follow the runs.
* :func:`claim_new_folder` for a folder the command fills whole (a generated dataset): it must
  be new or empty, and is written through :func:`anomaly.atomic.built_whole`.

Files are then written whole through :mod:`anomaly.atomic`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path

from anomaly.atomic import write_bytes_atomic
from anomaly.errors import UserError

#: The list of files an :class:`OutputFolder` holds that its command wrote (hidden: never an input).
MANIFEST = ".written-by-anomaly.json"
#: The first key of a JSON document written by :func:`write_json`: the command that wrote it.
WRITTEN_BY = "written_by"
OVERWRITE_HINT = "give another name, or --overwrite to replace it"


def _identity(path: str | Path) -> tuple[int, int] | None:
    try:
        info = os.stat(path)
    except (OSError, ValueError):
        return None
    return info.st_dev, info.st_ino


def find_input(path: str | Path, inputs: Iterable[str | Path]) -> Path | None:
    """The first of ``inputs`` that is the same file as ``path`` (links followed), or ``None``."""
    target = _identity(path)
    if target is None:
        return None
    return next((Path(p) for p in inputs if _identity(p) == target), None)


def check_writable_path(path: Path, option: str) -> None:
    """:class:`UserError` when ``path`` is a folder, or lies below a file."""
    if path.is_dir():
        raise UserError(f"{option} {path} is a folder: give a file name")
    check_parent_folders(path, option)


def check_parent_folders(path: Path, option: str) -> None:
    """:class:`UserError` when one of the folders above ``path`` is a file."""
    blocking = next((folder for folder in path.parents if folder.exists() and not folder.is_dir()), None)
    if blocking is not None:
        raise UserError(f"{option} {path}: {blocking} is a file, not a folder: give a path in a folder")


def claim_output(
    path: str | Path,
    *,
    inputs: Iterable[str | Path] = (),
    ours: Callable[[Path], bool] | None = None,
    overwrite: bool = False,
    option: str = "--out",
    command: str = "this command",
) -> Path:
    """Check that ``command`` may write the file ``path``, and return it (``~`` expanded).

    :class:`UserError` (one line naming the file) when ``path`` is empty, a folder or
    below a file; when it is the same file as one of ``inputs`` (never allowed); and
    when it exists but ``ours(path)`` says it is not a file of the kind ``command``
    writes, unless ``overwrite``. Nothing is written here.
    """
    if not str(path).strip():
        raise UserError(f"{option} is empty: give a file name")
    path = Path(path).expanduser()
    check_writable_path(path, option)
    if not os.path.lexists(path):
        return path
    same = find_input(path, inputs)
    if same is not None:
        what = f"the same file as the input {same}" if same != path else f"an input of {command}"
        raise UserError(
            f"{option} {path} is {what}: {command} never writes over its input; give another name"
        )
    if not overwrite and (ours is None or not ours(path)):
        raise UserError(f"{option} {path} already exists and was not written by {command}: {OVERWRITE_HINT}")
    return path


def starts_with(prefix: bytes) -> Callable[[Path], bool]:
    """A recogniser for :func:`claim_output`: files whose first bytes are ``prefix``."""

    def recognise(path: Path) -> bool:
        try:
            with open(path, "rb") as file:
                return file.read(len(prefix)) == prefix
        except OSError:
            return False

    return recognise


def json_start(command: str) -> bytes:
    """The first bytes of every JSON document :func:`write_json` writes for ``command``."""
    return ("{\n  " + json.dumps(WRITTEN_BY) + ": " + json.dumps(command) + ",\n").encode()


def claim_json(
    path: str | Path,
    *,
    command: str,
    inputs: Iterable[str | Path] = (),
    overwrite: bool = False,
    option: str = "--out",
) -> Path:
    """:func:`claim_output` for a JSON document of ``command``: one it wrote before (:func:`write_json`)
    is replaced."""
    ours = starts_with(json_start(command))
    return claim_output(path, inputs=inputs, ours=ours, overwrite=overwrite, option=option, command=command)


def write_json(path: str | Path, document: dict, *, command: str) -> Path:
    """``document`` as indented JSON, written whole, its first key :data:`WRITTEN_BY` naming ``command``."""
    text = json.dumps({WRITTEN_BY: command, **document}, indent=2) + "\n"
    return write_bytes_atomic(path, text.encode())


def claim_new_folder(folder: str | Path, *, option: str, command: str) -> Path:
    """``folder`` (``~`` expanded) when ``command`` may fill it whole: new or empty, not a file."""
    if not str(folder).strip():
        raise UserError(f"{option} is empty: give a folder name")
    folder = Path(folder).expanduser()
    if os.path.lexists(folder) and not folder.is_dir():
        raise UserError(f"{option} {folder} is a file, not a folder: give a new folder")
    check_parent_folders(folder, option)
    if folder.is_dir() and any(folder.iterdir()):
        raise UserError(
            f"{option} {folder} already exists and is not empty: {command} fills only a new or empty "
            "folder; give another name, or remove it"
        )
    return folder


class OutputFolder:
    """A folder of files named by a command (see the module docstring): claim them all, then write.

    ``OutputFolder(folder, option="--maps", command="anomaly predict --maps")`` refuses a folder
    that holds files the command did not write; ``.claim(names, inputs)`` then refuses (before
    anything is written) any name that is an input or an existing file of another origin, and
    records the names in :data:`MANIFEST`, so that a rerun may replace them.
    """

    def __init__(self, folder: str | Path, *, option: str, command: str) -> None:
        if not str(folder).strip():
            raise UserError(f"{option} is empty: give a folder name")
        self.folder = Path(folder).expanduser()
        self.option, self.command = option, command
        if self.folder.exists() and not self.folder.is_dir():
            raise UserError(f"{option} {self.folder} is a file, not a folder: give a folder name")
        check_writable_path(self.folder / MANIFEST, option)
        self.before = self.written_before()
        if not self.before and self.folder.is_dir():
            other = next((p for p in sorted(self.folder.iterdir()) if not p.name.startswith(".")), None)
            if other is not None:
                raise UserError(
                    f"{option} {self.folder} holds files that {command} did not write (e.g. "
                    f"{other.name}): give a new or empty folder"
                )

    @property
    def manifest(self) -> Path:
        return self.folder / MANIFEST

    def written_before(self) -> set[str]:
        """The names this command wrote into the folder before (empty for a new folder)."""
        try:
            recorded = json.loads(self.manifest.read_text())
            return {str(name) for name in recorded["files"]}
        except FileNotFoundError:
            return set()
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise UserError(f"{self.manifest} is unreadable ({error}): give a new or empty folder") from None

    def claim(self, names: Iterable[str], inputs: Iterable[str | Path] = ()) -> list[Path]:
        """The paths of ``names`` in the folder, checked and recorded (the folder created)."""
        names = list(names)
        if len(set(names)) != len(names):
            raise ValueError("an output folder's file names must be distinct")
        before = self.before
        inputs = list(inputs)
        paths = [self.folder / name for name in names]
        for name, path in zip(names, paths, strict=True):
            if os.path.lexists(path):
                same = find_input(path, inputs)
                if same is not None:
                    raise UserError(f"{self.option}: {path} would be written over the input {same}")
                if name not in before:
                    raise UserError(
                        f"{self.option}: {path} already exists and was not written by {self.command}: "
                        "give a new or empty folder"
                    )
        record = {"written_by": self.command, "files": sorted(before | set(names))}
        write_bytes_atomic(self.manifest, (json.dumps(record, indent=1) + "\n").encode())
        return paths


__all__ = [
    "MANIFEST",
    "WRITTEN_BY",
    "OutputFolder",
    "claim_json",
    "claim_new_folder",
    "claim_output",
    "find_input",
    "starts_with",
    "write_json",
]
