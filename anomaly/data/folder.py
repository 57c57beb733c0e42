"""Any folder dataset: a folder of normal images to train on, test folders labelled by name.

Unlike MVTec AD, nothing about the layout is fixed:

Every folder is searched at any depth, following symbolic links to folders, as
``anomaly predict --input`` does; folders nested in another (test folders in the
normal folder, the masks folder) count only for themselves.

* ``normal_dir``: the normal (defect-free) images; training uses them with the
  same 5-fold split as MVTec. ``test_normal_fraction`` first moves a seeded
  random share of them into the test set, for data without an official split.
* ``test_dirs``: optional folders (or globs such as ``MT_*/Imgs``) of test images. A
  folder's *class name* is its last path component that not all image folders
  share (``MT_Crack/Imgs`` -> ``MT_Crack``, ``test/scratch`` -> ``scratch``).
  Its label comes from ``labels`` (class name -> 0 normal / 1 anomalous) or
  else from the name: ``good``, ``normal`` or ``ok`` (``normal_names``) are 0,
  anything else 1. A test folder equal to ``normal_dir`` is skipped: its test
  images are the held-out share. Without test folders the data are normal-only:
  the detector is fitted and its threshold calibrated, but no AUROC can be measured.
* ``masks``: ``None``; ``"beside"`` (``X.jpg`` has its mask ``X<suffix><ext>``
  in the same folder, and mask files are not taken for images); or a folder
  holding ``<class name>/<stem><suffix><ext>`` or ``<stem><suffix><ext>``.

Images may be any size, grey or RGB, PNG/JPEG/BMP/TIFF: they are read as RGB
and resized to the backbone's square input like every other dataset.
"""

from __future__ import annotations

import glob
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from anomaly.data.augment import AugmentOptions
from anomaly.data.datamodule import AnomalyDataModule
from anomaly.data.datasets import Sample
from anomaly.data.images import collect_images, refuse_name_pairs, require_folder
from anomaly.data.transforms import DEFAULT_FIT, DEFAULT_RESIZE
from anomaly.errors import UserError

NORMAL_NAMES = ("good", "normal", "ok")
#: Folder names that the labelled-layout check proposes as the masks folder, not a test folder.
MASK_FOLDER_NAMES = ("ground_truth", "groundtruth", "gt", "mask", "masks")
BESIDE = "beside"


def class_names(folders: Sequence[Path]) -> list[str]:
    """Each folder's last path component that not all ``folders`` share (the last one if all do)."""
    parts = [folder.parts for folder in folders]
    depth = min(len(p) for p in parts)
    for k in range(1, depth + 1):
        names = [p[-k] for p in parts]
        if len(set(names)) > 1:
            return names
    return [p[-1] for p in parts]


def split_normals(n_items: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted indices (train, test) that move ``round(test_fraction * n)`` seeded random items into test."""
    if not 0.0 <= test_fraction < 1.0:
        raise UserError(f"test_normal_fraction must be in [0, 1), got {test_fraction}")
    n_test = round(test_fraction * n_items)
    order = np.random.default_rng(seed).permutation(n_items)
    return np.sort(order[n_test:]), np.sort(order[:n_test])


class FolderDataModule(AnomalyDataModule):
    """Normal images in one folder, labelled test images in others (see the module docstring).

    Args:
        normal_dir: folder of normal images (relative to ``root`` when given; default: ``root``).
        test_dirs: folders or globs of test images. With none (and no ``test_normal_fraction``)
            the data are normal-only: fitted, and calibrated on the fold's held-out normal
            images, but with no test set there is no AUROC.
        root: base folder of the relative paths above.
        name: the dataset's name in run folders and results (default: ``root``'s
            folder name, else ``normal_dir``'s class name).
        labels: class name -> 0 (normal) or 1 (anomalous), overriding ``normal_names``.
        normal_names: class names that mean normal (default ``good``, ``normal``, ``ok``).
        masks, mask_suffix, mask_extension: where the ground-truth masks are.
        test_normal_fraction: share of ``normal_dir`` held out for testing (seeded by ``split_seed``).
        fold, batch_size, num_workers, image_size, augment, seed, feature_cache, image_cache,
            augment_options, resize, fit, tiles: see
            :class:`~anomaly.data.datamodule.AnomalyDataModule`.
    """

    def __init__(
        self,
        normal_dir: str = ".",
        test_dirs: list[str] | None = None,
        root: str | None = None,
        name: str | None = None,
        labels: dict[str, int] | None = None,
        normal_names: list[str] | None = None,
        masks: str | None = None,
        mask_suffix: str = "",
        mask_extension: str = ".png",
        test_normal_fraction: float = 0.0,
        split_seed: int = 0,
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
        if labels and any(value not in (0, 1) for value in labels.values()):
            raise UserError(f"labels must map class names to 0 (normal) or 1 (anomalous), got {labels}")
        split_normals(0, test_normal_fraction, split_seed)  # validate early
        self.root = None if root is None else Path(root).expanduser()
        self.normal_dir = self._resolve(normal_dir)
        self.test_patterns = list(test_dirs or [])
        self.labels = dict(labels or {})
        self.normal_names = {n.lower() for n in (normal_names if normal_names is not None else NORMAL_NAMES)}
        self.masks = masks
        self.mask_suffix = mask_suffix
        self.mask_extension = mask_extension
        self.test_normal_fraction = test_normal_fraction
        self.split_seed = split_seed
        self._name = name

    # --------------------------------------------------------------- folders
    def _resolve(self, path: str) -> Path:
        path = Path(path).expanduser()
        return path if self.root is None or path.is_absolute() else self.root / path

    def test_folders(self) -> list[Path]:
        """The test folders, globs expanded, sorted, without ``normal_dir``."""
        folders: list[Path] = []
        for pattern in self.test_patterns:
            path = self._resolve(pattern)
            if glob.has_magic(str(path)):
                matches = sorted(Path(p) for p in glob.glob(str(path)) if Path(p).is_dir())
                if not matches:
                    raise UserError(f"test_dirs pattern '{pattern}' matches no folder under '{path.parent}'")
                folders += matches
            else:
                folders.append(require_folder(path, "test folder", "fix test_dirs (or root)"))
        normal = self.normal_dir.resolve()
        return sorted({f for f in folders if f.resolve() != normal})

    @property
    def category(self) -> str:
        if self._name:
            return self._name
        if self.root is not None:
            return self.root.resolve().name
        return class_names([self.normal_dir, *self.test_folders()])[0]

    @property
    def dataset(self) -> str:
        return str((self.root if self.root is not None else Path(self.normal_dir)).resolve())

    # ----------------------------------------------------------------- files
    def _mask_for(self, image: Path, class_name: str) -> Path | None:
        if self.masks is None:
            return None
        file_name = f"{image.stem}{self.mask_suffix}{self.mask_extension}"
        if self.masks == BESIDE:
            candidates = [image.with_name(file_name)]
        else:
            mask_root = self._resolve(self.masks)
            candidates = [mask_root / class_name / file_name, mask_root / file_name]
        return next((c for c in candidates if c != image and c.is_file()), None)

    def _images(self, folder: Path, others: Sequence[Path] = ()) -> list[Path]:
        """The folder's images at any depth (:func:`~anomaly.data.images.collect_images`, as
        ``anomaly predict`` lists them), without the masks that lie beside them, the masks folder,
        and the ``others`` data folders nested in it."""
        masks = [] if self.masks in (None, BESIDE) else [self._resolve(self.masks)]
        files = collect_images(folder, leave_out=[*others, *masks], option="image folder")
        if self.masks is None:
            refuse_name_pairs(
                folder,
                files,
                "if one of each is the other's mask, set masks: beside and mask_extension "
                "to the masks' extension; otherwise rename them",
            )
        if self.masks != BESIDE:
            return files
        masks = {self._mask_for(f, "") for f in files} - {None}
        return [f for f in files if f not in masks]

    def _refuse_labelled_layout(self, test_folders: Sequence[Path]) -> None:
        """:class:`UserError` where the normal folder holds a folder named as normal (``good``) beside
        other image folders (``scratch``): a labelled layout, all of whose images would be fitted on
        as normal ones. Test folders and the masks folder inside it do not count. The line names the
        fix: the other folders as test folders, one named as masks (``ground_truth``) as the masks."""
        taken = {folder.resolve() for folder in test_folders}
        if self.masks not in (None, BESIDE):
            taken.add(self._resolve(self.masks).resolve())
        inside = sorted(p for p in self.normal_dir.iterdir() if p.is_dir() and p.resolve() not in taken)
        normal = [p.name for p in inside if p.name.lower() in self.normal_names]
        if not normal:
            return
        others = [p.name for p in inside if p.name.lower() not in self.normal_names]
        others = [name for name in others if collect_images(self.normal_dir / name, warn=False)]
        if not others:
            return
        masks = [name for name in others if name.lower() in MASK_FOLDER_NAMES and self.masks is None]
        tests = [name for name in others if name not in masks]
        fix = f"set normal_dir to '{normal[0]}'"
        if tests:
            fix += f"{',' if masks else ' and'} test_dirs to [{', '.join(tests)}]"
        if masks:
            fix += f" and masks to '{masks[0]}' (with its files' mask_suffix, e.g. _mask)"
        raise UserError(
            f"'{self.normal_dir}' holds the normal images' folder '{normal[0]}' beside other image "
            f"folders ({', '.join(others)}), which would be fitted on as normal images too: {fix}"
        )

    def _label(self, class_name: str) -> int:
        if class_name in self.labels:
            return int(self.labels[class_name])
        return 0 if class_name.lower() in self.normal_names else 1

    def scan(self) -> tuple[list[Sample], list[Sample]]:
        require_folder(self.normal_dir, "normal image folder", "set normal_dir (or root)")
        folders = self.test_folders()
        names = class_names([self.normal_dir, *folders])
        unknown = sorted(set(self.labels) - set(names))
        if unknown:
            raise UserError(
                f"labels name {unknown}, which are not test folders (class names: {sorted(set(names))})"
            )
        self._refuse_labelled_layout(folders)
        normals = self._images(self.normal_dir, folders)
        if not normals:
            raise UserError(f"no images in '{self.normal_dir}': normal_dir must hold the normal images")
        train_idx, test_idx = split_normals(len(normals), self.test_normal_fraction, self.split_seed)
        train = [Sample(str(normals[i]), 0, names[0]) for i in train_idx]
        test = [self._sample(normals[i], names[0], 0) for i in test_idx]
        for folder, class_name in zip(folders, names[1:], strict=True):
            others = [self.normal_dir, *(f for f in folders if f != folder)]
            label = self._label(class_name)
            test += [self._sample(p, class_name, label) for p in self._images(folder, others)]
        if not test and not self.normal_only:
            raise UserError(
                f"no test images in {', '.join(self.test_patterns)}: fix test_dirs, or leave it out to fit "
                "on normal images only"
            )
        return train, test

    @property
    def normal_only(self) -> bool:
        return not self.test_patterns and self.test_normal_fraction == 0

    def _sample(self, path: Path, class_name: str, label: int) -> Sample:
        mask = self._mask_for(path, class_name)
        return Sample(str(path), label, class_name, None if mask is None else str(mask))
