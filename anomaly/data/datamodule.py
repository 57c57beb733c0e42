"""The LightningDataModule shared by every method.

A concrete data module only says which files exist (:meth:`scan`); this class
does the rest: the paper's 5-fold split of the training images, the image
pipeline at the backbone's resolution, optional seeded augmentation of the
fitting images, and the loaders. What the model needs (its input size, shuffling,
...) it is told once, before set-up, by :meth:`AnomalyDataModule.configure`.
"""

from __future__ import annotations

import os
from abc import abstractmethod
from contextlib import nullcontext

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from anomaly.console import ignore_interrupts
from anomaly.data.augment import AugmentOptions, build_augmentation
from anomaly.data.datasets import ImageDataset, Sample
from anomaly.data.folds import check_fold, kfold_split
from anomaly.data.image_cache import ResizedImageCache
from anomaly.data.needs import DataNeeds
from anomaly.data.samplers import EpochShardSampler
from anomaly.data.transforms import (
    DEFAULT_FIT,
    DEFAULT_RESIZE,
    ImagePipeline,
    check_image_size,
    geometry,
    resize_rule,
)
from anomaly.errors import UserError
from anomaly.features import FeatureCache


def default_num_workers() -> int:
    return min(4, max(0, (os.cpu_count() or 1) - 1))


class AnomalyDataModule(pl.LightningDataModule):
    """Train / held-out / test loaders for one category and fold.

    Args:
        fold: 0..4 fits on four fifths of the sorted training images; ``None``
            fits on all of them.
        batch_size: images per batch.
        num_workers: loader worker processes (``None``: up to 4).
        image_size: square input size; ``None``: the model's native resolution
            (see :meth:`configure`).
        augment: apply the category's augmentation to the fitting images.
        seed: seed of the augmentation stream (reproducible statistics).
        feature_cache: a folder for the on-disk cache of pooled features
            (:mod:`anomaly.features`); the un-augmented loaders then yield cached
            ``"features"`` instead of images, extracted once for every fold. Needs
            a feature-based method, whose extractor :meth:`configure` is given.
        image_cache: a folder for decoded, resized images
            (:mod:`anomaly.data.image_cache`): every later epoch and run at the same
            resolution reads them instead of decoding the files again.
        augment_options: switches of the augmentation (flips, 90° turns, largest rotation,
            noise, edge handling) over the category's defaults (the paper's table for MVTec AD
            categories), e.g. ``--data.augment_options.rotate90 false``.
        resize: how images are made square, everywhere they are resized (fitting, held-out,
            test, cached images and features): ``area`` (default), ``linear`` (the paper's
            code: OpenCV bilinear without anti-aliasing) or ``cubic``; see
            :mod:`anomaly.data.transforms`.
        fit: how an image of another aspect ratio fills the input: ``stretch`` (default), ``pad``
            (aspect kept, padded with the ImageNet mean) or ``crop`` (aspect kept, centre-cropped);
            masks follow the same geometry.
        tiles: the input as ``ROWSxCOLS`` square tiles of ``image_size`` (e.g. ``1x3`` for long
            strips): every tile is a sample of the fit, an image's score is its largest tile score
            and maps are stitched (Gaussian methods; see
            :class:`~anomaly.detector.model.GaussianDetectorModel`).
    """

    def __init__(
        self,
        fold: int | None = 0,
        batch_size: int = 32,
        num_workers: int | None = None,
        image_size: int | None = None,
        augment: bool = False,
        seed: int = 0,
        feature_cache: str | None = None,
        image_cache: str | None = None,
        augment_options: AugmentOptions | None = None,
        resize: str = DEFAULT_RESIZE,
        fit: str = DEFAULT_FIT,
        tiles: str = "1x1",
    ) -> None:
        super().__init__()
        check_fold(fold)
        if batch_size < 1:
            raise UserError(f"batch_size must be at least 1, got {batch_size}")
        if num_workers is not None and num_workers < 0:
            raise UserError(f"num_workers must be 0 (load in the main process) or more, got {num_workers}")
        if image_size is not None:
            check_image_size(image_size, batch_size)
        self.fold = fold
        self.batch_size = batch_size
        self.num_workers = default_num_workers() if num_workers is None else num_workers
        self.image_size = image_size
        self.augment = augment
        self.seed = seed
        self.needs = DataNeeds()  # what the model asks for: see configure()
        self.augment_options = augment_options or AugmentOptions()
        self._scanned: tuple[list[Sample], list[Sample]] | None = None
        self.feature_cache = feature_cache
        self.feature_source = None  # a FeatureCache of the model's extractor (see configure)
        self._features_loaded = False
        self.image_cache = image_cache
        self.resize = resize_rule(resize).name
        self.geometry = geometry(resize, fit, tiles)
        self.fit, self.tiles = self.geometry.fit.name, str(self.geometry.tiles)

    # ----------------------------------------------------------------- files
    @property
    @abstractmethod
    def category(self) -> str:
        """Name of the category (or dataset) the images belong to."""

    @property
    @abstractmethod
    def dataset(self) -> str:
        """The collection the category belongs to (its resolved root folder): tables average
        categories of one dataset only."""

    @property
    def normal_only(self) -> bool:
        """Data with normal images only (no test set): fit and calibrate, but no AUROC."""
        return False

    @abstractmethod
    def scan(self) -> tuple[list[Sample], list[Sample]]:
        """(training samples, all normal, sorted by path; test samples)."""

    def samples(self) -> tuple[list[Sample], list[Sample]]:
        if self._scanned is None:
            train, test = self.scan()
            if not train:
                raise UserError(f"no training images found for category '{self.category}'")
            if not test and not self.normal_only:
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
    def configure(self, needs: DataNeeds, trainer=None) -> None:
        """Take what the model asks for, once, before set-up (called by the code that wires a run).

        The model's input size applies unless ``image_size`` was given; with ``feature_cache`` and a
        feature extractor, the cache is opened for the ``trainer``'s device and precision. Tiles
        are refused unless the model scores tiles.
        """
        if self.geometry.tiles.count > 1 and not needs.tiles:
            raise UserError(
                f"--data.tiles {self.geometry.tiles} needs a Gaussian method (the default, spatial_* "
                "configs), which scores every tile; use --data.fit pad or crop for this method"
            )
        self.needs = needs
        if self.image_size is None:
            self.image_size = needs.image_size
        if self.feature_cache is None or needs.extractor is None:
            return
        if self.feature_source is None or self.feature_source.extractor is not needs.extractor:
            compute, forward_context = "cpu/32-true", nullcontext
            if trainer is not None:
                compute = f"{trainer.strategy.root_device.type}/{trainer.precision}"
                forward_context = trainer.precision_plugin.forward_context
            self.feature_source = FeatureCache(
                self.feature_cache, needs.extractor, self.image_size, compute, forward_context, self.geometry
            )
            self._features_loaded = False

    def _pipeline(self, augment: bool) -> ImagePipeline:
        if self.image_size is None:
            raise RuntimeError(
                "image_size is unknown: set it, or configure() the data with the model's needs"
            )
        augmentation = (
            build_augmentation(self.category, noise=self.needs.noise, options=self.augment_options)
            if augment
            else None
        )
        return ImagePipeline(self.image_size, augmentation, self.geometry)

    def resized_images(self) -> ResizedImageCache | None:
        """The resized-image cache at the current image size, if one is configured."""
        return (
            None
            if self.image_cache is None
            else ResizedImageCache(self.image_cache, self.image_size, self.geometry)
        )

    def _image_dataset(
        self, samples: list[Sample], augment: bool = False, with_masks: bool = False
    ) -> ImageDataset:
        pipeline, cache = self._pipeline(augment), self.resized_images()
        return ImageDataset(samples, pipeline, with_masks, seed=self.seed, image_cache=cache)

    def setup(self, stage: str | None = None) -> None:
        self.samples()  # fail early on bad input
        self.split()
        self._check_sampler_not_replaced()

    def _check_sampler_not_replaced(self) -> None:
        """Lightning's distributed sampler would shard our already-sharded loaders a second time."""
        trainer = getattr(self, "trainer", None)
        connector = getattr(trainer, "_accelerator_connector", None)
        if (
            trainer is not None
            and trainer.world_size > 1
            and getattr(connector, "use_distributed_sampler", False)
        ):
            raise UserError(
                "trainer.use_distributed_sampler must be false with more than one device: the data "
                "module already gives each process its own share of the images (set "
                "--trainer.use_distributed_sampler false)"
            )

    def _loader(
        self, dataset: Dataset, shuffle: bool = False, num_workers: int | None = None, pad: bool = False
    ) -> DataLoader:
        """Every image exactly once per epoch and process (see :class:`EpochShardSampler`); ``pad``:
        the same number of images on every process (gradient training)."""
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=EpochShardSampler(len(dataset), shuffle=shuffle, seed=self.seed, pad=pad),
            num_workers=self.num_workers if num_workers is None else num_workers,
            pin_memory=torch.cuda.is_available(),
            worker_init_fn=ignore_interrupts,  # Ctrl-C to the process group: the main process stops
        )

    # ---------------------------------------------------------- feature cache
    def _feature_loader(self, samples: list[Sample], shuffle: bool = False) -> DataLoader:
        """Cached features of ``samples``; the first call fills the cache for all train and test images."""
        if self.feature_source is None:
            raise UserError("data.feature_cache needs a method on backbone features (e.g. gaussian, ocsvm)")
        if not self._features_loaded:
            train, test = self.samples()
            paths = [s.path for s in train + test]
            self.feature_source.load(
                paths, self.batch_size, self.num_workers, image_cache=self.resized_images()
            )
            self._features_loaded = True
        return self._loader(self.feature_source.dataset(samples), shuffle=shuffle, num_workers=0)

    # ---------------------------------------------------------------- loaders
    def train_dataloader(self) -> DataLoader:
        if self.feature_cache is not None and not self.augment:
            return self._feature_loader(self.fit_samples, shuffle=self.needs.shuffle)
        dataset = self._image_dataset(self.fit_samples, self.augment)
        return self._loader(dataset, shuffle=self.needs.shuffle, pad=self.needs.pad)

    def holdout_dataloader(self) -> DataLoader:
        """The fold's held-out normal fifth, never augmented."""
        if self.feature_cache is not None:
            return self._feature_loader(self.holdout_samples)
        return self._loader(self._image_dataset(self.holdout_samples), shuffle=False)

    def val_dataloader(self) -> DataLoader:
        return self.holdout_dataloader()

    def test_dataloader(self) -> DataLoader:
        if self.feature_cache is not None:
            return self._feature_loader(self.test_samples)
        has_masks = self.needs.masks and any(s.mask is not None for s in self.test_samples)
        return self._loader(self._image_dataset(self.test_samples, with_masks=has_masks), shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()
