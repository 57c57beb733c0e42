"""The trained baselines (autoencoder, fine-tuned classifier) on two CPU processes (DDP, gloo).

Each is trained for one epoch through ``train.py`` with ``strategy=ddp, devices=2`` on a tiny
category whose fitting, held-out and test sets have odd sizes: the padded training loader
must keep the two processes in step, and validation and test must count each image once.
The selected checkpoint is then tested (and validated) again in one process: the scores
and the validation metric must be the same.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from sklearn.metrics import roc_auc_score

from anomaly.data import MVTecDataModule
from anomaly.data.samplers import EpochShardSampler
from anomaly.data.supervised import StratifiedMVTecDataModule
from anomaly.evaluation.callback import RunReport
from anomaly.methods.autoencoder import PixelShuffleAutoencoder
from anomaly.methods.classifier import FineTunedClassifier
from tests.conftest import make_mvtec_category

REPO = Path(__file__).resolve().parents[2]


def test_padded_sampler_gives_every_process_the_same_number_of_images(monkeypatch):
    for n, world in ((7, 2), (9, 4), (8, 2), (2, 3)):
        shares = []
        for rank in range(world):
            monkeypatch.setattr(
                "anomaly.data.samplers.process_rank_and_world", lambda r=rank, w=world: (r, w)
            )
            sampler = EpochShardSampler(n, shuffle=True, seed=1, pad=True)
            sampler.set_epoch(2)
            shares.append(list(sampler))
            assert len(shares[-1]) == len(sampler) == -(-n // world)
        images = [i - 2 * n for share in shares for i in share]
        assert set(images) == set(range(n))  # every image, a few of them twice
        assert len(images) - n == (-n) % world
        unpadded = EpochShardSampler(n, pad=False)  # (still rank world-1 of world)
        assert len(list(unpadded)) == len(range(world - 1, n, world))


def run_ddp(args: list[str], out: Path, batch_size: int) -> dict:
    """One epoch of ``train.py`` on two CPU processes (no batch of one image: BatchNorm on 1x1 maps)."""
    command = [
        sys.executable, "train.py", *args, "--data.num_workers", "0", "--data.batch_size", str(batch_size),
        "--data.augment", "false", "--trainer.max_epochs", "1", "--trainer.accelerator", "cpu",
        "--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.default_root_dir", str(out),
        "--trainer.enable_progress_bar", "false", "--figures", "false",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (results_file,) = out.rglob("results.json")
    results = json.loads(results_file.read_text())
    with open(results_file.parent / "scores.csv", newline="") as handle:
        results["rows"] = list(csv.DictReader(handle))
    return results


def single_process(model: pl.LightningModule, dm, checkpoint: str, out: Path) -> tuple[dict, float]:
    """The checkpoint's test summary and validation metric in one process."""
    model.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"])
    report = RunReport()
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=out, use_distributed_sampler=False, callbacks=[report],
    )  # fmt: skip
    dm.configure(model.data_needs(), trainer)
    (validated,) = trainer.validate(model, datamodule=dm, verbose=False)
    trainer.test(model, datamodule=dm, verbose=False)
    return report.results, validated


def assert_same_test(ddp: dict, summary: dict, rows_dir: Path, columns: list[str]) -> None:
    with open(rows_dir / "scores.csv", newline="") as handle:
        single_rows = list(csv.DictReader(handle))
    paths = [row["path"] for row in ddp["rows"]]
    assert len(paths) == len(set(paths)) == ddp["n_test"] == summary["n_test"]  # each image once
    assert paths == [row["path"] for row in single_rows]
    for column in columns:
        for a, b in zip(ddp["rows"], single_rows, strict=True):
            assert float(a[column]) == pytest.approx(float(b[column]), rel=1e-5, abs=1e-7), column
    labels = [int(row["label"]) for row in ddp["rows"]]
    primary = [float(row[columns[0]]) for row in ddp["rows"]]
    assert ddp["image_auroc"] == pytest.approx(roc_auc_score(labels, primary), abs=1e-12)
    assert ddp["image_auroc"] == pytest.approx(summary["image_auroc"], abs=1e-9)


@pytest.mark.slow
def test_autoencoder_on_two_processes_scores_as_one(tmp_path: Path):
    root = make_mvtec_category(tmp_path / "mvtec", n_train=12, n_good=4, n_bad=3, size=32)
    args = ["--config", "configs/autoencoder.yaml", "--model.pretrained", "false", "--model.image_size", "32",
            "--data.root", str(root), "--data.category", "widget", "--data.fold", "0"]  # fmt: skip
    ddp = run_ddp(args, tmp_path / "runs", batch_size=3)  # 9 fitting images, padded: 5 a process
    dm = MVTecDataModule(str(root), "widget", fold=0, batch_size=3, num_workers=0)
    assert (len(dm.fit_samples), len(dm.holdout_samples), len(dm.test_samples)) == (9, 3, 7)  # all odd
    assert ddp["n_train"] == len(dm.fit_samples) and ddp["epochs"] == 1
    model = PixelShuffleAutoencoder(pretrained=False, image_size=32)
    summary, validated = single_process(model, dm, ddp["selected_checkpoint"], tmp_path / "one")
    # the held-out images' MSE, each image once, as the checkpoint was selected by
    assert ddp["selected_score"] == pytest.approx(validated["val/loss"], rel=1e-5)
    assert_same_test(ddp, summary, tmp_path / "one", ["map_mean_sum", "cca_sum"])


@pytest.mark.slow
def test_classifier_on_two_processes_scores_as_one(tmp_path: Path):
    root = make_mvtec_category(tmp_path / "mvtec", n_train=12, n_good=4, n_bad=7, size=32)
    args = ["--config", "configs/classifier.yaml", "--model.pretrained", "false", "--data.image_size", "32",
            "--data.root", str(root), "--data.category", "widget", "--data.fold", "0"]  # fmt: skip
    ddp = run_ddp(args, tmp_path / "runs", batch_size=4)  # 13 training images, padded: 7 a process
    dm = StratifiedMVTecDataModule(str(root), "widget", fold=0, batch_size=4, num_workers=0, image_size=32)
    assert len(dm.fit_samples) % 2 and len(dm.holdout_samples) % 2 and len(dm.test_samples) % 2
    assert ddp["n_train"] == len(dm.fit_samples) and ddp["n_val"] == len(dm.holdout_samples)
    model = FineTunedClassifier("resnet18", pretrained=False)
    summary, validated = single_process(model, dm, ddp["selected_checkpoint"], tmp_path / "one")
    assert ddp["selected_score"] == pytest.approx(validated["val/auroc"], abs=1e-9)
    assert_same_test(ddp, summary, tmp_path / "one", ["logit_sum"])
