"""FolderDataModule on layouts that are not MVTec-shaped (and on Magnetic-Tile-Defect when present)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomaly.cli import main
from anomaly.data.folder import FolderDataModule, class_names
from anomaly.data.folds import kfold_split
from anomaly.data.needs import DataNeeds
from anomaly.errors import UserError
from tests.conftest import DEFAULT_SWITCHES, FEW_HELD_OUT, MAGNETIC_TILE, require

pytestmark = [FEW_HELD_OUT, DEFAULT_SWITCHES]

FORMATS = ("jpg", "bmp", "tif", "jpeg")


def save(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def make_tiles(root: Path, n_free: int = 15, seed: int = 0) -> Path:
    """Magnetic-Tile-like: ``MT_*/Imgs/X.<ext>`` with the mask ``X.png`` beside each image, grey and
    RGB, several formats and sizes; plus one PNG normal image (``extra.png``) that has no mask."""
    rng = np.random.default_rng(seed)
    for folder, count in (("MT_Free", n_free), ("MT_Crack", 3), ("MT_Blowhole", 2)):
        for i in range(count):
            shape = (40 + 3 * i, 56 - 2 * i) + (() if i % 3 else (3,))
            image = np.clip(rng.normal(120, 10, size=shape), 0, 255).astype(np.uint8)
            mask = np.zeros(shape[:2], np.uint8)
            if folder != "MT_Free":
                image[5:15, 5:15] = 250
                mask[5:15, 5:15] = 255
            save(image, root / folder / "Imgs" / f"{folder}_{i}.{FORMATS[i % 4]}")
            save(mask, root / folder / "Imgs" / f"{folder}_{i}.png")
    save(np.full((50, 50), 120, np.uint8), root / "MT_Free" / "Imgs" / "extra.png")
    return root


def tiles_module(root: Path, **kwargs) -> FolderDataModule:
    defaults = dict(root=str(root), normal_dir="MT_Free/Imgs", test_dirs=["MT_*/Imgs"], masks="beside",
                    test_normal_fraction=0.2, num_workers=0, batch_size=4, image_size=32)  # fmt: skip
    return FolderDataModule(**{**defaults, **kwargs})


def test_class_names_are_the_distinguishing_folder():
    assert class_names([Path("d/MT_Free/Imgs"), Path("d/MT_Crack/Imgs")]) == ["MT_Free", "MT_Crack"]
    assert class_names([Path("p/train/good"), Path("p/test/good"), Path("p/test/cut")]) == [
        "good",
        "good",
        "cut",
    ]


def test_tiles_layout_labels_masks_split_and_folds(tmp_path: Path):
    root = make_tiles(tmp_path / "tiles")
    # masks beside the images: same stem (X.png for X.jpg); the _gt files are masks of .png images
    data = tiles_module(root)
    train, test = data.samples()
    assert data.category == "tiles"
    # 16 normal images (the masks beside them are not images): 13 train, round(0.2 * 16) = 3 test
    assert len(train) == 13 and Counter(s.defect for s in test) == {
        "MT_Free": 3,
        "MT_Crack": 3,
        "MT_Blowhole": 2,
    }
    assert all(s.label == (s.defect != "MT_Free") for s in test)
    assert not {s.path for s in train} & {s.path for s in test}
    assert not [s for s in train + test if s.path.endswith(".png") and not s.path.endswith("extra.png")]
    for sample in test:  # X.png beside X.jpg; extra.png has none (it is not its own mask)
        expected = None if sample.path.endswith("extra.png") else str(Path(sample.path).with_suffix(".png"))
        assert sample.mask == expected
    # the seeded split is reproducible and changes with the seed
    assert tiles_module(root).samples()[1] == test
    assert tiles_module(root, split_seed=1).samples()[1] != test
    # then the paper's folds, exactly as for MVTec
    fit_idx, holdout_idx = kfold_split(len(train), 0)
    assert data.fit_samples == [train[i] for i in fit_idx]
    assert data.holdout_samples == [train[i] for i in holdout_idx]
    data.configure(DataNeeds(masks=True))  # a model that asks for the test masks
    batch = next(iter(data.test_dataloader()))
    assert batch["image"].shape == (4, 3, 32, 32) and batch["image"].dtype.is_floating_point is False
    assert batch["mask"].shape == (4, 1, 32, 32)


@pytest.mark.parametrize("normal_dir", ["MT_Free/Imgs", "MT_Crack/Imgs"])
def test_images_beside_their_masks_are_refused_without_masks_beside(tmp_path: Path, normal_dir: str):
    """X.jpg beside X.png with no ``masks`` set: one line naming a pair and the fix, not the masks
    fitted or tested as images."""
    root = make_tiles(tmp_path / "tiles")
    data = tiles_module(root, masks=None, normal_dir=normal_dir, test_dirs=["MT_*/Imgs"])
    with pytest.raises(UserError) as error:
        data.samples()
    folder = root / normal_dir
    pairs = len(list(folder.glob("*.png"))) - (normal_dir == "MT_Free/Imgs")  # extra.png has no twin
    stem = sorted(path.stem for path in folder.glob("*.png") if path.stem != "extra")[0]
    assert str(error.value).startswith(f"'{folder}' holds {pairs} sets of images that differ only in their")
    assert f"(e.g. {stem}." in str(error.value) and "set masks: beside" in str(error.value)
    # a folder without such pairs is taken as it is
    (tmp_path / "plain").mkdir()
    for path in folder.glob("*.png"):
        (tmp_path / "plain" / path.name).write_bytes(path.read_bytes())
    plain = FolderDataModule(normal_dir=str(tmp_path / "plain"), num_workers=0)
    assert len(plain.samples()[0]) == len(list((tmp_path / "plain").iterdir()))


def test_a_labelled_layout_given_as_the_normal_folder_is_refused(tmp_path: Path):
    """root/good beside root/scratch as the normal folder: one line naming the fix, which works;
    sub-folders of good images, and a masks folder beside the good one, are taken as they are."""
    rng = np.random.default_rng(0)
    root = tmp_path / "parts"
    for folder, count in (("good", 6), ("scratch", 2), ("dent", 1), ("masks", 2)):
        for i in range(count):
            save(rng.integers(0, 255, size=(30, 30, 3), dtype=np.uint8), root / folder / f"{i}.png")
    with pytest.raises(UserError) as error:
        FolderDataModule(root=str(root)).samples()
    assert str(error.value) == (
        f"'{root}' holds the normal images' folder 'good' beside other image folders (dent, masks, scratch), "
        "which would be fitted on as normal images too: set normal_dir to 'good', test_dirs to "
        "[dent, scratch] and masks to 'masks' (with its files' mask_suffix, e.g. _mask)"
    )
    with pytest.raises(UserError) as beside:  # with masks beside the images, a masks folder is a test folder
        FolderDataModule(root=str(root), masks="beside").samples()
    assert str(beside.value).endswith("set normal_dir to 'good' and test_dirs to [dent, masks, scratch]")
    train, test = FolderDataModule(root=str(root), normal_dir="good", test_dirs=["dent", "scratch"]).samples()
    assert len(train) == 6 and Counter(s.defect for s in test) == {"dent": 1, "scratch": 2}
    with_masks = FolderDataModule(root=str(root), test_dirs=["dent", "scratch"], masks="masks")
    assert len(with_masks.samples()[0]) == 6
    for name in ("scratch", "dent"):
        (root / name).rename(tmp_path / name)
    (root / "good").rename(root / "day1")  # good images by day: no folder is named as normal
    (root / "masks").rename(root / "day2")
    assert len(FolderDataModule(root=str(root)).samples()[0]) == 8


def test_labels_from_mapping_names_and_mask_folder(tmp_path: Path):
    root = tmp_path / "parts"
    rng = np.random.default_rng(0)
    for folder, count in (("normal", 6), ("test/ok", 2), ("test/reference", 2), ("test/dent", 2)):
        for i in range(count):
            save(
                rng.integers(0, 255, size=(30, 30, 3), dtype=np.uint8),
                root / folder / f"{folder.replace('/', '_')}{i}.png",
            )
    save(np.full((30, 30), 255, np.uint8), root / "masks" / "dent" / "test_dent0_mask.png")
    data = FolderDataModule(normal_dir="normal", test_dirs=["test/*"], root=str(root), name="parts",
                            labels={"reference": 0}, masks="masks", mask_suffix="_mask")  # fmt: skip
    _, test = data.samples()
    labels = {s.defect: s.label for s in test}
    assert labels == {"ok": 0, "reference": 0, "dent": 1}
    assert [Path(s.mask).name for s in test if s.mask] == ["test_dent0_mask.png"]
    renamed = FolderDataModule(normal_dir="normal", test_dirs=["test/*"], root=str(root),
                               normal_names=["ok", "reference"])  # fmt: skip
    assert {s.defect: s.label for s in renamed.samples()[1]} == labels


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"normal_dir": "nowhere"}, "does not exist"),
        ({"test_dirs": ["MT_*/Nothing"]}, "matches no folder"),
        ({"test_dirs": ["MT_Gone/Imgs"]}, "does not exist"),
        ({"labels": {"MT_Dent": 1}}, "not test folders"),
        ({"labels": {"MT_Crack": 2}}, "to 0"),
        ({"test_normal_fraction": 1.0}, "test_normal_fraction"),
        ({"test_dirs": ["MT_Free"], "test_normal_fraction": 0.0}, "no test images"),
    ],
)
def test_bad_settings_are_user_errors(tmp_path: Path, kwargs: dict, message: str):
    root = make_tiles(tmp_path / "tiles")
    with pytest.raises(UserError, match=message):
        tiles_module(root, **kwargs).samples()


def test_a_file_given_as_a_folder_is_named_as_such(tmp_path: Path):
    root = make_tiles(tmp_path / "tiles")
    (root / "notes.txt").write_text("")
    with pytest.raises(UserError, match=r"normal image folder '.*notes\.txt' is a file, not a folder"):
        tiles_module(root, normal_dir="notes.txt").samples()
    with pytest.raises(UserError, match=r"test folder '.*notes\.txt' is a file, not a folder"):
        tiles_module(root, test_dirs=["notes.txt"]).samples()


def test_train_cli_on_folder_config_writes_results_and_detector(tmp_path: Path, capsys):
    root = make_tiles(tmp_path / "tiles", n_free=10)
    runs = tmp_path / "runs"
    code = main(["--config", "magnetic_tile", "--config", "paper", "--data.root", str(root),
                 "--data.num_workers", "0", "--data.batch_size", "8", "--model.levels", "[3]",
                 "--trainer.default_root_dir", str(runs),
                 "--trainer.enable_progress_bar", "false", "--figures", "false"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    run_dir = runs / "gaussian" / "efficientnet-lite0_levels-3" / "magnetic_tile" / "fold_0"
    results = json.loads((run_dir / "results.json").read_text())
    assert (
        results["category"] == "magnetic_tile" and results["n_test"] == 2 + 3 + 2
    )  # round(0.2 * 11) normal + 5 defects
    assert (run_dir / "scores.csv").is_file() and (run_dir / "detector.safetensors").is_file()


@pytest.mark.real_data
def test_magnetic_tile_seeded_split():
    root = require(MAGNETIC_TILE)
    data = FolderDataModule(root=str(root), normal_dir="MT_Free/Imgs", test_dirs=["MT_*/Imgs"],
                            masks="beside", test_normal_fraction=0.2, split_seed=0, image_size=64,
                            num_workers=0, batch_size=8)  # fmt: skip
    train, test = data.samples()
    counts = Counter(s.defect for s in test)
    assert len(train) == 762 and counts["MT_Free"] == 190
    assert {k: v for k, v in counts.items() if k != "MT_Free"} == {
        "MT_Blowhole": 115, "MT_Break": 85, "MT_Crack": 57, "MT_Fray": 32, "MT_Uneven": 103}  # fmt: skip
    assert all(s.path.endswith(".jpg") and s.mask.endswith(".png") for s in test)
    assert sum(s.label for s in test) == 392
    data.configure(DataNeeds(masks=True))
    batch = next(iter(data.test_dataloader()))
    assert batch["image"].shape == (8, 3, 64, 64) and bool(batch["has_mask"].all())


def test_normal_only_folder_has_no_test_set(tmp_path: Path):
    root = make_tiles(tmp_path / "tiles")
    module = tiles_module(root, test_dirs=None, test_normal_fraction=0.0)
    train, test = module.samples()
    assert module.normal_only and test == [] and len(train) == 16  # 15 MT_Free + extra.png
    assert not tiles_module(root).normal_only
