"""Per-category training augmentation (the paper's Appendix Fig. 2).

The original used albumentations 0.4 with ``IAA*`` transforms. Today's
equivalents used here:

=============================  ==========================================
albumentations 0.4             here (albumentations 2.x)
=============================  ==========================================
IAASharpen                     Sharpen
IAAEmboss                      Emboss
IAAAdditiveGaussianNoise       GaussNoise(std_range=(0.01, 0.03))
ShiftScaleRotate               Affine(translate, scale, rotate; reflect-101 border by default)
=============================  ==========================================

Each MVTec AD category's switches live in :data:`CATEGORY_SWITCHES`; any of them
(flips, 90° turns, the largest rotation, noise, edge handling) can be set for a run
with :class:`AugmentOptions` (``--data.augment_options.rotate90 false``), so a new
category needs no source edit. Augmentation is seeded per image (its file's SHA-256) and epoch (see
:func:`augmentation_seed`), so the same seed gives the same statistics whatever
the number of loader workers or processes, and whatever other images are fitted with it.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import cv2

if TYPE_CHECKING:
    import albumentations as A

from anomaly.errors import UserError

BORDERS = {
    "reflect": cv2.BORDER_REFLECT_101,
    "replicate": cv2.BORDER_REPLICATE,
    "constant": cv2.BORDER_CONSTANT,
    "wrap": cv2.BORDER_WRAP,
}


@dataclass(frozen=True)
class Switches:
    """What a category's augmentation may do."""

    flip: bool = True
    rotate90: bool = True
    max_rotation: float = 45.0
    shift: float = 0.05
    scale: tuple[float, float] = (0.95, 1.10)
    noise: bool = True
    border: str = "reflect"


@dataclass(frozen=True)
class AugmentOptions:
    """Your own switches (``--data.augment_options.flip false``); unset ones keep the category's.

    Args:
        flip: random horizontal flips.
        rotate90: random 90° turns.
        max_rotation: largest small rotation in degrees (0 turns them off; the paper: 45 or 15).
        noise: additive Gaussian noise.
        border: how shifted and rotated images are filled at the edges: ``reflect``,
            ``replicate``, ``constant`` (black) or ``wrap``.
    """

    flip: bool | None = None
    rotate90: bool | None = None
    max_rotation: float | None = None
    noise: bool | None = None
    border: str | None = None

    def __post_init__(self) -> None:
        if self.max_rotation is not None and not 0 <= self.max_rotation <= 180:
            raise UserError(f"augment_options.max_rotation must be 0..180 degrees, got {self.max_rotation}")
        if self.border is not None and self.border not in BORDERS:
            raise UserError(
                f"augment_options.border must be one of {', '.join(BORDERS)}, got '{self.border}'"
            )

    def given(self) -> dict:
        return {name: value for name, value in self.__dict__.items() if value is not None}


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


def switches_for(category: str, noise: bool = True, options: AugmentOptions | None = None) -> Switches:
    """The category's switches with ``options`` over them; ``noise=False`` for the autoencoder.

    A category outside the MVTec table starts from the defaults, with a warning unless
    ``options`` sets every switch.
    """
    options = options or AugmentOptions()
    if category not in CATEGORY_SWITCHES and len(options.given()) < len(AugmentOptions.__dataclass_fields__):
        warnings.warn(
            f"category '{category}' has no augmentation switches of its own: using the defaults (flips, "
            "90° turns, up to ±45°, noise, reflected edges); if one of them can make a normal part look "
            "defective, turn it off, e.g. --data.augment_options.rotate90 false (see docs/own-data.md)",
            stacklevel=2,
        )
    base = CATEGORY_SWITCHES.get(category, Switches())
    merged = {**base.__dict__, **options.given()}
    return Switches(**{**merged, "noise": merged["noise"] and noise})


def build_augmentation(
    category: str, noise: bool = True, seed: int | None = None, options: AugmentOptions | None = None
) -> A.Compose:
    """The Appendix Fig. 2 pipeline for ``category``, applied as a whole with p = 0.5."""
    # imported here, not with the module: scoring reads images but augments none (albumentations takes a
    # third of a second to import, and asks PyPI for a newer version unless told not to: 2 s offline)
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    import albumentations as A

    s = switches_for(category, noise, options)
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
            border_mode=BORDERS[s.border],
            p=0.2,
        )
    )
    return A.Compose(transforms, p=0.5, seed=seed)


def augmentation_seed(seed: int, epoch: int, identity: str) -> int:
    """A distinct, reproducible seed for one image in one epoch.

    ``identity`` is the image's own (the SHA-256 of its file), not its place in a list, so an
    image gets the same draws whatever other images it is fitted with: fitting more images
    later (``anomaly update``, ``anomaly merge``) augments them exactly as one fit of all would.
    """
    digest = hashlib.sha256(f"{seed}|{epoch}|{identity}".encode()).digest()
    return int.from_bytes(digest[:8], "little")
