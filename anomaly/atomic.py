"""Writing a file so that readers see the old one or the complete new one, never a part.

Every file the package writes whole (results, detectors, cache entries, exports, maps, the
logs of the processes it runs) goes through :func:`replaced_atomically` or
:func:`write_bytes_atomic`: a temporary file in the same folder, flushed to disk (``fsync``),
then renamed over the target. On any failure, Ctrl-C and SIGTERM included, the temporary file
is removed and the target is left as it was. An error of the file system (disk full, read-only
folder, a folder in the way) names the target, not the temporary file. A folder of many files
(a generated dataset) is filled under a temporary name and renamed into place whole
(:func:`built_whole`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


#: What ``open`` would give a new file: temporary files are private (0600) until renamed.
FILE_MODE = 0o666 & ~_umask()


def naming(error: OSError, path: Path) -> OSError:
    """``error`` as an :class:`OSError` naming ``path`` (a full disk's error names no file)."""
    if error.filename is not None and Path(error.filename).name.startswith(f".{path.name}."):
        error = OSError(error.errno, error.strerror)  # the temporary file: name the target instead
    if error.filename is None and error.errno is not None:
        return OSError(error.errno, error.strerror or os.strerror(error.errno), str(path))
    return error


def fsync_file(path: Path) -> None:
    """Flush ``path``'s data to the disk, so that a rename after a crash never shows an empty file."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


@contextmanager
def replaced_atomically(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path``: write it, and on success it replaces ``path``.

    The new file gets the usual permissions (``0666`` less the umask), so results,
    detectors and cache entries stay readable by whoever could read the old ones. On
    failure the temporary file is removed and ``path`` is left as it was; an
    :class:`OSError` is raised again naming ``path``.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        os.close(handle)
    except OSError as error:
        _raise_naming(error, path)
    try:
        yield Path(tmp)
        os.chmod(tmp, FILE_MODE)
        fsync_file(Path(tmp))
        os.replace(tmp, path)
    except BaseException as error:
        with contextlib.suppress(OSError):
            Path(tmp).unlink(missing_ok=True)
        if isinstance(error, OSError):
            _raise_naming(error, path)
        raise


def _raise_naming(error: OSError, path: Path) -> None:
    named = naming(error, path)
    if named is error:
        raise error
    raise named from error


@contextmanager
def open_atomically(path: str | Path, newline: str | None = None) -> Iterator[TextIO]:
    """A text file to write (a log, a table) that becomes ``path`` whole when closed without error.

    Until then it is a hidden temporary file beside ``path`` (see :func:`replaced_atomically`).
    """
    with replaced_atomically(path) as tmp, open(tmp, "w", newline=newline) as file:
        yield file


@contextmanager
def built_whole(folder: str | Path) -> Iterator[Path]:
    """A new temporary folder beside ``folder``: fill it, and on success it becomes ``folder``.

    ``folder`` must then be absent or an empty folder (else an :class:`OSError` naming it). On
    failure the temporary folder and everything in it are removed and ``folder`` is left as it was.
    """
    folder = Path(folder)
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    except OSError as error:
        _raise_naming(error, folder)
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        os.replace(tmp, folder)
    except BaseException as error:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(error, OSError):
            inside = error.filename is not None and Path(error.filename).is_relative_to(tmp)
            if inside:  # a file of the folder: named where it was to be
                name = folder / Path(error.filename).relative_to(tmp)
                raise OSError(error.errno, error.strerror, str(name)) from error
            _raise_naming(error, folder)
        raise


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` whole (see the module docstring); returns ``path``."""
    path = Path(path)
    with replaced_atomically(path) as tmp:
        tmp.write_bytes(data)
    return path
