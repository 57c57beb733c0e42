"""Datasets of labelled image files."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from anomaly.data.augment import augmentation_seed
from anomaly.data.image_cache import ResizedImageCache
from anomaly.data.images import load_mask, load_rgb, read_in_threads, sha256_file
from anomaly.data.transforms import ImagePipeline


@dataclass(frozen=True)
class Sample:
    """One image file: label 0 is normal, 1 anomalous; ``mask`` is optional."""

    path: str
    label: int
    defect: str = "good"
    mask: str | None = None


class ImageDataset(Dataset):
    """Yields ``{"image": uint8 (3, S, S), "label", "index", "path"}`` (+ ``"mask"``).

    The key may encode an epoch as ``epoch * len(self) + index`` (see
    :class:`~anomaly.data.samplers.EpochShardSampler`); with augmentation, the
    image is augmented with a seed derived from (seed, epoch, the SHA-256 of the image's file).
    With ``with_masks`` every item carries a (1, S, S) uint8 mask (on the pipeline's canvas), all zeros
    where no ground truth exists, and ``"has_mask"``. With ``image_cache`` (at
    the pipeline's size) images are decoded and resized once, then read back.
    """

    def __init__(
        self,
        samples: list[Sample],
        pipeline: ImagePipeline,
        with_masks: bool = False,
        seed: int = 0,
        image_cache: ResizedImageCache | None = None,
    ) -> None:
        if image_cache is not None and image_cache.image_size != pipeline.image_size:
            raise ValueError("the image cache and the pipeline must have the same image size")
        self.samples = samples
        self.pipeline = pipeline
        self.with_masks = with_masks
        self.seed = seed
        self.image_cache = image_cache
        self._identities: dict[int, str] = {}

    def identity(self, index: int) -> str:
        """The SHA-256 of sample ``index``'s file (read once)."""
        if index not in self._identities:
            self._identities[index] = sha256_file(self.samples[index].path)
        return self._identities[index]

    def read(self, path: str) -> np.ndarray:
        """The RGB image at ``path`` (already resized when it comes from the image cache)."""
        return load_rgb(path) if self.image_cache is None else self.image_cache.load(path)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitems__(self, keys: list[int]) -> list[dict]:
        """A batch's items (the loader's call), read on threads (:func:`read_in_threads`), or one by
        one with augmentation: its random state is the pipeline's, seeded per image."""
        if self.pipeline.augment is not None:
            return [self[key] for key in keys]
        return read_in_threads(self.__getitem__, keys)

    def __getitem__(self, key: int) -> dict:
        epoch, index = divmod(key, len(self.samples))
        sample = self.samples[index]
        if self.pipeline.augment is not None:
            self.pipeline.augment.set_random_seed(augmentation_seed(self.seed, epoch, self.identity(index)))
        item = {
            "image": self.pipeline(self.read(sample.path)),
            "label": sample.label,
            "index": index,
            "path": sample.path,
        }
        if self.with_masks:
            if sample.mask is not None:
                mask = torch.from_numpy(self.pipeline.mask(load_mask(sample.mask)))
            else:
                mask = torch.zeros(self.pipeline.shape, dtype=torch.bool)
            item["mask"] = mask[None].to(torch.uint8)
            item["has_mask"] = sample.mask is not None
        return item
