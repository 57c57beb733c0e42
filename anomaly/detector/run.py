"""Saving the detector of a training run into its run folder."""

from __future__ import annotations

from pathlib import Path

from anomaly.data.transforms import Geometry
from anomaly.detector.api import GaussianDetector
from anomaly.detector.file import DETECTOR_FILE, METADATA_FILE


def save_run_detector(
    model, image_size: int, run_dir: str | Path, resize: str | Geometry = "area"
) -> Path | None:
    """Save a fitted Gaussian run's ``detector.safetensors`` + ``detector.json`` (``None``: other methods).

    Every Gaussian configuration (any pooling, reduction and level weighting) is saved: the file holds
    the run's own :class:`~anomaly.detector.model.GaussianDetectorModel`. ``resize`` may be the data's
    whole :class:`~anomaly.data.transforms.Geometry` (resize rule, fit rule, tiles).
    """
    from anomaly.methods.gaussian.module import GaussianAD

    if not isinstance(model, GaussianAD):
        return None
    if isinstance(resize, Geometry):
        model.detector.set_geometry(resize)
    return GaussianDetector.from_method(model, image_size, resize).save(Path(run_dir) / DETECTOR_FILE)


def run_detector_paths(run_dir: str | Path) -> list[Path]:
    """The detector files a run wrote into ``run_dir`` (those that exist)."""
    paths = [Path(run_dir) / name for name in (DETECTOR_FILE, METADATA_FILE)]
    return [path for path in paths if path.exists()]
