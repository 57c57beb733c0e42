"""The opt-in on-disk cache of pooled, un-augmented per-level features.

Extraction dominates the cost of the Gaussian method, while the fit itself
needs only the pooled vectors. With a cache, one extraction pass over a
category's training folder and test set serves every fold, score type and
reduction: each later run reads vectors instead of decoding images.

``<root>/<identity key>/identity.json`` records what the features depend on
(:mod:`anomaly.features.keys`); ``<root>/<identity key>/<ab>/<sha256>.feat``
holds one image's features for all levels (:mod:`anomaly.data.store`).
Entries are verified on every read; a missing, stale or corrupted entry is
recomputed and rewritten, never used.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import DataLoader

from anomaly.backbones.extractor import FeatureExtractor
from anomaly.console import ignore_interrupts
from anomaly.data.datasets import ImageDataset, Sample
from anomaly.data.image_cache import ResizedImageCache
from anomaly.data.samplers import process_rank_and_world
from anomaly.data.store import EntryFolder
from anomaly.data.transforms import DEFAULT_RESIZE, Geometry, ImagePipeline, ResizeRule, geometry
from anomaly.errors import UserError
from anomaly.features.dataset import FeatureDataset
from anomaly.features.keys import extractor_identity, file_digest


@dataclass
class CacheStats:
    """Entries served from disk, extracted because absent, and extracted because rejected."""

    hits: int = 0
    misses: int = 0
    rejected: int = 0


class FeatureCache:
    """Pooled features of every level of ``extractor`` for image files, cached under ``root``.

    Args:
        root: the cache folder (created if needed).
        extractor: the frozen backbone; its device at extraction time is used.
        image_size: the square input resolution.
        compute: device type and precision of the extraction (part of the identity),
            e.g. ``"cpu/32-true"`` or ``"cuda/bf16-mixed"``.
        forward_context: the autocast context the features are computed in (the
            trainer's precision context, so that cached and uncached features agree).
        resize: the resize rule (a name of :data:`~anomaly.data.transforms.RESIZE_RULES`) or a whole
            :class:`~anomaly.data.transforms.Geometry` with its fit rule (part of the identity; tiles
            are refused).
    """

    SUFFIX = ".feat"

    def __init__(
        self,
        root: str | Path,
        extractor: FeatureExtractor,
        image_size: int,
        compute: str = "cpu/32-true",
        forward_context: Callable[[], AbstractContextManager] = nullcontext,
        resize: str | ResizeRule | Geometry = DEFAULT_RESIZE,
    ) -> None:
        self.root = Path(root).expanduser()
        self.extractor = extractor
        self.image_size = image_size
        self.forward_context = forward_context
        self.resize = geometry(resize)
        if self.resize.tiles.count > 1:
            raise UserError(
                f"the feature cache holds one feature vector per image, not per tile: drop "
                f"--data.feature_cache to fit with tiles {self.resize.tiles}"
            )
        self.identity = extractor_identity(extractor, image_size, compute, self.resize)
        self.entries = EntryFolder(self.root, self.identity, self.SUFFIX, "feature cache")
        self.dims = list(extractor.level_dims)
        self.stats = CacheStats()
        self._rows: dict[str, list[Tensor]] = {}  # image key -> features per level
        self._image_keys: dict[str, str] = {}  # path -> image key

    @property
    def folder(self) -> Path:
        return self.entries.path

    @property
    def key(self) -> str:
        return self.entries.key

    def entry_path(self, image_key: str) -> Path:
        return self.entries.entry_path(image_key)

    # ------------------------------------------------------------------ load
    def load(
        self,
        paths: list[str],
        batch_size: int = 32,
        num_workers: int = 0,
        image_cache: ResizedImageCache | None = None,
    ) -> None:
        """Make the features of ``paths`` available, extracting what is absent in one pass.

        Images are read through ``image_cache`` when given. Under DDP each process
        extracts its share of the absent entries, then reads the others' (or,
        without a shared folder, extracts them too).
        """
        keys = {path: file_digest(path) for path in paths}
        self._image_keys.update(keys)
        wanted = {key: path for path, key in keys.items() if key not in self._rows}
        absent = self._read(wanted)
        rank, world = process_rank_and_world()
        if not absent and world == 1:
            return
        items = list(absent.items())  # the same list on every process when the folder is shared
        self._extract(dict(items[rank::world]), batch_size, num_workers, image_cache)
        if world > 1:
            dist.barrier()
            others = {key: path for key, path in items if key not in self._rows}
            self._extract(self._read(others, count=False), batch_size, num_workers, image_cache)

    def _read(self, wanted: dict[str, str], count: bool = True) -> dict[str, str]:
        """Read the verified entries of ``wanted`` (image key -> path); return those absent."""
        absent = {}
        for key, path in wanted.items():
            arrays = self.entries.read(key, np.float32, [(d,) for d in self.dims])
            features = None if arrays is None else [torch.from_numpy(a) for a in arrays]
            if features is not None:
                self._rows[key] = features
            else:
                absent[key] = path
            if count and features is not None:
                self.stats.hits += 1
            elif count and self.entry_path(key).exists():
                self.stats.rejected += 1
            elif count:
                self.stats.misses += 1
        return absent

    @torch.no_grad()
    def _extract(
        self, todo: dict[str, str], batch_size: int, num_workers: int, image_cache: ResizedImageCache | None
    ) -> None:
        """One extraction pass (un-augmented pipeline) over ``todo``; writes and keeps every entry."""
        if not todo:
            return
        keys = list(todo)
        samples = [Sample(todo[k], 0) for k in keys]
        dataset = ImageDataset(
            samples, ImagePipeline(self.image_size, resize=self.resize), image_cache=image_cache
        )
        device = self.extractor.mean.device
        loader = DataLoader(
            dataset,
            batch_size=batch_size,
            num_workers=num_workers,
            pin_memory=device.type == "cuda",
            worker_init_fn=ignore_interrupts,
        )
        for batch in loader:
            with self.forward_context():
                features = self.extractor(batch["image"].to(device, non_blocking=True))
            features = [f.float().cpu() for f in features]
            for row, index in enumerate(batch["index"].tolist()):
                key = keys[index]
                self._rows[key] = [f[row].clone() for f in features]
                self.entries.write(key, [f.numpy() for f in self._rows[key]])

    # ------------------------------------------------------------------- use
    def features(self, samples: list[Sample]) -> list[Tensor]:
        """``(N, C_l)`` per level (1..L) for ``samples``, which must have been loaded."""
        rows = [self._rows[self._image_keys[s.path]] for s in samples]
        return [torch.stack([r[level] for r in rows]) for level in range(len(self.dims))]

    def dataset(self, samples: list[Sample]) -> FeatureDataset:
        """A dataset that yields the cached features of ``samples`` instead of images."""
        return FeatureDataset(samples, self.features(samples))
