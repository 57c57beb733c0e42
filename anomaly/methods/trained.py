"""What the methods trained by gradient descent share (autoencoder, supervised classifier).

* trainable copies of the registry's ImageNet networks: the same builders and
  weight loading as the frozen feature extractors (:mod:`anomaly.backbones`),
  but the plain network is taken out of its frozen wrapper and unfrozen, so the
  shared extractor class keeps its behaviour;
* Adam at the paper's learning rate 1e-4 (Section IV-E), shuffled training batches;
* model selection: after fitting, the best checkpoint of the trainer's
  ``ModelCheckpoint`` (if any) is loaded back, so that ``test`` scores the
  selected model and not the last epoch's;
* several devices (Lightning's DDP): the training loader is padded so that every
  process takes the same number of steps; validation and test images are each
  scored once, on one process, and the scores gathered before any metric.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from pytorch_lightning.loggers import TensorBoardLogger
from torch import Tensor, nn

from anomaly.backbones import BackboneSpec, build_backbone
from anomaly.backbones.extractor import normalise_images
from anomaly.data.needs import DataNeeds
from anomaly.methods.base import AnomalyMethod


def trainable_network(name: str, weights: str | None, pretrained: bool) -> tuple[nn.Module, BackboneSpec]:
    """The registry's network ``name`` with its ImageNet weights (or random ones), unfrozen, and its spec."""
    extractor = build_backbone(name, weights=weights, pretrained=pretrained)
    net = extractor.net
    net.requires_grad_(True)
    net.train()
    return net, extractor.spec


class Normalise(nn.Module):
    """uint8 0..255 or float 0..1 images -> float images normalised with a backbone's mean and std."""

    def __init__(self, spec: BackboneSpec) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: Tensor) -> Tensor:
        return normalise_images(images, self.mean, self.std)


class TrainedMethod(AnomalyMethod):
    """An :class:`AnomalyMethod` whose network is trained with Adam and selected by a checkpoint."""

    def __init__(self, lr: float = 1e-4) -> None:
        super().__init__()
        self.lr = lr
        self.selected_checkpoint: str | None = None
        self.selected_score: float | None = None

    def data_needs(self) -> DataNeeds:
        """Shuffled training images, padded to the same number of gradient steps on every process."""
        return replace(super().data_needs(), shuffle=True, pad=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=self.lr)

    def on_fit_end(self) -> None:
        """Load the best checkpoint of the trainer's ModelCheckpoint back into this module."""
        callback = self.trainer.checkpoint_callback
        best = getattr(callback, "best_model_path", "") if callback is not None else ""
        if not best or not Path(best).is_file():
            return
        checkpoint = torch.load(best, map_location=self.device, weights_only=False)
        self.load_state_dict(checkpoint["state_dict"])
        self.selected_checkpoint = best
        score = callback.best_model_score
        self.selected_score = None if score is None else float(score)

    def extra_results(self) -> dict:
        return {
            "epochs": self.current_epoch,
            "selected_checkpoint": self.selected_checkpoint,
            "selected_score": self.selected_score,
            "selection_metric": getattr(self.trainer.checkpoint_callback, "monitor", None),
        }

    def tensorboard(self):
        """The TensorBoard ``SummaryWriter`` when a TensorBoardLogger is attached, else None."""
        logger = self.logger
        return logger.experiment if isinstance(logger, TensorBoardLogger) else None
