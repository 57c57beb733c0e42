"""One cache entry on disk: the pooled features of every level of one image.

Layout: ``SHA-256(rest) | u32 header length | JSON header | float32 payload``.
The header names the image key, the extractor identity key and each level's
width; the digest covers header and payload. :func:`read_entry` returns
``None`` for a missing, truncated, corrupted or mismatched entry, so that the
caller recomputes it; nothing unverified is ever returned.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

DIGEST_BYTES = 32


def write_entry(path: Path, image_key: str, identity_key: str, features: list[Tensor]) -> None:
    """Write the per-level features (1-D float32 tensors, levels 1..L) atomically."""
    arrays = [f.detach().cpu().to(torch.float32).contiguous().numpy() for f in features]
    header = json.dumps(
        {"image": image_key, "identity": identity_key, "dims": [int(a.size) for a in arrays]}
    ).encode()
    body = struct.pack("<I", len(header)) + header + b"".join(a.tobytes() for a in arrays)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(hashlib.sha256(body).digest() + body)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_entry(path: Path, image_key: str, identity_key: str, dims: list[int]) -> list[Tensor] | None:
    """The entry's per-level features, or ``None`` unless it is intact and is the one asked for."""
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
    if header != {"image": image_key, "identity": identity_key, "dims": list(dims)}:
        return None
    payload = np.frombuffer(body, dtype=np.float32, offset=4 + header_len)
    if payload.size != sum(dims):
        return None
    return [torch.from_numpy(part.copy()) for part in np.split(payload, np.cumsum(dims)[:-1])]
