"""Writing a file so that readers see the old one or the complete new one, never a part.

Every file the package writes whole (results, detectors, cache entries, exports, maps)
goes through :func:`replaced_atomically` or :func:`write_bytes_atomic`: a temporary file
in the same folder, flushed to disk (``fsync``), then renamed over the target. On any
failure, Ctrl-C and SIGTERM included, the temporary file is removed and the target is
left as it was. An error of the file system (disk full, read-only folder, a folder in
the way) names the target, not the temporary file.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


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


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` whole (see the module docstring); returns ``path``."""
    path = Path(path)
    with replaced_atomically(path) as tmp:
        tmp.write_bytes(data)
    return path
