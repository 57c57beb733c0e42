"""The MSE autoencoder baseline of Table V / VIII as a LightningModule.

Trained on the fold's normal images (Adam 1e-4, MSE between the input in
[0, 1] and the sigmoid reconstruction, the category's augmentation without
noise), selected by the loss on the fold's held-out normal fifth
(``val/loss``, via the trainer's ``ModelCheckpoint``). The error map is the
per-pixel squared error averaged over the colour channels, and it gives two scores:

* ``map_mean/sum``: the mean of the error map (Table V "Map-Mean");
* ``cca/sum``: the highest threshold at which the map's largest 8-connected
  component reaches the category's minimum anomaly size (Table V "CCA", see
  :mod:`anomaly.evaluation.connected_components`).

``map_mean/sum`` is the primary score (``image_auroc``): it needs nothing but
the normal training images, while the CCA score uses the minimum anomaly size
taken from the test masks, knowledge a deployed detector would not have. Without
masks (and without a size given by hand) the CCA score is left out, with a warning.
"""

from __future__ import annotations

import warnings
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor

from anomaly.backbones.extractor import unit_images
from anomaly.data.images import load_mask
from anomaly.data.needs import DataNeeds
from anomaly.errors import UserError
from anomaly.evaluation.connected_components import CCAScorer, min_anomaly_fraction, read_min_anomaly_size
from anomaly.methods.autoencoder.network import PixelShuffleAE
from anomaly.methods.base import SUM
from anomaly.methods.distributed import gather_rows
from anomaly.methods.trained import Normalise, TrainedMethod, trainable_network

ENCODER = "resnet18"
DOWNSAMPLING = 32
PAPER_IMAGE_SIZE = 224


class PixelShuffleAutoencoder(TrainedMethod):
    """ResNet-18 encoder, pixel-shuffle decoder, MSE loss; map-mean and CCA scores.

    Args:
        latent_channels: channels of the bottleneck (the paper: 32).
        lr: Adam's learning rate (the paper: 1e-4).
        image_size: square input size, a multiple of 32 (the paper: 224).
        pretrained: start the encoder from ImageNet weights; ``False`` (tests only) starts at random.
        weights: a local ResNet-18 state-dict file instead of torchvision's download.
        min_anomaly_size: the category's minimum anomaly size as a fraction of the image, by hand.
        min_anomaly_size_file: the JSON written by ``anomaly min-anomaly-size``;
            ``{category}`` is replaced by the data's category. Ignored when ``min_anomaly_size`` is set.
            With neither, the size is computed from the data module's test masks (DESIGN: from the
            masks, not hard-coded), for any data module whose samples carry masks.
        n_logged_images: validation images shown in TensorBoard (input, reconstruction, error map).
    """

    method_name = "autoencoder"
    primary_score = f"map_mean/{SUM}"

    def __init__(
        self,
        latent_channels: int = 32,
        lr: float = 1e-4,
        image_size: int = PAPER_IMAGE_SIZE,
        pretrained: bool = True,
        weights: str | None = None,
        min_anomaly_size: float | None = None,
        min_anomaly_size_file: str | None = None,
        n_logged_images: int = 8,
    ) -> None:
        super().__init__(lr)
        check_image_size(image_size)
        self.save_hyperparameters()
        trunk, spec = trainable_network(ENCODER, weights, pretrained)
        self.normalise = Normalise(spec)
        self.network = PixelShuffleAE(trunk, latent_channels)
        self.cca: CCAScorer | bool | None = None  # None: not set up yet; False: no CCA score
        self._logged_batch: dict[str, Tensor] | None = None
        self._val_losses: list[Tensor] = []

    def data_needs(self) -> DataNeeds:
        """Its own input size, and an augmentation without noise (Appendix Fig. 2)."""
        return replace(super().data_needs(), image_size=self.hparams.image_size, noise=False)

    def backbone_name(self) -> str:
        return ENCODER

    def run_name(self) -> str:
        latent, size = self.hparams.latent_channels, self.hparams.image_size
        name = ENCODER + self.weights_suffix() + ("" if latent == 32 else f"_latent-{latent}")
        return name + ("" if size == PAPER_IMAGE_SIZE else f"_{size}px")

    def setup(self, stage: str) -> None:
        super().setup(stage)
        dm = self.datamodule
        if dm is not None:
            check_image_size(dm.image_size, "--data.image_size")
            fraction = self.resolve_min_anomaly_size(dm.category, dm.test_samples)  # this data's own
            self.cca = CCAScorer(fraction) if fraction is not None else False

    def resolve_min_anomaly_size(self, category: str, test_samples: list) -> float | None:
        """The minimum anomaly fraction: by hand, from the category's JSON file, or from the test masks.

        ``None`` (with a warning: no CCA score) when the test set has no non-empty mask.
        """
        if self.hparams.min_anomaly_size is not None:
            return self.hparams.min_anomaly_size
        path = self.hparams.min_anomaly_size_file
        if path is not None:
            return read_min_anomaly_size(path.format(category=category), category)
        masks = [s.mask for s in test_samples if s.label == 1 and s.mask is not None]
        try:
            return min_anomaly_fraction(load_mask(mask) for mask in masks)[0]
        except UserError:  # an unreadable mask (a ValueError too) is an error, not a missing one
            raise
        except ValueError:
            warnings.warn(
                f"category '{category}' has no ground-truth masks: the CCA score is left out (pass "
                "--model.min_anomaly_size FRACTION to have it); map_mean is scored as usual",
                stacklevel=2,
            )
            return None

    # ------------------------------------------------------------ training
    def forward(self, images: Tensor) -> Tensor:
        """Reconstructions in [0, 1] of uint8 or [0, 1] float images."""
        return self.network(self.normalise(images))

    def reconstruct(self, batch: dict) -> tuple[Tensor, Tensor]:
        """(target images in [0, 1], reconstructions)."""
        return unit_images(batch["image"]), self(batch["image"])

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        target, reconstruction = self.reconstruct(batch)
        loss = F.mse_loss(reconstruction, target)
        self.log("train/loss", loss, on_step=True, on_epoch=True, batch_size=len(target))
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val_losses = []

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        target, reconstruction = self.reconstruct(batch)
        self._val_losses.append(error_map(reconstruction, target).mean(dim=(1, 2)).detach().float().cpu())
        if batch_idx == 0:
            n = self.hparams.n_logged_images
            self._logged_batch = {"input": target[:n], "reconstruction": reconstruction[:n]}

    def on_validation_epoch_end(self) -> None:
        """``val/loss``: the MSE over every held-out image, each counted once (gathered under DDP)."""
        losses = gather_rows({"loss": torch.cat(self._val_losses) if self._val_losses else torch.empty(0)})
        if losses["loss"].numel():
            self.log("val/loss", losses["loss"].mean())  # the same on every process: nothing to sync
        writer = self.tensorboard()
        if writer is None or self._logged_batch is None or not self.trainer.is_global_zero:
            return
        images = self._logged_batch
        errors = error_map(images["reconstruction"], images["input"])[:, None]
        errors = errors / errors.amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-12)
        step = self.current_epoch
        writer.add_images("val/input", images["input"].float().cpu(), step)
        writer.add_images("val/reconstruction", images["reconstruction"].float().cpu(), step)
        writer.add_images("val/error_map", errors.float().cpu(), step)
        self._logged_batch = None

    # ------------------------------------------------------------------ score
    def score_batch(self, batch: dict) -> dict[str, Tensor]:
        if self.cca is None:
            raise UserError("the autoencoder has no minimum anomaly size: run it through a trainer with data")
        target, reconstruction = self.reconstruct(batch)
        maps = error_map(reconstruction, target)
        scores = {f"map_mean/{SUM}": maps.mean(dim=(1, 2))}
        if self.cca:  # False: no masks to take the minimum anomaly size from
            scores[f"cca/{SUM}"] = self.cca(maps).to(maps.device)
        return scores

    def extra_results(self) -> dict:
        return {
            **super().extra_results(),
            "min_anomaly_size": self.cca.min_fraction if self.cca else None,
            "latent_channels": self.hparams.latent_channels,
        }


def check_image_size(size: int | None, option: str = "image_size") -> None:
    """:class:`UserError` unless the encoder's five halvings divide ``size`` (``None``: not set)."""
    if size is not None and (size % DOWNSAMPLING or size < DOWNSAMPLING):
        raise UserError(f"the autoencoder's {option} must be a multiple of {DOWNSAMPLING}, got {size}")


def error_map(reconstruction: Tensor, target: Tensor) -> Tensor:
    """Per-pixel squared error averaged over the channels: (B, H, W)."""
    return (reconstruction.float() - target.float()).pow(2).mean(dim=1)
