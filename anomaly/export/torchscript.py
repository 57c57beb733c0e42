"""TorchScript export of the whole detector (traced at the detector's fixed input size).

Recent PyTorch releases deprecate TorchScript in favour of ``torch.export``; the
file still loads with ``torch.jit.load`` without this package. ONNX is the
longer-lived format.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from anomaly.detector.api import GaussianDetector
from anomaly.export.module import prepare_export


def export_torchscript(detector: GaussianDetector, path: str | Path, input_dtype: str = "uint8") -> Path:
    """Write a traced module: ``(images) -> (score, level_scores[, map])``, as :class:`ExportedDetector`.

    The detector's metadata is stored as the extra file ``detector.json``.
    """
    module, path, example = prepare_export(detector, path, input_dtype)
    with torch.no_grad(), warnings.catch_warnings():
        # the backbone's SAME padding is fixed for this input size on purpose (see module.py)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=r".*torch\.jit.* is deprecated", category=FutureWarning)
        traced = torch.jit.trace(module, (example,), check_trace=False)
        torch.jit.save(traced, str(path), _extra_files={"detector.json": json.dumps(detector.metadata())})
    return path
