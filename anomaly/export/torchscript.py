"""TorchScript export of the whole detector (traced at the detector's fixed input size).

Recent PyTorch releases deprecate TorchScript in favour of ``torch.export``; the
file still loads with ``torch.jit.load`` without this package. ONNX is the
longer-lived format.
"""

from __future__ import annotations

import io
import json
import warnings
import zipfile
from pathlib import Path

import torch

from anomaly.atomic import write_bytes_atomic
from anomaly.detector.api import GaussianDetector
from anomaly.export.module import prepare_export

METADATA_FILE = "detector.json"


def export_torchscript(detector: GaussianDetector, path: str | Path, input_dtype: str = "uint8") -> Path:
    """Write a traced module: ``(images) -> (score, level_scores[, map])``, as :class:`ExportedDetector`.

    The detector's metadata is stored as the extra file ``detector.json``. The archive is
    built in memory and written whole (:mod:`anomaly.atomic`): a full disk or a read-only
    folder is an :class:`OSError` naming ``path``, and an earlier file survives any failure.
    """
    module, path, example = prepare_export(detector, path, input_dtype)
    with torch.no_grad(), warnings.catch_warnings():
        # the backbone's SAME padding is fixed for this input size on purpose (see module.py)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=r".*torch\.jit.* is deprecated", category=FutureWarning)
        traced = torch.jit.trace(module, (example,), check_trace=False)
        buffer = io.BytesIO()
        torch.jit.save(traced, buffer, _extra_files={METADATA_FILE: json.dumps(detector.metadata())})
    return write_bytes_atomic(path, buffer.getvalue())


def is_torchscript_export(path: Path) -> bool:
    """Whether ``path`` is a TorchScript archive this package exported (it holds ``detector.json``)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith(f"/extra/{METADATA_FILE}") for name in archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False
