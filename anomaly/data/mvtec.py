"""MVTec AD in its official layout.

``<root>/<category>/train/good/*.png``, ``<root>/<category>/test/<good|defect>/*.png``
and, optionally, ``<root>/<category>/ground_truth/<defect>/<name>_mask.png``.
Label 0 is ``good``, 1 anything else. Masks are loaded when present and never
required.
"""

from __future__ import annotations

from pathlib import Path

from anomaly.data.augment import AugmentOptions
from anomaly.data.datamodule import AnomalyDataModule
from anomaly.data.datasets import Sample
from anomaly.data.demo import DEMO_CATEGORY, ensure_demo_dataset
from anomaly.data.images import list_images, require_folder
from anomaly.data.transforms import DEFAULT_FIT, DEFAULT_RESIZE
from anomaly.errors import UserError

MVTEC_CATEGORIES = (
    "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut",
    "pill", "screw", "tile", "toothbrush", "transistor", "wood", "zipper",
)  # fmt: skip


def scan_mvtec(root: Path, category: str) -> tuple[list[Sample], list[Sample]]:
    """(sorted normal training samples, test samples) of one MVTec-layout category."""
    require_folder(root, "data root", "set --data.root to the folder holding the categories")
    folder = root / category
    if not folder.is_dir():
        found = sorted(p.name for p in root.iterdir() if (p / "train").is_dir())
        hint = f"categories found there: {', '.join(found)}" if found else "no category folders found there"
        raise UserError(f"unknown category '{category}' under '{root}' ({hint})")
    train_dir = folder / "train" / "good"
    train = [Sample(str(p), 0) for p in list_images(train_dir)]
    if not train:
        raise UserError(f"no training images in '{train_dir}': it must hold the normal images")
    test_dir = folder / "test"
    if not test_dir.is_dir():
        raise UserError(f"no test folder '{test_dir}'")
    test: list[Sample] = []
    for defect_dir in sorted(p for p in test_dir.iterdir() if p.is_dir()):
        defect = defect_dir.name
        for path in list_images(defect_dir):
            mask = folder / "ground_truth" / defect / f"{path.stem}_mask.png"
            test.append(
                Sample(str(path), int(defect != "good"), defect, str(mask) if mask.is_file() else None)
            )
    if not test:
        raise UserError(f"no test images under '{test_dir}'")
    return train, test


class MVTecDataModule(AnomalyDataModule):
    """One MVTec AD category.

    Args:
        root: the folder that holds the category folders. ``None`` uses the
            small embedded demo dataset (category ``demo``), built on first use.
        category: e.g. ``bottle``.
        fold, batch_size, num_workers, image_size, augment, seed, feature_cache, image_cache,
            augment_options, resize, fit, tiles: see
            :class:`~anomaly.data.datamodule.AnomalyDataModule`.
    """

    def __init__(
        self,
        root: str | None = None,
        category: str = DEMO_CATEGORY,
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
        super().__init__(
            fold,
            batch_size,
            num_workers,
            image_size,
            augment,
            seed,
            feature_cache,
            image_cache,
            augment_options,
            resize,
            fit,
            tiles,
        )
        if root is None and category != DEMO_CATEGORY:
            raise UserError(
                f"category '{category}' needs --data.root: the folder holding your MVTec AD download"
            )
        self.root = root
        self._category = category

    @property
    def category(self) -> str:
        return self._category

    @property
    def dataset(self) -> str:
        return "demo" if self.root is None else str(Path(self.root).expanduser().resolve())

    def scan(self) -> tuple[list[Sample], list[Sample]]:
        root = Path(self.root) if self.root is not None else ensure_demo_dataset()
        return scan_mvtec(root.expanduser(), self.category)
