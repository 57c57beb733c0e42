"""benchmarks/anomalib_fit.py: what it may write into its run folder (anomalib stubbed: no fit here)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest
import torch
from pytorch_lightning import Callback

from tests.conftest import load_benchmark


class Folder:
    """anomalib's data module, as far as the script uses it: the fitting images, and the validation
    split of the normal images ``from_train`` (the last ones here; anomalib draws them at random).
    Each one made is kept in :data:`MADE`."""

    def __init__(
        self, normal_dir: Path | list[Path], normal_test_dir: Path, abnormal_dir: Path, val_split_mode: str,
        num_workers: int = 8, val_split_ratio: float = 0.5, **kwargs
    ) -> None:  # fmt: skip
        MADE.append(self)
        self.num_workers = num_workers
        normal = sorted(p for folder in (normal_dir if isinstance(normal_dir, list) else [normal_dir])
                        for p in folder.iterdir())  # fmt: skip
        validated = round(len(normal) * val_split_ratio) if val_split_mode == "from_train" else 0
        self.train_data, self.val_data = normal[: len(normal) - validated], normal[len(normal) - validated :]
        self.tested = sorted(normal_test_dir.iterdir()), sorted(abnormal_dir.iterdir())


MADE: list[Folder] = []


class Engine:
    """anomalib's engine: writes a checkpoint and reports each tested image's score to the callbacks."""

    def __init__(self, default_root_dir: Path, callbacks: list, limit_val_batches: float, **kwargs) -> None:
        self.root, self.callbacks = Path(default_root_dir), callbacks
        self.validates = limit_val_batches > 0

    def fit(self, model, datamodule: Folder) -> None:
        assert self.validates == bool(datamodule.val_data), "validation batches without a validation split"
        checkpoint = self.root / "Stub" / "latest" / "weights" / "model.ckpt"
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        checkpoint.write_bytes(b"x" * 100)

    def test(self, model, datamodule: Folder, verbose: bool) -> None:
        good, defect = datamodule.tested
        outputs = SimpleNamespace(
            pred_score=torch.arange(len(good + defect), dtype=torch.float32),
            gt_label=torch.tensor([0] * len(good) + [1] * len(defect)),
            image_path=[str(p) for p in good + defect],
        )
        for callback in self.callbacks:
            callback.on_test_batch_end(None, model, outputs, None, 0)


@pytest.fixture
def anomalib_fit(monkeypatch) -> ModuleType:
    """The script, with anomalib's data module and engine stubbed (and its ``lightning`` where absent)."""
    stubs = {"anomalib": {}, "anomalib.data": {"Folder": Folder}, "anomalib.engine": {"Engine": Engine}}
    if importlib.util.find_spec("lightning") is None:  # anomalib's Lightning: the same Callback
        stubs |= {"lightning": {}, "lightning.pytorch": {}}
        stubs["lightning.pytorch.callbacks"] = {"Callback": Callback}
    for name, attributes in stubs.items():
        module = ModuleType(name)
        module.__dict__.update(attributes)
        monkeypatch.setitem(sys.modules, name, module)
    script = load_benchmark("anomalib_fit")
    monkeypatch.setattr(script, "build_peer", lambda name: torch.nn.Identity())
    return script


@pytest.fixture
def folders(tmp_path: Path) -> list[str]:
    """``--fit``, ``--good`` and ``--defect``: 4 fitting images, 2 normal and 2 defective test images."""
    argv = []
    for name, count in (("fit", 4), ("good", 2), ("defect", 2)):
        (tmp_path / name).mkdir()
        for i in range(count):
            (tmp_path / name / f"{i}.png").write_bytes(b"png")
        argv += [f"--{name}", str(tmp_path / name)]
    return argv


def test_results_are_written_whole_and_a_rerun_replaces_them(anomalib_fit, folders, tmp_path: Path):
    out = tmp_path / "run"
    for _ in range(2):
        assert anomalib_fit.main(["anomalib DFM", *folders, "--out", str(out)]) == 0
        result = json.loads((out / "results.json").read_text())
        assert result["written_by"] == "benchmarks/anomalib_fit.py"
        assert (result["n_fit"], result["n_test"], result["n_test_defective"]) == (4, 4, 2)
        assert result["image_auroc"] == 1.0 and result["checkpoint_bytes"] == 100


def test_a_folder_of_other_files_is_refused_before_anything_is_fitted(
    anomalib_fit, folders, tmp_path: Path, monkeypatch, capsys
):
    monkeypatch.setattr(Engine, "fit", lambda *a, **k: pytest.fail("fitted into a folder of other files"))
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "results.json").write_text("my results\n")
    assert anomalib_fit.main(["anomalib DFM", *folders, "--out", str(mine)]) == 2
    assert capsys.readouterr().err == (
        f"error: --out {mine} holds files that benchmarks/anomalib_fit.py did not write (e.g. results.json): "
        "give a new or empty folder\n"
    )
    assert [p.name for p in mine.iterdir()] == ["results.json"]
    assert (mine / "results.json").read_text() == "my results\n"


def test_with_held_out_images_the_peer_validates_on_as_many_normal_images(
    anomalib_fit, folders, tmp_path: Path
):
    (tmp_path / "holdout").mkdir()
    for i in range(2):
        (tmp_path / "holdout" / f"h{i}.png").write_bytes(b"png")
    out = tmp_path / "run"
    argv = ["anomalib DFM", *folders, "--holdout", str(tmp_path / "holdout"), "--out", str(out)]
    assert anomalib_fit.main(argv) == 0
    result = json.loads((out / "results.json").read_text())
    assert (result["n_fit"], result["n_validation"], result["n_test"]) == (4, 2, 4)
    split = anomalib_fit.validation_split(tmp_path / "fit", tmp_path / "holdout")
    assert split == {
        "normal_dir": [tmp_path / "fit", tmp_path / "holdout"], "val_split_mode": "from_train",
        "val_split_ratio": 2 / 6, "seed": 0,
    }  # fmt: skip
    assert anomalib_fit.main(["anomalib DFM", *folders, "--out", str(tmp_path / "without")]) == 0
    assert json.loads((tmp_path / "without" / "results.json").read_text())["n_validation"] == 0


def test_the_peer_loads_with_as_many_workers_as_asked(anomalib_fit, folders, tmp_path: Path):
    assert anomalib_fit.main(["anomalib DFM", *folders, "--out", str(tmp_path / "one")]) == 0
    assert MADE[-1].num_workers == 0  # by default one process holds everything, as ours
    assert (
        anomalib_fit.main(["anomalib DFM", *folders, "--out", str(tmp_path / "two"), "--num-workers", "2"])
        == 0
    )
    assert MADE[-1].num_workers == 2
    argv = ["anomalib DFM", *folders, "--out", str(tmp_path / "own"), "--num-workers", "default"]
    assert anomalib_fit.main(argv) == 0
    assert MADE[-1].num_workers == 8  # anomalib's own default: the script passes none
