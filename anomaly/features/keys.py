"""What a cached feature vector depends on, as hashes.

An entry is addressed by the image's *content* (SHA-256 of the file's bytes: a
changed file gets a new key, a renamed or copied one keeps it) inside a folder
named after the *extractor identity*: backbone, a fingerprint of the weights
actually loaded, input resolution, resize and fit rules (a
:class:`~anomaly.data.transforms.Geometry`), normalisation, pooling, and the
device type and precision the features are computed with.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from anomaly.backbones.extractor import FeatureExtractor
from anomaly.data.images import DECODING
from anomaly.data.store import identity_key
from anomaly.data.transforms import DEFAULT_RESIZE, Geometry, ResizeRule, resize_rule

__all__ = ["extractor_identity", "file_digest", "identity_key", "weights_fingerprint"]

#: Bumped whenever the entry layout or the meaning of a feature changes.
FORMAT_VERSION = 2
POOLING = "global-average"


# (path, inode, size, mtime in ns) -> digest: an unchanged file is hashed once per process
_DIGESTS: dict[tuple[str, int, int, int], str] = {}


def file_digest(path: str | Path, chunk: int = 1 << 20) -> str:
    """SHA-256 (hex) of a file's bytes (remembered for the process while the file is unchanged)."""
    stat = os.stat(path)
    memo = (str(path), stat.st_ino, stat.st_size, stat.st_mtime_ns)
    if memo not in _DIGESTS:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            while block := handle.read(chunk):
                digest.update(block)
        _DIGESTS[memo] = digest.hexdigest()
    return _DIGESTS[memo]


def weights_fingerprint(extractor: FeatureExtractor) -> str:
    """SHA-256 over the names, shapes, dtypes and values of every parameter and buffer."""
    digest = hashlib.sha256()
    for name, tensor in sorted(extractor.state_dict().items()):
        value = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{tuple(value.shape)}:{value.dtype}".encode())
        digest.update(value.view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return digest.hexdigest()


def extractor_identity(
    extractor: FeatureExtractor,
    image_size: int,
    compute: str,
    resize: str | ResizeRule | Geometry = DEFAULT_RESIZE,
) -> dict:
    """Everything a pooled feature depends on besides the image (JSON-serialisable)."""
    spec = extractor.spec
    return {
        "format": FORMAT_VERSION,
        "decoding": DECODING,
        "backbone": spec.name,
        "weights": weights_fingerprint(extractor),
        "image_size": int(image_size),
        "resize": resize_rule(resize).description,
        "mean": list(spec.mean),
        "std": list(spec.std),
        "pooling": POOLING,
        "level_dims": list(spec.level_dims),
        "compute": compute,
    }
