"""Pixel-shuffle autoencoder: architecture, best-checkpoint selection, map-mean and CCA scores, CLI."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import albumentations as A
import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import TensorBoardLogger
from torch import nn

from anomaly.cli import CONFIG_DIR, main
from anomaly.data import MVTecDataModule
from anomaly.errors import UserError
from anomaly.evaluation.callback import RunReport
from anomaly.evaluation.connected_components import CCAScorer
from anomaly.methods.autoencoder import PixelShuffleAutoencoder
from anomaly.methods.autoencoder.module import error_map
from anomaly.methods.run import fit
from anomaly.tools.min_anomaly_size import main as min_size_main
from tests.conftest import DEFAULT_SWITCHES, FEW_HELD_OUT, make_mvtec_category

pytestmark = [FEW_HELD_OUT, DEFAULT_SWITCHES]


def test_network_mirrors_resnet18_with_pixel_shuffle():
    model = PixelShuffleAutoencoder(pretrained=False, image_size=64, min_anomaly_size=0.1)
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    latent = model.network.encoder(model.normalise(images))
    assert latent.shape == (2, 32, 2, 2)  # 32 channels at 1/32 resolution
    output = model(images)
    assert output.shape == (2, 3, 64, 64) and output.min() >= 0.0 and output.max() <= 1.0
    shuffles = [m for m in model.network.decoder.modules() if isinstance(m, nn.PixelShuffle)]
    assert len(shuffles) == 8  # 5 upsamplings: 3 blocks (main path + shortcut), unpool, unstem
    assert not [m for m in model.modules() if isinstance(m, nn.ConvTranspose2d)]
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(UserError, match="multiple of 32"):
        PixelShuffleAutoencoder(pretrained=False, image_size=100)


def test_fit_selects_the_best_checkpoint_and_scores_both_ways(tmp_path: Path):
    root = make_mvtec_category(tmp_path / "mvtec", n_train=10, n_good=3, n_bad=3, size=32)
    model = PixelShuffleAutoencoder(pretrained=False, image_size=32, min_anomaly_size=0.05)
    dm = MVTecDataModule(str(root), "widget", fold=0, batch_size=8, num_workers=0, augment=True)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/loss", mode="min", save_top_k=1)
    trainer = pl.Trainer(
        max_epochs=2, accelerator="cpu", devices=1, callbacks=[checkpoint, RunReport(figures=False)],
        enable_progress_bar=False, enable_model_summary=False,
        logger=TensorBoardLogger(tmp_path, name="tb", version="v"), num_sanity_val_steps=0,
        use_distributed_sampler=False, log_every_n_steps=1,
    )  # fmt: skip
    fit(trainer, model, dm)
    # training batches are shuffled and augmented without noise
    assert dm.needs.shuffle and not dm.needs.noise
    augmentation = dm.train_dataloader().dataset.pipeline.augment
    assert augmentation is not None
    assert not [t for t in augmentation.transforms if "GaussNoise" in repr(t)], "noise must be off"
    assert isinstance(augmentation, A.Compose)
    # the best epoch's weights are loaded back before testing
    best = torch.load(checkpoint.best_model_path, weights_only=False)["state_dict"]
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, best[name])
    with torch.no_grad():  # whichever epoch was best, fitting ends by restoring it
        for parameter in model.parameters():
            parameter.add_(1.0)
    model.on_fit_end()
    torch.testing.assert_close(model.state_dict(), best)
    trainer.test(model, datamodule=dm, verbose=False)
    results = json.loads((tmp_path / "tb" / "v" / "results.json").read_text())
    assert results["primary_score"] == "map_mean/sum"
    assert set(results["scores"]) == {"map_mean", "cca"}
    assert results["selected_score"] == pytest.approx(float(checkpoint.best_model_score))
    assert results["min_anomaly_size"] == 0.05
    # the written scores are the error map's mean and its CCA score
    batch = next(iter(dm.test_dataloader()))
    model.eval()
    with torch.no_grad():
        maps = error_map(model(batch["image"]), batch["image"].float() / 255)
    columns = model.score_batch(batch)
    torch.testing.assert_close(columns["map_mean/sum"], maps.mean(dim=(1, 2)))
    torch.testing.assert_close(columns["cca/sum"], CCAScorer(0.05)(maps))
    # TensorBoard holds the losses and the sample images
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb" / "v")).Reload()
    assert {"train/loss_epoch", "val/loss"} <= set(events.Tags()["scalars"])
    assert {"val/input", "val/reconstruction", "val/error_map"} <= set(events.Tags()["images"])


def test_without_masks_the_cca_score_is_left_out_with_a_warning(tmp_path: Path):
    root = make_mvtec_category(tmp_path / "mvtec", n_train=10, n_good=3, n_bad=3, size=32, masks=False)
    model = PixelShuffleAutoencoder(pretrained=False, image_size=32)
    dm = MVTecDataModule(str(root), "widget", fold=0, batch_size=4, num_workers=0)
    trainer = pl.Trainer(
        max_epochs=1, accelerator="cpu", devices=1, enable_progress_bar=False, enable_model_summary=False,
        logger=TensorBoardLogger(tmp_path, name="tb", version="v"), num_sanity_val_steps=0,
        use_distributed_sampler=False, enable_checkpointing=False, callbacks=[RunReport(figures=False)],
    )  # fmt: skip
    with pytest.warns(UserWarning, match="no ground-truth masks: the CCA score is left out"):
        fit(trainer, model, dm)
        trainer.test(model, datamodule=dm, verbose=False)
    results = json.loads((tmp_path / "tb" / "v" / "results.json").read_text())
    assert set(results["scores"]) == {"map_mean"} and results["min_anomaly_size"] is None
    assert results["image_auroc"] == results["scores"]["map_mean"]["sum"]


def test_each_data_module_gets_its_own_minimum_anomaly_size(tmp_path: Path):
    """Testing on other data after a fit takes that data's masks (or none), not the first data's."""
    masked = make_mvtec_category(tmp_path / "masked", n_train=5, n_good=2, n_bad=2, size=32)
    plain = make_mvtec_category(tmp_path / "plain", n_train=5, n_good=2, n_bad=2, size=32, masks=False)
    model = PixelShuffleAutoencoder(pretrained=False, image_size=32)
    trainer = pl.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, default_root_dir=tmp_path / "runs"
    )
    for root, expected in ((masked, (10 * 10) / (32 * 32)), (plain, None)):
        dm = MVTecDataModule(str(root), "widget", fold=0, num_workers=0)
        dm.configure(model.data_needs())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.test(model, datamodule=dm, verbose=False)
        assert model.extra_results()["min_anomaly_size"] == (pytest.approx(expected) if expected else None)


def test_data_image_size_must_suit_the_encoder(tmp_path: Path):
    root = make_mvtec_category(tmp_path / "mvtec", n_train=5, n_good=2, n_bad=2, size=32)
    model = PixelShuffleAutoencoder(pretrained=False, image_size=32, min_anomaly_size=0.05)
    dm = MVTecDataModule(str(root), "widget", fold=0, num_workers=0, image_size=48)
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False)
    with pytest.raises(UserError, match=r"--data\.image_size must be a multiple of 32, got 48"):
        fit(trainer, model, dm)


def test_command_line_run_with_the_autoencoder_config(tmp_path: Path, capsys):
    root = make_mvtec_category(tmp_path / "mvtec", n_train=10, n_good=3, n_bad=3, size=32)
    sizes = str(tmp_path / "sizes" / "{category}.json")
    args = ["--config", str(CONFIG_DIR / "autoencoder.yaml"), "--data.root", str(root),
            "--data.category", "widget", "--data.num_workers", "0", "--data.batch_size", "8",
            "--model.pretrained", "false", "--model.image_size", "32", "--trainer.max_epochs", "1",
            "--trainer.default_root_dir", str(tmp_path / "runs")]  # fmt: skip
    run_dir = tmp_path / "runs" / "autoencoder" / "resnet18_random-init_32px_augment" / "widget" / "fold_0"
    assert main(args) == 0, capsys.readouterr().err  # the size comes from the test masks
    results = json.loads((run_dir / "results.json").read_text())
    assert results["min_anomaly_size"] == pytest.approx((10 * 10) / (32 * 32))
    args += ["--figures", "false", "--model.min_anomaly_size_file", sizes]  # the figures were drawn above
    assert main(args) == 2  # a file given but not made
    assert "anomaly.tools.min_anomaly_size" in capsys.readouterr().err
    assert min_size_main(["--data.root", str(root), "--data.category", "widget", "--output", sizes]) == 0
    assert main(args) == 0, capsys.readouterr().err
    results = json.loads((run_dir / "results.json").read_text())
    assert results["method"] == "autoencoder" and results["n_test"] == 6
    assert results["min_anomaly_size"] == pytest.approx((10 * 10) / (32 * 32))
    assert Path(results["selected_checkpoint"]).is_file()
    assert results["image_auroc"] == results["scores"]["map_mean"]["sum"]
