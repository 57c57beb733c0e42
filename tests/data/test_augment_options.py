"""Augmentation switches as data options: the MVTec table by default, any switch overridable."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import albumentations as A
import cv2
import pytest

from anomaly.data import MVTecDataModule
from anomaly.data.augment import AugmentOptions, build_augmentation, switches_for
from anomaly.errors import UserError

ALL_SET = AugmentOptions(flip=False, rotate90=False, max_rotation=5.0, noise=False, border="constant")


def test_unset_options_keep_the_category_table():
    assert switches_for("capsule", options=AugmentOptions()) == switches_for("capsule")
    switches = switches_for("capsule", options=AugmentOptions(rotate90=False, border="wrap"))
    assert (switches.flip, switches.rotate90, switches.max_rotation, switches.border) == (
        False,  # capsule's own
        False,
        15.0,  # capsule's own
        "wrap",
    )
    assert not switches_for("bottle", noise=False, options=AugmentOptions(noise=True)).noise  # autoencoder


def test_every_switch_set_needs_no_table_and_warns_nothing():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipeline = build_augmentation("my_parts", options=ALL_SET)
    names = [type(t).__name__ for t in pipeline.transforms]
    assert "HorizontalFlip" not in names and "RandomRotate90" not in names and "OneOf" in names
    affine = next(t for t in pipeline.transforms if isinstance(t, A.Affine))
    assert affine.border_mode == cv2.BORDER_CONSTANT
    assert not any(
        isinstance(t, A.OneOf) and isinstance(t.transforms[0], A.GaussNoise) for t in pipeline.transforms
    )


@pytest.mark.parametrize(
    ("options", "message"),
    [({"border": "mirror"}, "border must be one of"), ({"max_rotation": 200.0}, "max_rotation")],
)
def test_bad_options_are_user_errors(options: dict, message: str):
    with pytest.raises(UserError, match=message):
        AugmentOptions(**options)


def test_the_data_module_hands_its_options_to_the_pipeline(tiny_mvtec):
    module = MVTecDataModule(
        str(tiny_mvtec), "widget", augment=True, image_size=32, num_workers=0, augment_options=ALL_SET
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 'widget' is no MVTec category, but every switch is set
        pipeline = module._pipeline(augment=True)
    assert pipeline is not None and module.augment_options == ALL_SET


def test_building_the_augmentations_makes_no_network_call() -> None:
    """albumentations asks PyPI for updates on import unless told not to; an offline line must not wait."""
    probe = (
        "import socket\n"
        "attempts = []\n"
        "def refuse(*args, **kwargs):\n"
        "    attempts.append(args)\n"
        "    raise OSError('offline')\n"
        "socket.getaddrinfo = socket.create_connection = refuse\n"
        "from anomaly.data.augment import build_augmentation\n"
        "build_augmentation('bottle')\n"
        "print(len(attempts))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "NO_ALBUMENTATIONS_UPDATE"}
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["0"], done.stdout + done.stderr
