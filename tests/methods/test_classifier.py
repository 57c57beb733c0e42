"""Supervised fine-tuning classifier: trainable copy of a registry network, selection by val AUROC, CLI."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from anomaly.backbones import build_backbone
from anomaly.cli import CONFIG_DIR, main
from anomaly.data.supervised import StratifiedMVTecDataModule
from anomaly.methods.classifier import FineTunedClassifier
from tests.conftest import DEFAULT_SWITCHES, FEW_HELD_OUT, make_mvtec_category

pytestmark = [FEW_HELD_OUT, DEFAULT_SWITCHES]


@pytest.mark.parametrize("backbone", ["resnet18", "efficientnet-lite0"])
def test_one_trainable_logit_and_the_shared_extractor_stays_frozen(backbone: str):
    model = FineTunedClassifier(backbone, pretrained=False)
    model.train()
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    logits = model(images)
    assert logits.shape == (2,)
    logits.sum().backward()
    assert all(p.requires_grad for p in model.parameters())
    assert all(p.grad is not None for p in model.network.parameters() if p.requires_grad)
    assert model.network.training
    extractor = build_backbone(backbone, pretrained=False)
    extractor.train()
    assert not extractor.training and not any(p.requires_grad for p in extractor.parameters())


def test_command_line_run_with_the_classifier_config(tmp_path: Path, capsys):
    root = make_mvtec_category(tmp_path / "mvtec", n_train=10, n_good=5, n_bad=10, size=32)
    args = ["--config", str(CONFIG_DIR / "classifier.yaml"), "--data.root", str(root),
            "--data.category", "widget", "--data.num_workers", "0", "--data.batch_size", "8",
            "--data.image_size", "32", "--model.pretrained", "false", "--trainer.max_epochs", "2",
            "--trainer.default_root_dir", str(tmp_path / "runs")]  # fmt: skip
    assert main(args) == 0, capsys.readouterr().err
    run_dir = tmp_path / "runs" / "classifier" / "resnet18_random-init_32px_augment" / "widget" / "fold_0"
    results = json.loads((run_dir / "results.json").read_text())
    dm = StratifiedMVTecDataModule(str(root), "widget", fold=0)
    assert results["method"] == "classifier" and results["primary_score"] == "logit/sum"
    assert (results["n_train"], results["n_val"], results["n_test"]) == (15, 5, 5)
    assert results["n_test_anomalous"] == 2
    assert results["selection_metric"] == "val/auroc" and Path(results["selected_checkpoint"]).is_file()
    assert results["image_auroc"] == results["scores"]["logit"]["sum"]
    with open(run_dir / "scores.csv") as file:
        assert [r["path"] for r in csv.DictReader(file)] == [s.path for s in dm.test_samples]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir)).Reload()
    assert {"train/loss_epoch", "val/auroc", "val/loss"} <= set(events.Tags()["scalars"])


def test_official_split_without_anomalies_is_refused(tmp_path: Path, capsys):
    root = make_mvtec_category(tmp_path / "mvtec", size=32)
    code = main(["--config", str(CONFIG_DIR / "classifier.yaml"), "--data.class_path",
                 "anomaly.data.MVTecDataModule", "--data.root", str(root), "--data.category", "widget",
                 "--model.pretrained", "false",
                 "--trainer.default_root_dir", str(tmp_path / "runs")])  # fmt: skip
    assert code == 2 and "StratifiedMVTecDataModule" in capsys.readouterr().err
