"""A callback that holds a fit at its first batch, for tests that signal a run mid-fit.

``--trainer.callbacks+=tests.hold_fit.HoldFit`` with ``HOLD_FIT_MARKER=<file>`` in the environment:
the run creates that file once it is fitting and then waits there for a signal, so that the signal
arrives mid-fit whatever the machine's load. Without a signal it fails after ``HOLD_FIT_TIMEOUT``.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytorch_lightning as pl

MARKER = "HOLD_FIT_MARKER"
TIMEOUT = 300.0


class HoldFit(pl.Callback):
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int):
        if batch_idx:
            return
        Path(os.environ[MARKER]).touch()
        # Waiting on an event that nothing sets: a signal's handler interrupts the wait by raising.
        if not threading.Event().wait(TIMEOUT):
            raise RuntimeError(f"held at the first batch for {TIMEOUT:.0f} s and no signal came")
