"""Per-category training augmentation (the paper's Appendix Fig. 2).

The original used albumentations 0.4 with ``IAA*`` transforms. Today's
equivalents used here:

=============================  ==========================================
albumentations 0.4             here (albumentations 2.x)
=============================  ==========================================
IAASharpen                     Sharpen
IAAEmboss                      Emboss
IAAAdditiveGaussianNoise       GaussNoise(std_range=(0.01, 0.03))
ShiftScaleRotate               Affine(translate, scale, rotate; reflect-101 border)
=============================  ==========================================

Each category's switches live in :data:`CATEGORY_SWITCHES`; adding a category
is one line there. Augmentation is seeded per image and epoch (see
:func:`augmentation_seed`), so the same seed gives the same statistics whatever
the number of loader workers or processes.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import albumentations as A
import cv2


@dataclass(frozen=True)
class Switches:
    """What a category's augmentation may do."""

    flip: bool = True
    rotate90: bool = True
    max_rotation: float = 45.0
    shift: float = 0.05
    scale: tuple[float, float] = (0.95, 1.10)
    noise: bool = True


SMALL_ROTATION = Switches(max_rotation=15.0)

CATEGORY_SWITCHES: dict[str, Switches] = {
    "bottle": SMALL_ROTATION,
    "cable": SMALL_ROTATION,
    "capsule": Switches(flip=False, max_rotation=15.0),
    "carpet": Switches(),
    "grid": Switches(max_rotation=0.0, shift=0.0, scale=(0.95, 1.0)),
    "hazelnut": Switches(),
    "leather": Switches(),
    "metal_nut": Switches(flip=False, max_rotation=15.0),
    "pill": Switches(flip=False, max_rotation=15.0),
    "screw": Switches(flip=False, max_rotation=15.0),
    "tile": Switches(),
    "toothbrush": SMALL_ROTATION,
    "transistor": Switches(rotate90=False, max_rotation=15.0),
    "wood": SMALL_ROTATION,
    "zipper": SMALL_ROTATION,
}


def switches_for(category: str, noise: bool = True) -> Switches:
    """The category's switches (defaults for unknown categories); ``noise=False`` for the autoencoder."""
    if category not in CATEGORY_SWITCHES:
        warnings.warn(
            f"category '{category}' has no augmentation switches of its own: using the defaults (flips, "
            "90° turns, up to ±45°); if one of them can make a normal part look defective, add a line "
            "for it to CATEGORY_SWITCHES in anomaly/data/augment.py",
            stacklevel=2,
        )
    base = CATEGORY_SWITCHES.get(category, Switches())
    return Switches(**{**base.__dict__, "noise": base.noise and noise})


def build_augmentation(category: str, noise: bool = True, seed: int | None = None) -> A.Compose:
    """The Appendix Fig. 2 pipeline for ``category``, applied as a whole with p = 0.5."""
    s = switches_for(category, noise)
    transforms: list[A.BasicTransform] = [
        A.OneOf([A.MotionBlur(p=0.2), A.MedianBlur(blur_limit=3, p=0.1), A.Blur(blur_limit=3, p=0.1)], p=0.2),
        A.OneOf(
            [
                A.CLAHE(clip_limit=2),
                A.Sharpen(),
                A.Emboss(),
                A.RandomBrightnessContrast(brightness_limit=(-0.1, 0.2)),
            ],
            p=0.3,
        ),
        A.HueSaturationValue(hue_shift_limit=10, val_shift_limit=(-10, 20), p=0.3),
    ]
    if s.noise:
        transforms.append(
            A.OneOf(
                [
                    A.GaussNoise(std_range=(0.01, 0.03), per_channel=True),
                    A.GaussNoise(std_range=(0.01, 0.03), per_channel=False),
                ],
                p=0.2,
            )
        )
    if s.flip:
        transforms.append(A.HorizontalFlip(p=0.5))
    if s.rotate90:
        transforms.append(A.RandomRotate90(p=0.5))
    transforms.append(
        A.Affine(
            translate_percent=(-s.shift, s.shift),
            scale=s.scale,
            rotate=(-s.max_rotation, s.max_rotation),
            border_mode=cv2.BORDER_REFLECT_101,
            p=0.2,
        )
    )
    return A.Compose(transforms, p=0.5, seed=seed)


def augmentation_seed(seed: int, epoch: int, index: int) -> int:
    """A distinct, reproducible seed for one image in one epoch."""
    return (seed * 1_000_003 + epoch) * 10_000_019 + index
