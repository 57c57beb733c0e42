"""One-class SVM per level on the pooled features of a frozen ImageNet backbone (Table V, VIII).

Per level, sklearn ``OneClassSVM(kernel="rbf", gamma="scale", nu=0.5)`` is fitted
to the training images' features; an image's score at a level is
``-decision_function`` (higher = more anomalous) and ``ocsvm/sum`` adds the levels.

Unlike the Gaussian, which streams moments, the SVM needs every training
feature vector at once: ``training_step`` stores them (float32, on the CPU) and
``on_train_end`` fits. Memory grows with images × epochs × feature width, so it
is checked against ``memory_limit_gb`` before training starts.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as dist
from sklearn.svm import OneClassSVM
from torch import Tensor

from anomaly.errors import UserError
from anomaly.methods.base import SUM
from anomaly.methods.features import FeatureMethod

SCORE_TYPE = "ocsvm"
BYTES_PER_VALUE = 4  # float32


def gather_features(local: list[Tensor]) -> list[Tensor]:
    """Every process's stored features per level, concatenated in rank order (as is without DDP)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return local
    gathered: list[list[Tensor] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    return [torch.cat([g[i] for g in gathered if g is not None]) for i in range(len(local))]


class OneClassSVMAD(FeatureMethod):
    """RBF one-class SVM per level; stores the training features it is fitted to.

    Args:
        backbone, levels, weights, pretrained: as for :class:`~anomaly.methods.gaussian.GaussianAD`.
        nu: the SVM's ``nu`` (the paper: 0.5).
        gamma: the RBF kernel's ``gamma`` (``"scale"``: 1 / (D · Var(X))).
        memory_limit_gb: the most memory the stored training features may take
            (training images × epochs × summed level widths × 4 bytes).
    """

    method_name = "ocsvm"
    primary_score = f"{SCORE_TYPE}/{SUM}"

    def __init__(
        self,
        backbone: str = "efficientnet-lite0",
        levels: Sequence[int] | None = None,
        weights: str | None = None,
        pretrained: bool = True,
        nu: float = 0.5,
        gamma: str | float = "scale",
        memory_limit_gb: float = 8.0,
    ) -> None:
        super().__init__(backbone, levels, weights, pretrained)
        if not 0.0 < nu <= 1.0:
            raise UserError(f"nu must be in (0, 1], got {nu}")
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.svms: list[OneClassSVM] = []
        self._stored: list[list[Tensor]] = []
        self.n_fit_vectors = 0

    def configure_optimizers(self) -> None:
        return None

    # -------------------------------------------------------------------- fit
    def required_bytes(self, n_images: int, epochs: int) -> int:
        """Memory the stored training features take."""
        return n_images * epochs * sum(self.level_dims) * BYTES_PER_VALUE

    def check_memory(self, n_images: int, epochs: int | None) -> None:
        limit = self.hparams.memory_limit_gb * 1e9
        if epochs is None or epochs < 0:
            raise UserError(
                "the oc-SVM stores its training features: set --trainer.max_epochs to a finite number"
            )
        needed = self.required_bytes(n_images, epochs)
        if needed > limit:
            raise UserError(
                f"the oc-SVM would store {needed / 1e9:.2f} GB of training features ({n_images} images x "
                f"{epochs} epochs x {sum(self.level_dims)} values x 4 bytes), over the "
                f"{self.hparams.memory_limit_gb} GB limit: lower --trainer.max_epochs, choose fewer "
                "--model.levels, or raise --model.memory_limit_gb"
            )

    def on_train_start(self) -> None:
        self.check_memory(len(self.datamodule.fit_samples), self.trainer.max_epochs)
        self._stored = [[] for _ in self.levels]
        self.svms = []

    def training_step(self, batch: dict, batch_idx: int) -> None:
        with torch.no_grad():
            for store, feats in zip(self._stored, self.batch_features(batch), strict=True):
                store.append(feats.detach().float().cpu())

    def on_train_end(self) -> None:
        """Fit one SVM per level on all processes' stored features, then free them."""
        features = gather_features([torch.cat(store) for store in self._stored])
        self.svms = [self.fit_svm(x) for x in features]
        self.n_fit_vectors = int(features[0].shape[0])
        self._stored = []

    def fit_svm(self, features: Tensor) -> OneClassSVM:
        svm = OneClassSVM(kernel="rbf", gamma=self.hparams.gamma, nu=self.hparams.nu)
        return svm.fit(features.double().numpy())

    # ------------------------------------------------------------------ score
    def score_batch(self, batch: dict) -> dict[str, Tensor]:
        return self.score_features(self.batch_features(batch))

    @torch.no_grad()
    def score_features(self, features: list[Tensor]) -> dict[str, Tensor]:
        """``{"ocsvm/<level>": -decision_function, "ocsvm/sum": their sum}``."""
        if len(self.svms) != len(self.levels):
            raise UserError("the oc-SVM is not fitted yet: run fit before test")
        columns: dict[str, Tensor] = {}
        for level, svm, feats in zip(self.levels, self.svms, features, strict=True):
            values = -svm.decision_function(feats.double().cpu().numpy())
            columns[f"{SCORE_TYPE}/{level}"] = torch.from_numpy(np.asarray(values, dtype=np.float64))
        columns[f"{SCORE_TYPE}/{SUM}"] = sum(columns[f"{SCORE_TYPE}/{level}"] for level in self.levels)
        return columns

    def extra_results(self) -> dict:
        return {
            "levels": self.levels,
            "level_dims": {str(lv): d for lv, d in zip(self.levels, self.level_dims, strict=True)},
            "n_fit_vectors": self.n_fit_vectors,
            "n_support_vectors": {
                str(lv): int(s.support_.size) for lv, s in zip(self.levels, self.svms, strict=True)
            },
        }
