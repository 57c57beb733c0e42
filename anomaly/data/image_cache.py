"""The opt-in on-disk cache of decoded, resized images (``--data.image_cache DIR``).

Decoding a large PNG and shrinking it to the backbone's resolution costs a
sizeable fraction of a forward pass on a CPU. Every later epoch (augmentation
is applied after the resize) and every later run at the same resolution reads
the small uint8 array instead: the loader workers then leave the cores to the
forward pass.

``<root>/<identity key>/identity.json`` records the resolution and the decoding
and resize rules (``--data.resize``); ``<root>/<identity key>/<ab>/<key>.img`` holds one image as a
verified entry (:mod:`anomaly.data.store`). An image's key is the SHA-256 of its
absolute path, inode, size, and modification and change times, so a changed or
replaced file gets a new entry without its bytes being read to check. A missing,
truncated, corrupted or mismatched entry is decoded again and rewritten, never used.
A read-only or full cache folder costs speed, not the run: its entries are used, one
warning says so, and images it lacks are decoded every time.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from anomaly.data.images import DECODING, load_rgb
from anomaly.data.store import EntryFolder
from anomaly.data.transforms import DEFAULT_RESIZE, Geometry, ResizeRule, geometry
from anomaly.errors import UserError

#: Bumped whenever decoding (:func:`~anomaly.data.images.load_rgb`), resizing or the layout changes.
FORMAT_VERSION = 2


def file_key(path: str | Path) -> str:
    """SHA-256 (hex) of a file's absolute path, inode, size, and modification and change times (ns).

    Rewriting or replacing the file changes its change time (which, unlike the
    modification time, no copy tool can set back), so its key changes too.
    """
    resolved = Path(path).resolve()
    stat = resolved.stat()
    text = json.dumps([str(resolved), stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns])
    return hashlib.sha256(text.encode()).hexdigest()


class ResizedImageCache:
    """``(size, size, 3)`` uint8 images (the :class:`Geometry`'s canvas), decoded and resized once,
    read back verified.

    Safe to share between loader worker processes and runs: entries are written
    atomically and checked on every read. Instances are cheap and picklable.
    """

    SUFFIX = ".img"

    def __init__(
        self, root: str | Path, image_size: int, resize: str | ResizeRule | Geometry = DEFAULT_RESIZE
    ) -> None:
        self.root = Path(root).expanduser()
        self.image_size = int(image_size)
        self.resize = geometry(resize)
        self.shape = (*self.resize.canvas(self.image_size), 3)
        identity = {
            "format": FORMAT_VERSION,
            "image_size": self.image_size,
            "decoding": DECODING,
            "resize": self.resize.description,
        }
        self.entries = EntryFolder(self.root, identity, self.SUFFIX, "image cache")

    def load(self, path: str | Path) -> np.ndarray:
        """The image at ``path`` on its canvas (``(size, size, 3)`` by default): from the cache, else
        decoded and stored."""
        try:
            key = file_key(path)
        except OSError as error:
            raise UserError(f"cannot read image {path}: {error}") from error
        arrays = self.entries.read(key, np.uint8, [self.shape])
        if arrays is not None:
            return arrays[0]
        image = self.resize(load_rgb(path), self.image_size)
        self.entries.write(key, [image])  # a full or read-only disk costs speed, not the run
        return image
