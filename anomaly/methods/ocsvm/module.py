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
from sklearn.svm import OneClassSVM
from torch import Tensor

from anomaly.errors import UserError
from anomaly.methods.base import SUM
from anomaly.methods.distributed import gather_rows
from anomaly.methods.features import FeatureMethod
from anomaly.stats.distances import level_columns

SCORE_TYPE = "ocsvm"
BYTES_PER_VALUE = 4  # float32
LIBSVM_CACHE_MB = 200  # sklearn's default kernel cache


class OneClassSVMAD(FeatureMethod):
    """RBF one-class SVM per level; stores the training features it is fitted to.

    Args:
        backbone, levels, weights, pretrained: as for :class:`~anomaly.methods.gaussian.GaussianAD`.
        nu: the SVM's ``nu`` (the paper: 0.5).
        gamma: the RBF kernel's ``gamma`` (``"scale"``: 1 / (D · Var(X))).
        memory_limit_gb: the most memory the fit may take: the stored float32 training
            features, the float64 copy of the widest level that libsvm is given, the
            float64 support vectors (at least a fraction ``nu`` of the vectors) and
            libsvm's kernel cache (see :meth:`required_bytes`).
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
        """An upper estimate of the fit's peak memory, for ``n = images × epochs`` vectors.

        The stored float32 features of every level (``4 n ΣD``), while one level at a
        time is concatenated (``4 n D``) and copied to float64 for libsvm (``8 n D``),
        plus the float64 support vectors kept for every fitted level (at most all of
        them: ``8 n ΣD``) and libsvm's kernel cache.
        """
        n, widest, total = n_images * epochs, max(self.level_dims), sum(self.level_dims)
        return n * (BYTES_PER_VALUE * total + 12 * widest + 8 * total) + LIBSVM_CACHE_MB * 2**20

    def check_memory(self, n_images: int, epochs: int | None) -> None:
        limit = self.hparams.memory_limit_gb * 1e9
        if epochs is None or epochs < 0:
            raise UserError(
                "the oc-SVM stores its training features: set --trainer.max_epochs to a finite number"
            )
        needed = self.required_bytes(n_images, epochs)
        if needed > limit:
            raise UserError(
                f"the oc-SVM fit could take up to {needed / 1e9:.2f} GB ({n_images} images x {epochs} "
                f"epochs of {sum(self.level_dims)} values, stored, copied for libsvm and kept as support "
                f"vectors), over the {self.hparams.memory_limit_gb} GB limit: lower --trainer.max_epochs, "
                "choose fewer --model.levels, or raise --model.memory_limit_gb"
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
        """Fit one SVM per level on all processes' stored features, freeing each level's as it goes."""
        self.svms = []
        for index in range(len(self._stored)):
            chunks, self._stored[index] = self._stored[index], []
            features = gather_rows({"x": torch.cat(chunks)})["x"]
            del chunks
            self.n_fit_vectors = int(features.shape[0])
            self.svms.append(self.fit_svm(features))
        self._stored = []

    def fit_svm(self, features: Tensor) -> OneClassSVM:
        hp = self.hparams
        svm = OneClassSVM(kernel="rbf", gamma=hp.gamma, nu=hp.nu, cache_size=LIBSVM_CACHE_MB)
        return svm.fit(features.double().numpy())

    # ------------------------------------------------------------------ score
    def score_batch(self, batch: dict) -> dict[str, Tensor]:
        return self.score_features(self.batch_features(batch))

    @torch.no_grad()
    def score_features(self, features: list[Tensor]) -> dict[str, Tensor]:
        """``{"ocsvm/<level>": -decision_function, "ocsvm/sum": their sum}``."""
        if len(self.svms) != len(self.levels):
            raise UserError("the oc-SVM is not fitted yet: run fit before test")
        per_level = [
            {SCORE_TYPE: torch.from_numpy(np.asarray(-svm.decision_function(f.double().cpu().numpy())))}
            for svm, f in zip(self.svms, features, strict=True)
        ]
        return level_columns(self.levels, per_level)

    def extra_results(self) -> dict:
        return {
            "levels": self.levels,
            "level_dims": {str(lv): d for lv, d in zip(self.levels, self.level_dims, strict=True)},
            "n_fit_vectors": self.n_fit_vectors,
            "n_support_vectors": {
                str(lv): int(s.support_.size) for lv, s in zip(self.levels, self.svms, strict=True)
            },
        }
