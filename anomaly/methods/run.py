"""How a run is wired: the data obey the model's declaration, then fit, then calibration.

:func:`fit` is the fit of every run (``anomaly fit``, the experiment grids, the benchmarks):

1. the model's :meth:`~anomaly.methods.base.AnomalyMethod.data_needs` are handed to the data
   module, once, before any set-up;
2. ``trainer.fit``: the model streams (or trains on) the fitting images and finalises its fit;
3. calibration, an explicit step of its own: the model's
   :meth:`~anomaly.methods.base.AnomalyMethod.calibrate` is given a function that scores the
   fold's held-out normal images with the fitted model. It runs ``trainer.predict`` on the
   held-out loader (the trainer's device, precision and processes, each process its own share
   of the images) and gathers the columns of all processes, so that every process sets the
   same threshold. A function rather than the scores themselves, because a model may need
   them more than once (level weighting standardises the levels on the held-out scores, and the
   threshold is then set on the weighted scores) or not at all (a method without calibration
   never scores them). ``predict`` rather than ``validate``: validation hooks also run inside
   ``trainer.fit`` (the trained baselines select their checkpoint on the held-out loss), before a
   statistics method has finalised its fit.
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch import Tensor

from anomaly.data.datamodule import AnomalyDataModule
from anomaly.methods.base import AnomalyMethod
from anomaly.methods.distributed import gather_rows


def fit(trainer: pl.Trainer, model: AnomalyMethod, datamodule: AnomalyDataModule) -> None:
    """Configure the data for ``model``, fit it, and calibrate it on the held-out images."""
    datamodule.configure(model.data_needs(), trainer)
    trainer.fit(model, datamodule=datamodule)
    model.calibrate(lambda: holdout_scores(trainer, model, datamodule))


def holdout_scores(
    trainer: pl.Trainer, model: AnomalyMethod, datamodule: AnomalyDataModule
) -> dict[str, Tensor] | None:
    """Score columns of the fold's held-out normal images, over all processes (None without any)."""
    if not datamodule.holdout_samples:
        return None
    batches = trainer.predict(model, dataloaders=datamodule.holdout_dataloader(), return_predictions=True)
    names = list(batches[0]) if batches else []
    return gather_rows({name: torch.cat([batch[name].cpu() for batch in batches]) for name in names})


__all__ = ["fit", "holdout_scores"]
