"""Saving the detector of a training run into its run folder."""

from __future__ import annotations

from pathlib import Path

from anomaly.data.images import file_digests
from anomaly.data.transforms import Geometry
from anomaly.detector.api import GaussianDetector
from anomaly.detector.file import DETECTOR_FILE, METADATA_FILE


def save_run_detector(
    model, image_size: int, run_dir: str | Path, resize: str | Geometry = "area", data=None
) -> Path | None:
    """Save a fitted Gaussian run's ``detector.safetensors`` + ``detector.json`` (``None``: other methods).

    Every Gaussian configuration (any pooling, reduction and level weighting) is saved: the file holds
    the run's own :class:`~anomaly.detector.model.GaussianDetectorModel`. ``resize`` may be the data's
    whole :class:`~anomaly.data.transforms.Geometry` (resize rule, fit rule, tiles). With the run's
    data module ``data``, the file records what the detector absorbed (the digest of every fitted
    image, the epochs and the augmentation), so that it can be updated and merged.
    """
    from anomaly.methods.gaussian.module import GaussianAD

    if not isinstance(model, GaussianAD):
        return None
    if isinstance(resize, Geometry):
        model.detector.set_geometry(resize)
    if data is not None:
        record_fit_images(model, data)
    return GaussianDetector.from_method(model, image_size, resize).save(Path(run_dir) / DETECTOR_FILE)


def run_detector_paths(run_dir: str | Path) -> list[Path]:
    """The detector files a run wrote into ``run_dir`` (those that exist)."""
    paths = [Path(run_dir) / name for name in (DETECTOR_FILE, METADATA_FILE)]
    return [path for path in paths if path.exists()]


def record_fit_images(model, data) -> None:
    """Give the run's detector the digests of its fitting images, its epochs and its augmentation."""
    detector = model.detector
    detector.absorbed = file_digests([sample.path for sample in data.fit_samples])
    augmented = bool(getattr(data, "augment", False))
    detector.epochs = max(model.fit_epochs, 1)
    detector.augmentation = (
        {
            "category": data.category,
            "noise": data.needs.noise,
            "options": data.augment_options.given(),
            "seed": data.seed,
        }
        if augmented
        else None
    )
