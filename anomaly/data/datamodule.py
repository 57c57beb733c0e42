"""The LightningDataModule shared by every method.

A concrete data module only says which files exist (:meth:`scan`); this class
does the rest: the paper's 5-fold split of the training images, the image
pipeline at the backbone's resolution, optional seeded augmentation of the
fitting images, and the loaders.
"""

from __future__ import annotations

import os
from abc import abstractmethod

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from anomaly.data.augment import build_augmentation
from anomaly.data.datasets import ImageDataset, Sample
from anomaly.data.folds import check_fold, kfold_split
from anomaly.data.samplers import EpochShardSampler
from anomaly.data.transforms import ImagePipeline
from anomaly.errors import UserError


def default_num_workers() -> int:
    return min(4, max(0, (os.cpu_count() or 1) - 1))


class AnomalyDataModule(pl.LightningDataModule):
    """Train / held-out / test loaders for one category and fold.

    Args:
        fold: 0..4 fits on four fifths of the sorted training images; ``None``
            fits on all of them.
        batch_size: images per batch.
        num_workers: loader worker processes (``None``: up to 4).
        image_size: square input size; ``None`` lets the model set its backbone's
            native resolution.
        augment: apply the category's augmentation to the fitting images.
        seed: seed of the augmentation stream (reproducible statistics).
    """

    def __init__(
        self,
        fold: int | None = 0,
        batch_size: int = 32,
        num_workers: int | None = None,
        image_size: int | None = None,
        augment: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        check_fold(fold)
        if batch_size < 1:
            raise UserError(f"batch_size must be at least 1, got {batch_size}")
        self.fold = fold
        self.batch_size = batch_size
        self.num_workers = default_num_workers() if num_workers is None else num_workers
        self.image_size = image_size
        self.augment = augment
        self.seed = seed
        self.shuffle_train = False  # methods trained by gradient descent switch this on
        self._scanned: tuple[list[Sample], list[Sample]] | None = None

    # ----------------------------------------------------------------- files
    @property
    @abstractmethod
    def category(self) -> str:
        """Name of the category (or dataset) the images belong to."""

    @abstractmethod
    def scan(self) -> tuple[list[Sample], list[Sample]]:
        """(training samples, all normal, sorted by path; test samples)."""

    def samples(self) -> tuple[list[Sample], list[Sample]]:
        if self._scanned is None:
            train, test = self.scan()
            if not train:
                raise UserError(f"no training images found for category '{self.category}'")
            if not test:
                raise UserError(f"no test images found for category '{self.category}'")
            self._scanned = (train, test)
        return self._scanned

    def split(self) -> tuple[list[Sample], list[Sample]]:
        """(fitting samples, held-out normal samples) of this fold."""
        train, _ = self.samples()
        fit_idx, holdout_idx = kfold_split(len(train), self.fold)
        return [train[i] for i in fit_idx], [train[i] for i in holdout_idx]

    @property
    def fit_samples(self) -> list[Sample]:
        return self.split()[0]

    @property
    def holdout_samples(self) -> list[Sample]:
        return self.split()[1]

    @property
    def test_samples(self) -> list[Sample]:
        return self.samples()[1]

    # ------------------------------------------------------------- pipeline
    def set_image_size(self, size: int) -> None:
        """Called by the model with its backbone's native resolution, unless set by the user."""
        if self.image_size is None:
            self.image_size = size

    def _pipeline(self, augment: bool) -> ImagePipeline:
        if self.image_size is None:
            raise RuntimeError("image_size is unknown: set it, or let the model call set_image_size()")
        augmentation = build_augmentation(self.category) if augment else None
        return ImagePipeline(self.image_size, augmentation)

    def setup(self, stage: str | None = None) -> None:
        self.samples()  # fail early on bad input
        self.split()

    def _loader(self, dataset: ImageDataset, shuffle: bool = False) -> DataLoader:
        """Every image exactly once per epoch and process (see :class:`EpochShardSampler`)."""
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=EpochShardSampler(len(dataset), shuffle=shuffle, seed=self.seed),
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        dataset = ImageDataset(self.fit_samples, self._pipeline(self.augment), seed=self.seed)
        return self._loader(dataset, shuffle=self.shuffle_train)

    def holdout_dataloader(self) -> DataLoader:
        """The fold's held-out normal fifth, never augmented."""
        return self._loader(ImageDataset(self.holdout_samples, self._pipeline(False)), shuffle=False)

    def val_dataloader(self) -> DataLoader:
        return self.holdout_dataloader()

    def test_dataloader(self) -> DataLoader:
        has_masks = any(s.mask is not None for s in self.test_samples)
        dataset = ImageDataset(self.test_samples, self._pipeline(False), with_masks=has_masks)
        return self._loader(dataset, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()
