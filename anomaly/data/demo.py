"""A small offline demo dataset in MVTec layout, built from a real photograph.

The normal images are random crops of scikit-image's brick-wall photograph
(shipped inside the scikit-image package, so no download is needed). The
anomalous ones carry synthetic scratches and stains, with pixel masks. It is
built once, atomically, into ``$ANOMALY_CACHE`` (default ``~/.cache/anomaly``).
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from anomaly.atomic import built_whole

DEMO_CATEGORY = "demo"
DEMO_VERSION = "v1"
CROP = 256
COUNTS = {"train": 80, "good": 20, "scratch": 20, "stain": 20}


def cache_dir() -> Path:
    return Path(os.environ.get("ANOMALY_CACHE", Path.home() / ".cache" / "anomaly")).expanduser()


def _source_photo() -> np.ndarray:
    from skimage import data

    return np.asarray(data.brick(), dtype=np.uint8)


def _normal(photo: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    y, x = rng.integers(0, photo.shape[0] - CROP), rng.integers(0, photo.shape[1] - CROP)
    crop = photo[y : y + CROP, x : x + CROP].astype(np.float32)
    crop = crop * rng.uniform(0.95, 1.05) + rng.uniform(-5, 5)
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    return np.clip(crop, 0, 255).astype(np.uint8)


def _scratch(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    mask = np.zeros(image.shape, np.uint8)
    start = rng.integers(30, CROP - 30, size=2)
    angle = rng.uniform(0, np.pi)
    length = rng.uniform(60, 140)
    end = np.clip(start + length * np.array([np.cos(angle), np.sin(angle)]), 0, CROP - 1).astype(int)
    cv2.line(mask, tuple(int(v) for v in start), tuple(int(v) for v in end), 1, int(rng.integers(3, 7)))
    value = 20 if rng.random() < 0.5 else 235
    out = image.copy()
    out[mask > 0] = value
    return out, mask > 0


def _stain(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    alpha = np.zeros(image.shape, np.float32)
    centre = tuple(int(v) for v in rng.integers(40, CROP - 40, size=2))
    axes = tuple(int(v) for v in rng.integers(14, 34, size=2))
    cv2.ellipse(alpha, centre, axes, float(rng.uniform(0, 180)), 0, 360, 1.0, -1)
    alpha = cv2.GaussianBlur(alpha, (0, 0), 3)
    shift = rng.choice([-1, 1]) * rng.uniform(60, 90)
    out = np.clip(image.astype(np.float32) + alpha * shift, 0, 255).astype(np.uint8)
    return out, alpha > 0.5


def build_demo_dataset(root: Path, seed: int = 0) -> None:
    """Write the demo category under ``root / DEMO_CATEGORY``."""
    rng = np.random.default_rng(seed)
    photo = _source_photo()
    base = root / DEMO_CATEGORY

    def save(image: np.ndarray, folder: Path, name: str) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / name)

    for i in range(COUNTS["train"]):
        save(_normal(photo, rng), base / "train" / "good", f"{i:03d}.png")
    for i in range(COUNTS["good"]):
        save(_normal(photo, rng), base / "test" / "good", f"{i:03d}.png")
    for defect, make in (("scratch", _scratch), ("stain", _stain)):
        for i in range(COUNTS[defect]):
            image, mask = make(_normal(photo, rng), rng)
            save(image, base / "test" / defect, f"{i:03d}.png")
            save(mask.astype(np.uint8) * 255, base / "ground_truth" / defect, f"{i:03d}_mask.png")


def ensure_demo_dataset() -> Path:
    """The demo dataset's root (the folder holding ``demo/``), built on first use."""
    root = cache_dir() / "demo_data" / DEMO_VERSION
    if (root / DEMO_CATEGORY / "test").is_dir():
        return root
    try:
        with built_whole(root) as staging:
            build_demo_dataset(staging)
    except OSError:  # built concurrently by another process
        if not (root / DEMO_CATEGORY / "test").is_dir():
            raise
    return root
