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
taken from the test masks, knowledge a deployed detector would not have.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from anomaly.errors import UserError
from anomaly.evaluation.connected_components import CCAScorer, read_min_anomaly_size
from anomaly.methods.autoencoder.network import PixelShuffleAE
from anomaly.methods.base import SUM
from anomaly.methods.trained import Normalise, TrainedMethod, to_unit, trainable_network

ENCODER = "resnet18"
DOWNSAMPLING = 32


class PixelShuffleAutoencoder(TrainedMethod):
    """ResNet-18 encoder, pixel-shuffle decoder, MSE loss; map-mean and CCA scores.

    Args:
        latent_channels: channels of the bottleneck (the paper: 32).
        lr: Adam's learning rate (the paper: 1e-4).
        image_size: square input size, a multiple of 32 (the paper: 224).
        pretrained: start the encoder from ImageNet weights; ``False`` (tests only) starts at random.
        weights: a local ResNet-18 state-dict file instead of torchvision's download.
        min_anomaly_size: the category's minimum anomaly size as a fraction of the image, by hand.
        min_anomaly_size_file: the JSON written by ``python -m anomaly.tools.min_anomaly_size``;
            ``{category}`` is replaced by the data's category. Ignored when ``min_anomaly_size`` is set.
        n_logged_images: validation images shown in TensorBoard (input, reconstruction, error map).
    """

    method_name = "autoencoder"
    primary_score = f"map_mean/{SUM}"

    def __init__(
        self,
        latent_channels: int = 32,
        lr: float = 1e-4,
        image_size: int = 224,
        pretrained: bool = True,
        weights: str | None = None,
        min_anomaly_size: float | None = None,
        min_anomaly_size_file: str | None = "min_anomaly_sizes/{category}.json",
        n_logged_images: int = 8,
    ) -> None:
        super().__init__(lr)
        if image_size % DOWNSAMPLING or image_size < DOWNSAMPLING:
            raise UserError(
                f"the autoencoder's image_size must be a multiple of {DOWNSAMPLING}, got {image_size}"
            )
        self.save_hyperparameters()
        trunk, spec = trainable_network(ENCODER, weights, pretrained)
        self.normalise = Normalise(spec)
        self.network = PixelShuffleAE(trunk, latent_channels)
        self.cca: CCAScorer | None = None
        self._logged_batch: dict[str, Tensor] | None = None

    @property
    def input_size(self) -> int:
        return self.hparams.image_size

    def backbone_name(self) -> str:
        return ENCODER

    def run_name(self) -> str:
        latent = self.hparams.latent_channels
        return ENCODER + self.weights_suffix() + ("" if latent == 32 else f"_latent-{latent}")

    def setup(self, stage: str) -> None:
        super().setup(stage)
        dm = self.datamodule
        if dm is not None:
            dm.augment_noise = False
            self.cca = CCAScorer(self.resolve_min_anomaly_size(dm.category))

    def resolve_min_anomaly_size(self, category: str) -> float:
        """The minimum anomaly fraction: given by hand, or read from the category's JSON file."""
        if self.hparams.min_anomaly_size is not None:
            return self.hparams.min_anomaly_size
        path = self.hparams.min_anomaly_size_file
        if path is None:
            raise UserError(
                "the CCA score needs the category's minimum anomaly size: pass --model.min_anomaly_size "
                "FRACTION or --model.min_anomaly_size_file (see python -m anomaly.tools.min_anomaly_size)"
            )
        return read_min_anomaly_size(path.format(category=category), category)

    # ------------------------------------------------------------ training
    def forward(self, images: Tensor) -> Tensor:
        """Reconstructions in [0, 1] of uint8 or [0, 1] float images."""
        return self.network(self.normalise(images))

    def reconstruct(self, batch: dict) -> tuple[Tensor, Tensor]:
        """(target images in [0, 1], reconstructions)."""
        return to_unit(batch["image"]), self(batch["image"])

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        target, reconstruction = self.reconstruct(batch)
        loss = F.mse_loss(reconstruction, target)
        self.log("train/loss", loss, on_step=True, on_epoch=True, batch_size=len(target))
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        target, reconstruction = self.reconstruct(batch)
        loss = F.mse_loss(reconstruction, target)
        self.log("val/loss", loss, on_epoch=True, sync_dist=True, batch_size=len(target))
        if batch_idx == 0:
            n = self.hparams.n_logged_images
            self._logged_batch = {"input": target[:n], "reconstruction": reconstruction[:n]}

    def on_validation_epoch_end(self) -> None:
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
        return {f"map_mean/{SUM}": maps.mean(dim=(1, 2)), f"cca/{SUM}": self.cca(maps).to(maps.device)}

    def extra_results(self) -> dict:
        return {
            **super().extra_results(),
            "min_anomaly_size": None if self.cca is None else self.cca.min_fraction,
            "latent_channels": self.hparams.latent_channels,
        }


def error_map(reconstruction: Tensor, target: Tensor) -> Tensor:
    """Per-pixel squared error averaged over the channels: (B, H, W)."""
    return (reconstruction.float() - target.float()).pow(2).mean(dim=1)
