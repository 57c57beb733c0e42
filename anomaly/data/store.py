"""Verified cache entries on disk: a few numpy arrays that belong to one image.

Shared by the resized-image cache (:mod:`anomaly.data.image_cache`, one uint8
array) and the feature cache (:mod:`anomaly.features`, one float32 vector per
level).

Layout: ``SHA-256(rest) | u32 header length | JSON header | payload``. The
header names the image key, the identity key of what produced the arrays, their
dtype and shapes; the digest covers header and payload. :func:`read_entry`
returns ``None`` for a missing, truncated, corrupted or mismatched entry, so
that the caller recomputes it; nothing unverified is ever returned.
:class:`EntryFolder` keeps the entries of one identity together:
``<root>/<identity key>/identity.json`` and ``<root>/<identity key>/<ab>/<image key><suffix>``.
"""

from __future__ import annotations

import errno
import hashlib
import json
import struct
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from anomaly.atomic import replaced_atomically, write_bytes_atomic
from anomaly.errors import UserError

DIGEST_BYTES = 32


def write_entry(path: Path, image_key: str, identity_key: str, arrays: Sequence[np.ndarray]) -> None:
    """Write ``arrays`` (one dtype) atomically: a reader sees the old entry, the new one or none."""
    arrays = [np.ascontiguousarray(a) for a in arrays]
    if len({a.dtype for a in arrays}) != 1:
        raise ValueError("the arrays of one entry must share a dtype")
    header = json.dumps(
        {
            "image": image_key,
            "identity": identity_key,
            "dtype": arrays[0].dtype.str,
            "shapes": [list(a.shape) for a in arrays],
        }
    ).encode()
    body = struct.pack("<I", len(header)) + header + b"".join(a.tobytes() for a in arrays)
    with replaced_atomically(path) as tmp:
        tmp.write_bytes(hashlib.sha256(body).digest() + body)


def read_entry(
    path: Path, image_key: str, identity_key: str, dtype: np.dtype | str, shapes: Sequence[Sequence[int]]
) -> list[np.ndarray] | None:
    """The entry's arrays, or ``None`` unless it is intact and is exactly the one asked for."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    body = data[DIGEST_BYTES:]
    if len(data) < DIGEST_BYTES + 4 or hashlib.sha256(body).digest() != data[:DIGEST_BYTES]:
        return None
    (header_len,) = struct.unpack("<I", body[:4])
    try:
        header = json.loads(body[4 : 4 + header_len])
    except (ValueError, UnicodeDecodeError):
        return None
    dtype = np.dtype(dtype)
    expected = {
        "image": image_key,
        "identity": identity_key,
        "dtype": dtype.str,
        "shapes": [list(s) for s in shapes],
    }
    if header != expected:
        return None
    sizes = [int(np.prod(s)) for s in shapes]
    payload = np.frombuffer(body, dtype=dtype, offset=4 + header_len)
    if payload.size != sum(sizes):
        return None
    parts = np.split(payload, np.cumsum(sizes)[:-1])
    return [part.reshape(shape).copy() for part, shape in zip(parts, shapes, strict=True)]


def identity_key(identity: dict) -> str:
    """A short stable name for an identity (first 24 hex digits of its SHA-256)."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24]


class EntryFolder:
    """The entries made under one identity (what the arrays depend on besides the image).

    Args:
        root: the cache folder (created if needed).
        identity: JSON-serialisable description, written to ``identity.json``.
        suffix: file suffix of the entries, e.g. ``".feat"``.
        what: the cache's name in the error message, e.g. ``"feature cache"``.
    """

    def __init__(self, root: str | Path, identity: dict, suffix: str, what: str) -> None:
        self.root = Path(root).expanduser()
        self.identity = identity
        self.key = identity_key(identity)
        self.path = self.root / self.key
        self.suffix = suffix
        self.what = what
        self.writable = True
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            identity_file = self.path / "identity.json"
            if not identity_file.is_file():
                text = json.dumps(identity, indent=2, sort_keys=True) + "\n"
                write_bytes_atomic(identity_file, text.encode())
        except OSError as error:
            if error.errno in (errno.ENOTDIR, errno.EEXIST):  # a file where the folder should be
                raise UserError(f"cannot use {what} folder '{self.root}': {error}") from error
            self.stop_writing(error)

    def entry_path(self, image_key: str) -> Path:
        return self.path / image_key[:2] / f"{image_key}{self.suffix}"

    def read(
        self, image_key: str, dtype: np.dtype | str, shapes: Sequence[Sequence[int]]
    ) -> list[np.ndarray] | None:
        """The verified arrays of ``image_key``, or ``None`` (see :func:`read_entry`)."""
        return read_entry(self.entry_path(image_key), image_key, self.key, dtype, shapes)

    def write(self, image_key: str, arrays: Sequence[np.ndarray]) -> None:
        """Store the entry; a read-only or full disk costs speed, not the run (one warning)."""
        if not self.writable:
            return
        try:
            write_entry(self.entry_path(image_key), image_key, self.key, arrays)
        except OSError as error:
            self.stop_writing(error)

    def stop_writing(self, error: OSError) -> None:
        """Use the entries already there, store no more: warn once."""
        self.writable = False
        reason = error.strerror or str(error)
        warnings.warn(
            f"{self.what} '{self.root}' cannot be written ({reason}): entries already there are used, "
            "new ones are computed on every run but not stored (slower)",
            stacklevel=3,
        )
