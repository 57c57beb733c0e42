"""Supervised fine-tuning of an ImageNet classifier with one anomaly logit (Table V, VIII).

An upper bound, not a deployable detector: it trains on anomalies. The data are
the category's pooled train and test images in the stratified three-way split of
:class:`~anomaly.data.supervised.StratifiedMVTecDataModule`. The network's
classification layer is replaced by one logit, trained with binary
cross-entropy and Adam (lr 1e-4), with the category's augmentation; the model is
selected by the validation part's AUROC (``val/auroc``, via the trainer's
``ModelCheckpoint``; ``EarlyStopping`` ends training). The score is the logit.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from anomaly.data.needs import DataNeeds
from anomaly.errors import UserError
from anomaly.evaluation.metrics import image_auroc
from anomaly.methods.base import SUM
from anomaly.methods.distributed import gather_rows
from anomaly.methods.trained import Normalise, TrainedMethod, trainable_network

SCORE_TYPE = "logit"


def replace_head(net: nn.Module, name: str) -> nn.Module:
    """Swap the ImageNet classifier (torchvision ``fc``, efficientnet_pytorch ``_fc``) for one logit."""
    attribute = "fc" if hasattr(net, "fc") else "_fc"
    old = getattr(net, attribute, None)
    if not isinstance(old, nn.Linear):
        raise UserError(f"backbone {name} has no final linear layer to fine-tune")
    setattr(net, attribute, nn.Linear(old.in_features, 1))
    return net


class FineTunedClassifier(TrainedMethod):
    """An ImageNet classifier fine-tuned to one anomaly logit.

    Args:
        backbone: the paper uses ``resnet18``, ``resnet34``, ``efficientnet-b0``,
            ``efficientnet-b2``, ``efficientnet-b4``; ``efficientnet-lite0/1/2``
            load offline. Any name of :data:`anomaly.backbones.BACKBONES` works.
        lr: Adam's learning rate (the paper: 1e-4).
        weights: a local state-dict file instead of the usual download.
        pretrained: ``False`` (tests only) starts from random weights.
    """

    method_name = "classifier"
    primary_score = f"{SCORE_TYPE}/{SUM}"

    def __init__(
        self,
        backbone: str = "resnet18",
        lr: float = 1e-4,
        weights: str | None = None,
        pretrained: bool = True,
    ) -> None:
        super().__init__(lr)
        self.save_hyperparameters()
        net, spec = trainable_network(backbone, weights, pretrained)
        self.spec = spec
        self.normalise = Normalise(spec)
        self.network = replace_head(net, backbone)
        self._val_rows: dict[str, list[Tensor]] = {"logit": [], "label": []}

    def data_needs(self) -> DataNeeds:
        return replace(super().data_needs(), image_size=self.spec.image_size)

    def setup(self, stage: str) -> None:
        super().setup(stage)
        dm = self.datamodule
        if dm is not None and {s.label for s in dm.fit_samples} != {0, 1}:
            raise UserError(
                "the classifier trains on normal and anomalous images: use the pooled split "
                "--data.class_path anomaly.data.supervised.StratifiedMVTecDataModule"
            )

    def forward(self, images: Tensor) -> Tensor:
        """The anomaly logit (B,) of uint8 or [0, 1] float images."""
        return self.network(self.normalise(images)).squeeze(1)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        logits = self(batch["image"])
        loss = F.binary_cross_entropy_with_logits(logits, batch["label"].float())
        self.log("train/loss", loss, on_step=True, on_epoch=True, batch_size=len(logits))
        return loss

    # -------------------------------------------------------------- validation
    def on_validation_epoch_start(self) -> None:
        self._val_rows = {"logit": [], "label": []}

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        logits = self(batch["image"])
        self._val_rows["logit"].append(logits.detach().float().cpu())
        self._val_rows["label"].append(batch["label"].detach().cpu())

    def on_validation_epoch_end(self) -> None:
        """``val/loss`` and ``val/auroc`` over every validation image, each counted once (gathered under
        DDP; every process takes part in the gathering, also one that had no image)."""
        empty = {"logit": torch.empty(0), "label": torch.empty(0, dtype=torch.long)}
        rows = gather_rows({k: torch.cat(v) if v else empty[k] for k, v in self._val_rows.items()})
        if not rows["logit"].numel():
            return
        loss = F.binary_cross_entropy_with_logits(rows["logit"], rows["label"].float())
        # every process holds the same gathered rows, so the values need no further syncing
        self.log("val/loss", loss)
        self.log("val/auroc", image_auroc(rows["logit"], rows["label"]))

    # ------------------------------------------------------------------ score
    def score_batch(self, batch: dict) -> dict[str, Tensor]:
        return {f"{SCORE_TYPE}/{SUM}": self(batch["image"])}

    def extra_results(self) -> dict:
        dm = self.datamodule
        return {
            **super().extra_results(),
            "n_val": len(dm.holdout_samples) if dm is not None else None,
            "split": "pooled StratifiedKFold(5, shuffle=True, random_state=0): val part i, test part i+1",
        }
