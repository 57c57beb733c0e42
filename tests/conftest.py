"""Shared fixtures: small generated datasets in MVTec layout, and the real data location."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from PIL import Image

from anomaly.evaluation.callback import RunReport
from anomaly.methods.run import fit

# One compute thread per test process (and for the commands that tests start), unless the caller says
# otherwise: the tests' tensors are tiny, so a second thread gains nothing, and on a busy machine
# OpenMP's spinning threads multiply the suite's CPU time.
if "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
BOTTLE = SHARED_DATA / "mvtec_ad" / "bottle"
MAGNETIC_TILE = SHARED_DATA / "magnetic_tile"


def load_benchmark(name: str) -> ModuleType:
    """The script ``benchmarks/<name>.py`` as a module, registered (its dataclasses look it up)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


#: The generated category has no augmentation switches of its own; the warning that says so is
#: tested in tests/data/test_data.py.
DEFAULT_SWITCHES = pytest.mark.filterwarnings(
    "ignore:category 'widget' has no augmentation switches:UserWarning"
)
#: Without folds a fit holds out no normal images and sets no empirical threshold; the warning that
#: says so is tested in tests/test_cli.py.
FEW_HELD_OUT = pytest.mark.filterwarnings("ignore:no held-out images:UserWarning")


def make_mvtec_category(
    root: Path, category: str = "widget", n_train: int = 12, n_good: int = 4, n_bad: int = 4,
    size: int = 48, grey: bool = False, masks: bool = True, seed: int = 0, width: int | None = None,
) -> Path:  # fmt: skip
    """A tiny MVTec-layout category: smooth random normals, bright square defects; images are
    ``size`` x ``size`` or, with ``width``, ``size`` high and ``width`` wide."""
    rng = np.random.default_rng(seed)
    base = root / category
    width = width or size

    def normal() -> np.ndarray:
        image = rng.normal(120, 10, size=(size, width, 1 if grey else 3))
        return np.clip(image, 0, 255).astype(np.uint8)

    def save(array: np.ndarray, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array.squeeze()).save(path)

    for i in range(n_train):
        save(normal(), base / "train" / "good" / f"{i:03d}.png")
    for i in range(n_good):
        save(normal(), base / "test" / "good" / f"{i:03d}.png")
    for i in range(n_bad):
        image = normal()
        y, x = rng.integers(0, size // 2, size=2)
        x = x * (width - size // 2) // (size // 2)  # anywhere along a wider image
        image[y : y + size // 3, x : x + size // 3] = 250
        save(image, base / "test" / "square" / f"{i:03d}.png")
        if masks:
            mask = np.zeros((size, width), np.uint8)
            mask[y : y + size // 3, x : x + size // 3] = 255
            save(mask, base / "ground_truth" / "square" / f"{i:03d}_mask.png")
    return root


@pytest.fixture
def tiny_mvtec(tmp_path: Path) -> Path:
    return make_mvtec_category(tmp_path / "mvtec")


def require(path: Path) -> Path:
    if not path.is_dir():
        pytest.skip(f"real data not available at {path}")
    return path


def cpu_trainer(out: Path, epochs: int = 1, precision: str = "32-true", figures: bool = False) -> pl.Trainer:
    """A quiet single-process CPU trainer for method tests, which reports its tests into ``out`` (results
    and scores; the figures only when asked: drawing them is tested in tests/evaluation)."""
    return pl.Trainer(
        max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=out,
        use_distributed_sampler=False, precision=precision, callbacks=[RunReport(figures)],
    )  # fmt: skip


def run_results(trainer: pl.Trainer) -> dict:
    """The content of ``results.json`` of the trainer's last test."""
    (report,) = [c for c in trainer.callbacks if isinstance(c, RunReport)]
    return report.results


def fit_and_test(
    model: pl.LightningModule,
    dm: pl.LightningDataModule,
    out: Path,
    epochs: int = 1,
    precision: str = "32-true",
    figures: bool = False,
) -> pl.Trainer:
    """Fit ``model`` on ``dm`` (data configured, fit, calibrated), then test it; returns the trainer."""
    trainer = cpu_trainer(out, epochs, precision, figures)
    fit(trainer, model, dm)
    trainer.test(model, datamodule=dm, verbose=False)
    return trainer


ENTRY_DAMAGES = ("flip_payload_byte", "truncate", "garbage", "other_image")


def damage_entry(entry: Path, damage: str, other_entry: Path) -> None:
    """Damage a cache entry in one of :data:`ENTRY_DAMAGES` ways (``other_entry``: another image's)."""
    data = bytearray(entry.read_bytes())
    if damage == "flip_payload_byte":
        data[-3] ^= 0x40
    elif damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "garbage":
        data = bytearray(b"not a cache entry")
    else:  # a valid entry, but of another image
        data = bytearray(other_entry.read_bytes())
    entry.write_bytes(bytes(data))


def write_noise_images(folder: Path, count: int, height: int = 40, width: int = 50) -> list[Path]:
    """``count`` PNGs of seeded uniform noise, ``0.png`` ... in ``folder``."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{i}.png" for i in range(count)]
    for path in paths:
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
    return paths
