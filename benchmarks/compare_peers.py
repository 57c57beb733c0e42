"""Our detectors next to anomalib's DFM, PaDiM and PatchCore, on the same images and lite0 weights.

Two datasets, every method on the same fitting / held-out / test images:

* MVTec AD ``bottle``: the paper's 5-fold protocol (four fifths of ``train/good`` fit, the
  fifth is held out, the whole test set is scored); its defective test images have masks.
* Magnetic-Tile-Defect: a seeded 20% of ``MT_Free`` plus every defect image is the test set
  (``FolderDataModule``, ``test_normal_fraction 0.2``), the other 80% is split into the same
  5 folds; masks lie beside the images. The protocol is repeated for every ``--split-seeds``
  seed, and means and SEMs are over all (seed, fold) runs.

Methods (``--methods`` picks by name; ``--help`` lists them):

* ``ours: NAME`` for every ``--configs NAME`` (default: ``paper``, the paper's global pooling;
  ``recommended``; ``spatial_weighting``; ``spatial_grid``; ``spatial_cells``; ``spatial_fine``;
  ``spatial_grid_maps``): the model class and ``init_args`` of the shipped config (or of a config
  file), built as ``anomaly fit`` builds them. A new shipped config is one more ``--configs NAME``.
  A config on this script's backbone whose pooling is global or a k x k grid reads the cached
  features; any other (another backbone, another pooling, tiles) scores the images through its
  detector's own ``features``, and its fit time then includes that backbone pass.
* ``ours: cells 4x4, holdout weighting``: a SpatialGaussianAD configuration no config ships.
* ``anomalib DFM`` / ``anomalib PaDiM`` / ``anomalib PatchCore 10%`` / ``anomalib PatchCore 1%``
  (``pip install -e .[bench]``), their torch models with their default settings, except that
  their timm feature extractor is replaced by our efficientnet-lite0 extractor (the same ImageNet
  weights as ours; timm's lite0 checkpoint would need a hub download). The timm layer names map
  onto our levels by stride: ``blocks.1`` = 3, ``blocks.2`` = 4, ``blocks.4`` = 6 (strides 4, 8,
  16, as resnet's layer1-3 in their defaults). PaDiM keeps 100 random channels of the 176 (its
  resnet18 default is 100 of 448); DFM pools ``blocks.4`` by 4 (its default ``layer3``-like
  stride-16 layer) and scores by feature reconstruction error at 97% PCA variance. PatchCore
  takes ``blocks.2`` and ``blocks.4`` for its wide_resnet50 ``layer2`` and ``layer3`` (strides 8
  and 16) and runs anomalib's own forward: 3x3 average pooling, the coarser map upsampled to the
  finer, k-center-greedy coreset at a sampling ratio of 0.1 (its default) or 0.01, 1-NN patch
  distances, the image score reweighted over 9 neighbours, a Gaussian-blurred map.

Every image passes the backbone once; the pooled features (global and 4 x 4) and the unpooled
maps of levels 3-8 are cached in memory (and on disk with ``--cache``, read back memory-mapped),
and every method and split fits and scores from them. For every method that makes a map, pixel
AUROC and PRO (up to FPR 0.3, :mod:`anomaly.evaluation.pro`) are computed at ``--pixel-size`` px
on the ``--pixel-folds`` folds. Per method and fold: the seconds to fit (from the cached
features, model construction included) and to score the test set, and the size of the fitted
state written as safetensors (ours: the detector's tensors, as in ``detector.safetensors``
without backbone weights; anomalib's: its torch model's ``state_dict`` without the feature
extractor, e.g. PatchCore's memory bank). Throughput (images/s) is measured separately end to
end, from uint8 images through the backbone to the image scores (and the maps for the methods
that make them), on one batch of test images, best of ``--repeats``.

Memory: ``--isolate`` runs every (dataset, method) in a process of its own (after one process
has built the feature cache) and reports that process's peak RSS (``ru_maxrss``; about 1 GB of
it is importing torch and the project, and the 32-image throughput batch through the backbone
takes it to about 1.7 GB whatever the method), and the process's peak RSS while the method fits
and scores, before the throughput batch (``fit_score_peak_rss_bytes``: the peak is reset to the
current RSS, baseline included, just before the fit). ``--max-rss-gb`` kills a method's process
group above that RSS (summed over the group, polled each second) and ``--time-limit`` after that
many seconds: the table then says what stopped it.

``--out`` is written whole at the end (its first key ``written_by`` names this script); an
existing file that this script did not write is refused before any work, unless ``--overwrite``.
The feature cache's files and the isolated processes' logs are written whole too.

    python benchmarks/compare_peers.py \\
        --mvtec /data/mvtec_ad --magnetic-tile /data/magnetic_tile \\
        --cache runs/compare_peers_cache --out runs/compare_peers.json
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from anomaly.atomic import open_atomically, replaced_atomically
from anomaly.backbones import build_backbone
from anomaly.backbones.extractor import FeatureExtractor
from anomaly.configs import resolve_config
from anomaly.console import run_command
from anomaly.data import MVTecDataModule
from anomaly.data.datamodule import AnomalyDataModule
from anomaly.data.datasets import ImageDataset, Sample
from anomaly.data.folder import FolderDataModule
from anomaly.data.needs import DataNeeds
from anomaly.data.transforms import ImagePipeline
from anomaly.detector.io import model_tensors
from anomaly.errors import ArgumentsError
from anomaly.evaluation.aggregate import sem
from anomaly.evaluation.metrics import image_auroc
from anomaly.evaluation.pixel import upsample_maps
from anomaly.evaluation.pro import pixel_auroc_and_pro
from anomaly.methods.gaussian import GaussianAD
from anomaly.methods.spatial import SpatialGaussianAD
from anomaly.outputs import claim_json, write_json
from anomaly.pooling.grid_maps import GridFineCells

COMMAND = "benchmarks/compare_peers.py"
BACKBONE = "efficientnet-lite0"
TIMM_NAME = "efficientnet_lite0"
#: timm feature names of efficientnet_lite0 -> our 1-based levels (same channel widths and strides).
TIMM_LEVELS = {"blocks.1": 3, "blocks.2": 4, "blocks.4": 6}
#: Levels whose unpooled maps are cached (float16): the peers' three and the fine-map candidates.
MAP_LEVELS = (3, 4, 5, 6, 7, 8)
PADIM_LAYERS = ["blocks.1", "blocks.2", "blocks.4"]
PADIM_FEATURES = 100
DFM_LAYER = "blocks.4"
#: PatchCore's default wide_resnet50 ``layer2`` and ``layer3`` (strides 8, 16) mapped by stride.
PATCHCORE_LAYERS = ["blocks.2", "blocks.4"]
#: Coreset sampling ratios: anomalib's default (10%) and a cheaper 1%.
PATCHCORE_RATIOS = (0.1, 0.01)
#: Poolings whose inputs the feature cache holds (``Features.grid``); others run from the images.
CACHED_POOLINGS = ("global", "grid", "cells", "grid_maps")
GRID_SIZES = (4,)
FOLDS = 5
SCORE = "mahalanobis/sum"

#: Our configurations that no shipped config names: (label, SpatialGaussianAD keyword arguments).
OURS = [
    ("cells 4x4, holdout weighting", {"pooling": "cells", "grid_size": 4, "level_weighting": "holdout"}),
]
#: The shipped configs of this comparison (``--configs``): the paper's method, the recommended
#: detector, holdout level weighting, a 4x4 grid, 4x4 cells, 14x14 cells (fine maps), 7x7 grid maps.
CONFIGS = [
    "paper", "recommended", "spatial_weighting", "spatial_grid", "spatial_cells", "spatial_fine",
    "spatial_grid_maps",
]  # fmt: skip
BEST, FINE, GRID_MAPS = "spatial_grid", "spatial_fine", "spatial_grid_maps"
#: The peers' labels, in table order.
PEERS = ["anomalib DFM", "anomalib PaDiM"] + [f"anomalib PatchCore {r:.0%}" for r in PATCHCORE_RATIOS]
GB = 1e9


# ------------------------------------------------------------------------------------ features
@dataclass
class Features:
    """Cached per-image features of one dataset, rows in ``paths`` order."""

    paths: list[str]
    pooled: list[Tensor]  # per level (N, C)
    grids: dict[int, list[Tensor]]  # k -> per level (N, C, k, k)
    maps: dict[int, Tensor]  # level -> unpooled (N, C, H, W) float16
    masks: Tensor | None = None  # (N, 1, S, S) uint8, zeros where an image has no mask
    samples: list[Sample] | None = None  # the images themselves, for methods the cache cannot serve
    row: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.row = {p: i for i, p in enumerate(self.paths)}

    def rows(self, samples: list[Sample]) -> Tensor:
        return torch.tensor([self.row[s.path] for s in samples])

    def grid(self, level: int, k: int, rows: Tensor) -> Tensor:
        """A level's map of the given images average-pooled to ``(n, C, k, k)``."""
        if k == 1:  # the global average, as pooled from the full-precision map
            return self.pooled[level - 1][rows][..., None, None]
        if k in self.grids:
            return self.grids[k][level - 1][rows]
        return F.adaptive_avg_pool2d(self.maps[level][rows].float(), k)

    def timm_maps(self, names: list[str], rows: Tensor) -> dict[str, Tensor]:
        return {name: self.maps[TIMM_LEVELS[name]][rows].float() for name in names}


def image_loader(samples: list[Sample], size: int, masks: bool, batch_size: int) -> DataLoader:
    dataset = ImageDataset(samples, ImagePipeline(size), with_masks=masks)
    return DataLoader(dataset, batch_size=batch_size, num_workers=1)


def extract(extractor: FeatureExtractor, samples: list[Sample], masks: bool, batch_size: int) -> Features:
    """One backbone pass per image: global and grid pooling of all levels, the peers' unpooled maps."""
    pooled, grids, maps, mask_rows = [], {k: [] for k in GRID_SIZES}, [], []
    started = time.perf_counter()
    for i, batch in enumerate(image_loader(samples, extractor.image_size, masks, batch_size)):
        levels = extractor.feature_maps(batch["image"])
        pooled.append([m.mean(dim=(2, 3)) for m in levels])
        for k in GRID_SIZES:
            grids[k].append([F.adaptive_avg_pool2d(m, k) for m in levels])
        maps.append([levels[lv - 1].half() for lv in MAP_LEVELS])
        if masks:
            mask_rows.append(batch["mask"])
        done = min((i + 1) * batch_size, len(samples))
        print(f"  features {done}/{len(samples)} ({time.perf_counter() - started:.0f} s)", file=sys.stderr)

    def stack(parts: list[list[Tensor]]) -> list[Tensor]:
        return [torch.cat(level) for level in zip(*parts, strict=True)]

    return Features(
        paths=[s.path for s in samples],
        pooled=stack(pooled),
        grids={k: stack(v) for k, v in grids.items()},
        maps=dict(zip(MAP_LEVELS, stack(maps), strict=True)),
        masks=torch.cat(mask_rows) if masks else None,
    )


def cached_extract(
    cache: Path | None, name: str, extractor: FeatureExtractor, samples: list[Sample], masks: bool, bs: int
) -> Features:
    levels = "".join(map(str, MAP_LEVELS))
    path = None if cache is None else cache / f"{name}_{len(samples)}_levels{levels}.pt"
    if path is not None and path.is_file():
        stored = torch.load(path, mmap=True)  # pages are read (and count in the RSS) as they are used
        if stored["paths"] == [s.path for s in samples]:
            return Features(**stored)
    features = extract(extractor, samples, masks, bs)
    if path is not None:
        data = {k: getattr(features, k) for k in ("paths", "pooled", "grids", "maps", "masks")}
        with replaced_atomically(path) as tmp:
            torch.save(data, tmp)
    return features


# ------------------------------------------------------------------------------------- methods
class Method:
    """Fit on cached features of the fitting (and held-out) images, score cached test features."""

    name: str
    makes_maps: bool = False

    def fit(self, feats: Features, fit_rows: Tensor, holdout_rows: Tensor) -> None:
        raise NotImplementedError

    def score(self, feats: Features, rows: Tensor) -> tuple[Tensor, Tensor | None]:
        """(image scores (N,), anomaly maps (N, h, w) or None)."""
        raise NotImplementedError

    def infer(self, images: Tensor) -> Tensor:
        """End to end from uint8 images (for throughput)."""
        raise NotImplementedError

    def state(self) -> dict[str, Tensor]:
        """The fitted tensors a saved model holds (the shared backbone's weights left out)."""
        raise NotImplementedError


def saved_bytes(tensors: dict[str, Tensor]) -> int:
    """The size of ``tensors`` written as one safetensors file."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "state.safetensors"
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(path))
        return path.stat().st_size


def peer_state(model: nn.Module) -> dict[str, Tensor]:
    """An anomalib torch model's ``state_dict`` without its feature extractor (the shared backbone)."""
    return {k: v for k, v in model.state_dict().items() if not k.startswith("feature_extractor.")}


def columns_cat(parts: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    return {key: torch.cat([part[key] for part in parts]) for key in parts[0]}


class Ours(Method):
    """GaussianAD (the paper's default) or a SpatialGaussianAD configuration.

    Its inputs come from the feature cache where the cache holds them (the script's backbone,
    a global or k x k pooling, no PCA); otherwise from the images, through the detector's own
    ``features`` (its backbone, input size and pooling), and its fit time then includes them.
    """

    def __init__(self, name: str, make: Callable[[], GaussianAD], extractor: FeatureExtractor) -> None:
        self.name, self.make, self.extractor = name, make, extractor
        self.model: GaussianAD | None = None
        self.cached = True

    def _batches(self, feats: Features, rows: Tensor) -> Iterator[list[Tensor]]:
        model = self.model
        if not self.cached:
            samples = [feats.samples[r] for r in rows]
            for batch in image_loader(samples, model.extractor.image_size, False, 32):
                yield model.detector.features(batch["image"])
        else:
            yield [self._cached_rows(feats, level, rows) for level in model.levels]

    def _cached_rows(self, feats: Features, level: int, rows: Tensor) -> Tensor:
        """A level's modelled rows from the cache, pooled as the model pools that level."""
        pooling = self.model.pooling.for_level(level)
        if pooling.name == "global":
            return feats.pooled[level - 1][rows]
        return pooling.rows_from(lambda k: feats.grid(level, k, rows))

    def _cacheable(self, level: int) -> bool:
        pooling = self.model.pooling.for_level(level)
        if pooling.name == "global":
            return True
        fine = isinstance(pooling, GridFineCells)  # its fine grid comes from the level's cached map
        grids_cached = pooling.grid_size in (1, *GRID_SIZES) and not fine
        return pooling.name in CACHED_POOLINGS and (grids_cached or level in MAP_LEVELS)

    def fit(self, feats: Features, fit_rows: Tensor, holdout_rows: Tensor) -> None:
        self.model = self.make()
        if self.model.reduction != "none":
            raise ValueError(f"{self.name}: PCA/NPCA needs a second pass over the images; not benchmarked")
        same_backbone = self.model.hparams.backbone == BACKBONE
        same_input = same_backbone and self.model.extractor.image_size == self.extractor.image_size
        self.cached = same_input and all(self._cacheable(level) for level in self.model.levels)
        if same_input:
            self.model.extractor = self.model.detector.extractor = self.extractor  # one shared backbone
        elif same_backbone:  # built without weights: the same ones, at its own input size
            self.model.extractor.load_state_dict(self.extractor.state_dict())
        detector = self.model.detector
        self.makes_maps = detector.makes_maps
        with torch.no_grad():
            for inputs in self._batches(feats, fit_rows):
                detector.update(inputs)
            detector.finalise()
            if detector.level_weighting == "holdout":
                held_out = [detector.score_features(inputs) for inputs in self._batches(feats, holdout_rows)]
                detector.set_level_weights(columns_cat(held_out))

    def score(self, feats: Features, rows: Tensor) -> tuple[Tensor, Tensor | None]:
        with torch.no_grad():
            parts = [self.model.detector.score(inputs) for inputs in self._batches(feats, rows)]
        maps = None if parts[0][1] is None else torch.cat([m for _, m in parts])
        return columns_cat([c for c, _ in parts])[SCORE], maps

    def infer(self, images: Tensor) -> Tensor:
        return self.model.score_images(images)[SCORE]

    def state(self) -> dict[str, Tensor]:
        return model_tensors(self.model.detector, embed_weights=False)


def config_method(config: str, extractor: FeatureExtractor) -> Ours:
    """A shipped config (or a config file) as ``anomaly fit`` builds its model: class and init_args."""
    model = yaml.safe_load(Path(resolve_config(config)).read_text())["model"]
    module, _, name = model["class_path"].rpartition(".")
    cls, kwargs = getattr(importlib.import_module(module), name), dict(model.get("init_args") or {})
    if kwargs.get("backbone", BACKBONE) == BACKBONE:
        kwargs["pretrained"] = False  # the shared extractor (the same weights) replaces its own
    return Ours(f"ours: {Path(config).stem}", lambda: cls(**kwargs), extractor)


class TimmLevels(nn.Module):
    """Stands in for anomalib's ``TimmFeatureExtractor``: ``{timm layer name: our level's map}``."""

    def __init__(self, extractor: FeatureExtractor, layers: list[str]) -> None:
        super().__init__()
        self.extractor, self.layers = extractor, layers

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        levels = [TIMM_LEVELS[name] for name in self.layers]
        maps = self.extractor.feature_maps(images, levels)
        return {name: maps[sorted(levels).index(TIMM_LEVELS[name])] for name in self.layers}


class CachedLayer(nn.Module):
    """Hands a cached map to DFM's ``get_features`` as if its extractor had produced it."""

    def __init__(self, layer: str) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, fmap: Tensor) -> dict[str, Tensor]:
        return {self.layer: fmap}


class AnomalibDFM(Method):
    name, makes_maps = "anomalib DFM", True

    def __init__(self, extractor: FeatureExtractor) -> None:
        self.extractor = extractor

    def fit(self, feats: Features, fit_rows: Tensor, holdout_rows: Tensor) -> None:
        from anomalib.models.image.dfm.torch_model import DFMModel

        # pre_trained=False builds timm's lite0 without a hub download; its extractor is replaced.
        self.model = DFMModel(backbone=TIMM_NAME, layer=DFM_LAYER, pre_trained=False).eval()
        self.model.feature_extractor = CachedLayer(DFM_LAYER)
        fit_maps = feats.timm_maps([DFM_LAYER], fit_rows)[DFM_LAYER]
        self.model.memory_bank = [self.model.get_features(fit_maps)[0]]
        self.model.fit()

    def score(self, feats: Features, rows: Tensor) -> tuple[Tensor, Tensor | None]:
        self.model.feature_extractor = CachedLayer(DFM_LAYER)
        features, shapes = self.model.get_features(feats.timm_maps([DFM_LAYER], rows)[DFM_LAYER])
        scores, maps = self.model.score(features, shapes)
        return scores, maps[:, 0]

    def infer(self, images: Tensor) -> Tensor:
        self.model.feature_extractor = TimmLevels(self.extractor, [DFM_LAYER])
        return self.model(images).pred_score

    def state(self) -> dict[str, Tensor]:
        return peer_state(self.model)


class AnomalibPaDiM(Method):
    name, makes_maps = "anomalib PaDiM", True

    def __init__(self, extractor: FeatureExtractor) -> None:
        self.extractor = extractor

    def fit(self, feats: Features, fit_rows: Tensor, holdout_rows: Tensor) -> None:
        from anomalib.models.image.padim.torch_model import PadimModel

        torch.manual_seed(0)  # PaDiM's random channel choice
        self.model = PadimModel(
            backbone=TIMM_NAME, layers=PADIM_LAYERS, pre_trained=False, n_features=PADIM_FEATURES
        ).eval()
        self.model.feature_extractor = TimmLevels(self.extractor, PADIM_LAYERS)
        self.model.memory_bank = [
            self._embedding(feats, fit_rows[i : i + 64]) for i in range(0, len(fit_rows), 64)
        ]
        self.model.fit()

    def _embedding(self, feats: Features, rows: Tensor) -> Tensor:
        return self.model.generate_embedding(feats.timm_maps(PADIM_LAYERS, rows))

    def score(self, feats: Features, rows: Tensor) -> tuple[Tensor, Tensor | None]:
        size = self.extractor.image_size
        maps = torch.cat(
            [
                self.model.anomaly_map_generator(
                    embedding=self._embedding(feats, rows[i : i + 32]),
                    mean=self.model.gaussian.mean,
                    inv_covariance=self.model.gaussian.inv_covariance,
                    image_size=(size, size),
                )
                for i in range(0, len(rows), 32)
            ]
        )[:, 0]
        return torch.amax(maps, dim=(-2, -1)), maps

    def infer(self, images: Tensor) -> Tensor:
        return self.model(images).pred_score

    def state(self) -> dict[str, Tensor]:
        return peer_state(self.model)


class Pending(nn.Module):
    """Stands in for a peer's extractor: returns the cached maps set just before the model's forward."""

    def __init__(self, maps: dict[str, Tensor]) -> None:
        super().__init__()
        self.maps = maps

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        return self.maps


class AnomalibPatchCore(Method):
    """anomalib's ``PatchcoreModel`` with its defaults (3x3 average pooling of the two layers, the
    coarser upsampled to the finer, k-center-greedy coreset, 1-NN patch scores, the image score
    reweighted over 9 neighbours, Gaussian-blurred maps), at a coreset sampling ratio."""

    makes_maps = True

    def __init__(self, extractor: FeatureExtractor, ratio: float) -> None:
        self.extractor, self.ratio = extractor, ratio
        self.name = f"anomalib PatchCore {ratio:.0%}"

    def _forward(self, feats: Features, rows: Tensor):
        """anomalib's own forward, its extractor handing over the cached maps of ``rows``."""
        self.model.feature_extractor = Pending(feats.timm_maps(PATCHCORE_LAYERS, rows))
        size = self.extractor.image_size
        return self.model(torch.zeros(len(rows), 3, size, size))

    def fit(self, feats: Features, fit_rows: Tensor, holdout_rows: Tensor) -> None:
        from anomalib.models.image.patchcore.torch_model import PatchcoreModel

        torch.manual_seed(0)  # the coreset's random first centre
        self.model = PatchcoreModel(layers=PATCHCORE_LAYERS, backbone=TIMM_NAME, pre_trained=False)
        self.model.train()  # forward stores the embeddings, as in anomalib's training step
        for i in range(0, len(fit_rows), 32):
            self._forward(feats, fit_rows[i : i + 32])
        self.model.subsample_embedding(self.ratio)
        self.model.eval()

    def score(self, feats: Features, rows: Tensor) -> tuple[Tensor, Tensor | None]:
        with torch.no_grad():
            out = [self._forward(feats, rows[i : i + 32]) for i in range(0, len(rows), 32)]
        return torch.cat([o.pred_score for o in out]), torch.cat([o.anomaly_map for o in out])[:, 0]

    def infer(self, images: Tensor) -> Tensor:
        self.model.feature_extractor = TimmLevels(self.extractor, PATCHCORE_LAYERS)
        return self.model(images.float() / 255).pred_score  # its forward casts to float: give [0, 1]

    def state(self) -> dict[str, Tensor]:
        return peer_state(self.model)


# ------------------------------------------------------------------------------------ protocol
def datamodules(name: str, args: argparse.Namespace, split_seed: int) -> list[AnomalyDataModule]:
    """One data module per fold; ``split_seed`` draws Magnetic-Tile's test normals (bottle has its own)."""
    if name == "bottle":
        return [
            MVTecDataModule(root=args.mvtec, category="bottle", fold=k, num_workers=0) for k in args.folds
        ]
    return [
        FolderDataModule(
            normal_dir="MT_Free/Imgs",
            test_dirs=["MT_*/Imgs"],
            root=args.magnetic_tile,
            name="magnetic_tile",
            masks="beside",
            test_normal_fraction=0.2,
            split_seed=split_seed,
            fold=k,
            num_workers=0,
        )
        for k in args.folds
    ]


def mean_sem(values: list[float]) -> tuple[float, float]:
    """Mean ± SEM over the runs (NaN runs left out; NaN SEM for fewer than two)."""
    clean = [v for v in values if not math.isnan(v)]
    if not clean:
        return math.nan, math.nan
    spread = sem(clean)
    return float(np.mean(clean)), math.nan if spread is None else spread


def reset_peak_rss() -> None:
    """Restart this process's peak RSS (``VmHWM``) from its current RSS (Linux; elsewhere a no-op)."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_rss() -> int | None:
    """This process's peak RSS in bytes since it started or since :func:`reset_peak_rss` (Linux)."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    return int(status.split("VmHWM:")[1].split()[0]) * 1024


def pixel_metrics(maps: Tensor, masks: Tensor, size: int) -> tuple[float, float]:
    """(pixel AUROC, PRO up to FPR 0.3) of maps ``(N, h, w)`` against masks ``(N, 1, S, S)``.

    Both are computed at ``size`` px from one sort of the pixels: maps are resized bilinearly
    to it; below the masks' own size, a pixel is anomalous if any mask pixel it covers is
    (max pooling, so that no thin defect disappears).
    """
    if masks.shape[-1] != size:
        masks = F.adaptive_max_pool2d(masks.float(), size).to(torch.uint8)
    return pixel_auroc_and_pro(upsample_maps(maps.float(), size), masks[:, 0])


def throughput(methods: list[Method], images: Tensor, repeats: int) -> dict[str, float]:
    """Images/s end to end, best of ``repeats``, methods interleaved so they share the machine's load."""
    best = {m.name: math.inf for m in methods}
    with torch.no_grad():
        for m in methods:
            m.infer(images[:2])  # warm-up
        for _ in range(repeats):
            for m in methods:
                started = time.perf_counter()
                m.infer(images)
                best[m.name] = min(best[m.name], time.perf_counter() - started)
    return {name: len(images) / seconds for name, seconds in best.items()}


def run_dataset(
    name: str, args: argparse.Namespace, methods: list[Method], extractor: FeatureExtractor
) -> dict:
    seeds = [0] if name == "bottle" else list(args.split_seeds)
    splits = {seed: datamodules(name, args, seed) for seed in seeds}
    every: dict[str, Sample] = {}
    for dms in splits.values():
        for dm in dms:
            dm.configure(DataNeeds(image_size=extractor.image_size))
        train, test = dms[0].samples()
        every.update({s.path: s for s in train + test})
    images = [every[p] for p in sorted(every)]
    has_masks = any(s.mask is not None for s in images)
    print(f"{name}: {len(images)} images, split seeds {seeds}", file=sys.stderr)
    feats = cached_extract(args.cache, name, extractor, images, has_masks, args.batch_size)
    feats.samples = images
    runs = {m.name: [] for m in methods}
    for seed, dms in splits.items():
        train, test = dms[0].samples()
        labels, test_rows = torch.tensor([s.label for s in test]), feats.rows(test)
        for dm in dms:
            fit_rows, holdout_rows = feats.rows(dm.fit_samples), feats.rows(dm.holdout_samples)
            for m in methods:
                reset_peak_rss()
                started = time.perf_counter()
                m.fit(feats, fit_rows, holdout_rows)
                fitted = time.perf_counter()
                scores, maps = m.score(feats, test_rows)
                run = {"split_seed": seed, "fold": dm.fold, "image_auroc": image_auroc(scores, labels)}
                run["fit_seconds"], run["score_seconds"] = fitted - started, time.perf_counter() - fitted
                run["model_bytes"], run["fit_score_peak_rss_bytes"] = saved_bytes(m.state()), peak_rss()
                if maps is not None and has_masks and dm.fold in args.pixel_folds:
                    masks = feats.masks[test_rows]
                    run["pixel_auroc"], run["pro"] = pixel_metrics(maps, masks, args.pixel_size)
                runs[m.name].append(run)
                print(
                    f"  seed {seed} fold {dm.fold} {m.name}: "
                    + ", ".join(f"{k} {v:.4f}" for k, v in run.items() if isinstance(v, float))
                    + f", {run['model_bytes'] / 1e6:.1f} MB ({time.perf_counter() - started:.1f} s)",
                    file=sys.stderr,
                )
    speed = {}
    if args.repeats > 0 and methods:
        train, test = splits[seeds[0]][0].samples()
        step = max(1, len(test) // args.speed_images)
        batch = next(iter(image_loader(test[::step], extractor.image_size, False, args.speed_images)))
        speed = throughput(methods, batch["image"], args.repeats)

    def summary(method: str, key: str) -> tuple[float, float] | None:
        values = [r[key] for r in runs[method] if key in r]
        return mean_sem(values) if values else None

    return {
        "dataset": name,
        "n_images": len(images),
        "n_test": len(test),
        "n_test_anomalous": int(labels.sum()),
        "split_seeds": seeds,
        "folds": list(args.folds),
        "pixel_size": args.pixel_size,
        "pixel_folds": [k for k in args.folds if k in args.pixel_folds],
        "methods": {
            m.name: {
                "image_auroc": summary(m.name, "image_auroc"),
                "image_auroc_per_seed": {
                    str(seed): mean_sem([r["image_auroc"] for r in runs[m.name] if r["split_seed"] == seed])
                    for seed in seeds
                },
                "pixel_auroc": summary(m.name, "pixel_auroc"),
                "pro": summary(m.name, "pro"),
                "images_per_second": speed.get(m.name),
                "fit_seconds": summary(m.name, "fit_seconds"),
                "model_bytes": max((r["model_bytes"] for r in runs[m.name]), default=None),
                "fit_score_peak_rss_bytes": max(
                    (r["fit_score_peak_rss_bytes"] or 0 for r in runs[m.name]), default=None
                ),
                "runs": runs[m.name],
            }
            for m in methods
        },
    }


def fmt(value: tuple[float, float] | None) -> str:
    if value is None or math.isnan(value[0]):
        return "-"
    mean, sem = value
    return f"{mean:.4f}" if math.isnan(sem) else f"{mean:.4f} ± {sem:.4f}"


def cost_cells(entry: dict) -> list[str]:
    """fit s, images/s, peak RSS and its fit + score part (GB), saved model (MB) of a method's entry."""
    fit, speed = entry.get("fit_seconds"), entry.get("images_per_second")
    sizes = [entry.get(k) for k in ("peak_rss_bytes", "fit_score_peak_rss_bytes", "model_bytes")]
    return [
        "-" if fit is None else f"{fit[0]:.1f}",
        "-" if speed is None else f"{speed:.1f}",
        *(
            "-" if size is None else f"{size / unit:.{digits}f}"
            for size, unit, digits in zip(sizes, (GB, GB, 1e6), (2, 2, 1), strict=True)
        ),
    ]


def markdown(results: list[dict]) -> str:
    """The main table, then image AUROC per split seed where a dataset has several."""
    lines = [
        "| dataset | method | image AUROC | pixel AUROC | PRO (FPR ≤ 0.3) | fit s | images/s "
        "| peak RSS GB | fit + score peak RSS GB | saved MB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for result in results:
        for method, entry in result["methods"].items():
            if entry.get("stopped"):
                cells = [result["dataset"], method, f"stopped: {entry['stopped']}", "-", "-"]
            else:
                cells = [result["dataset"], method, fmt(entry["image_auroc"]), fmt(entry["pixel_auroc"])]
                cells.append(fmt(entry["pro"]))
            lines.append("| " + " | ".join(cells + cost_cells(entry)) + " |")
    for result in results:
        seeds = result.get("split_seeds", [])
        if len(seeds) < 2:
            continue
        lines += ["", f"{result['dataset']}, image AUROC per split seed (mean ± SEM over the folds):", ""]
        lines.append("| method | " + " | ".join(f"seed {s}" for s in seeds) + " |")
        lines.append("|---|" + "---|" * len(seeds))
        for method, entry in result["methods"].items():
            if not entry.get("stopped"):
                per_seed = [fmt(tuple(entry["image_auroc_per_seed"][str(s)])) for s in seeds]
                lines.append(f"| {method} | " + " | ".join(per_seed) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------- one process a method
#: ``--num-workers default``: each side loads with its own default number of worker processes.
DEFAULT_WORKERS = "default"


def worker_count(text: str) -> int | None:
    """``--num-workers``: loader worker processes (0 or more), or None for ``default``."""
    if text == DEFAULT_WORKERS:
        return None
    if not text.isdecimal():
        raise argparse.ArgumentTypeError(f"give 0 or more, or {DEFAULT_WORKERS}, not {text!r}")
    return int(text)


#: Seconds between two readings of a watched process group's memory, and between two looks for its end.
RSS_POLL, EXIT_POLL = 1.0, 0.05


def group_memory(pgid: int) -> tuple[int, int]:
    """(RSS, PSS) in bytes summed over the processes of a process group. RSS counts a page shared by
    several processes (a loader worker's copy-on-write pages) in each; PSS divides it among them,
    so the group's PSS is the memory the group holds (0 where ``smaps_rollup`` cannot be read)."""
    rss = pss = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:  # the process ended meanwhile
            continue
        if int(fields[2]) != pgid:
            continue
        rss += int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
        with contextlib.suppress(OSError):
            rollup = (stat.parent / "smaps_rollup").read_text().splitlines()
            pss += sum(int(line.split()[1]) * 1024 for line in rollup if line.startswith("Pss:"))
    return rss, pss


def watch(
    argv: list[str], max_rss_gb: float | None, time_limit: float | None, log: Path | None = None, **popen
) -> dict:
    """Run ``argv`` in its own process group, killed above ``max_rss_gb`` (RSS summed over the group,
    polled every second) or after ``time_limit`` s; its peak RSS (``ru_maxrss``), wall time (its end
    seen within :data:`EXIT_POLL` s) and CPU time (user + system: unlike the wall time, not
    stretched by other load on the machine).
    ``log``: a file for its stdout and stderr (default: this process's), which appears whole when the
    process has ended (written beside it meanwhile); ``popen``: for ``Popen``."""
    with contextlib.ExitStack() as stack:
        output = None if log is None else stack.enter_context(open_atomically(log))
        errors = None if log is None else subprocess.STDOUT
        started = time.perf_counter()
        child = subprocess.Popen(argv, start_new_session=True, stdout=output, stderr=errors, **popen)
        stopped, group_peak, group_pss_peak, next_poll = None, 0, 0, 0.0
        while True:
            pid, status, usage = os.wait4(child.pid, os.WNOHANG)
            if pid:
                break
            elapsed = time.perf_counter() - started
            if elapsed >= next_poll:  # polling another process's memory: there is nothing to wait on
                (rss, pss), next_poll = group_memory(child.pid), elapsed + RSS_POLL
                group_peak, group_pss_peak = max(group_peak, rss), max(group_pss_peak, pss)
                if stopped is None and max_rss_gb is not None and rss > max_rss_gb * GB:
                    stopped = (
                        f"killed at {rss / GB:.1f} GB RSS (limit {max_rss_gb:g} GB) after {elapsed:.0f} s"
                    )
                elif stopped is None and time_limit is not None and elapsed > time_limit:
                    stopped = f"killed at the time limit ({time_limit:.0f} s), {rss / GB:.1f} GB RSS"
                if stopped is not None:
                    os.killpg(child.pid, signal.SIGKILL)
            time.sleep(EXIT_POLL)
    child.returncode = os.waitstatus_to_exitcode(status)
    return {
        "returncode": child.returncode,
        "stopped": stopped,
        "wall_seconds": time.perf_counter() - started,
        "cpu_seconds": usage.ru_utime + usage.ru_stime,
        "peak_rss_bytes": usage.ru_maxrss * 1024,
        "group_peak_rss_bytes": group_peak,
        "group_peak_pss_bytes": group_pss_peak,
    }


def child_argv(args: argparse.Namespace, dataset: str, method: str | None, out: Path) -> list[str]:
    """This script's command line for one dataset and one method (None: only build the cache)."""
    argv = [sys.executable, str(Path(__file__).resolve()), "--datasets", dataset, "--out", str(out)]
    argv += ["--extract-only"] if method is None else ["--methods", method]
    roots = [("--mvtec", args.mvtec), ("--magnetic-tile", args.magnetic_tile), ("--cache", args.cache)]
    for flag, value in roots:
        argv += [] if value is None else [flag, str(value)]
    for flag, values in [("--folds", args.folds), ("--split-seeds", args.split_seeds),
                         ("--pixel-folds", args.pixel_folds), ("--configs", args.configs)]:  # fmt: skip
        argv += [flag, *map(str, values)]
    for flag in ("pixel_size", "batch_size", "speed_images", "repeats"):
        argv += ["--" + flag.replace("_", "-"), str(getattr(args, flag))]
    return argv


def isolated(args: argparse.Namespace, names: list[str]) -> list[dict]:
    """Every (dataset, method) in a process of its own, after one process has built the feature cache."""
    results = []
    with tempfile.TemporaryDirectory() as folder:
        for dataset in args.datasets:
            out = Path(folder) / "result.json"
            prepared = watch(child_argv(args, dataset, None, out), None, None)
            if prepared["returncode"] != 0:
                raise RuntimeError(f"{dataset}: extracting the features failed")
            base, entries = json.loads(out.read_text())["results"][0], {}
            for name in names:
                out.unlink(missing_ok=True)
                report = watch(child_argv(args, dataset, name, out), args.max_rss_gb, args.time_limit)
                if report["returncode"] == 0 and out.is_file():
                    entry = json.loads(out.read_text())["results"][0]["methods"][name]
                else:
                    entry = {"stopped": report["stopped"] or f"exit status {report['returncode']}"}
                entries[name] = {**entry, **report}
                print(f"{dataset} {name}: {report}", file=sys.stderr)
            results.append({**base, "methods": entries})
    return results


def main(argv: list[str] | None = None) -> int:
    return run_command(lambda: compare(argv))


def compare(argv: list[str] | None) -> int:
    labels = [f"ours: {c}" for c in CONFIGS] + [f"ours: {o}" for o, _ in OURS] + PEERS
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Methods (--methods): " + ", ".join(labels) + "; and 'ours: NAME' for every --configs NAME.",
    )  # fmt: skip
    parser.add_argument("--mvtec", help="MVTec AD root (bottle is used); needed for the bottle dataset")
    parser.add_argument("--magnetic-tile", help="Magnetic-Tile-Defect root; needed for magnetic_tile")
    parser.add_argument("--datasets", nargs="+", default=["bottle", "magnetic_tile"], help="%(default)s")
    parser.add_argument("--folds", nargs="+", type=int, default=list(range(FOLDS)))
    parser.add_argument(
        "--split-seeds", nargs="+", type=int, default=[0, 1, 2],
        help="Magnetic-Tile's seeded 80/20 splits of MT_Free; results average over seeds x folds",
    )  # fmt: skip
    parser.add_argument(
        "--configs", nargs="*", default=CONFIGS,
        help="our configs, by shipped name or file (each runs as 'ours: NAME'); default: %(default)s",
    )  # fmt: skip
    parser.add_argument(
        "--methods", nargs="+", default=None, help="only these methods (their names in the table)"
    )
    parser.add_argument("--pixel-size", type=int, default=224, help="resolution of pixel AUROC and PRO")
    parser.add_argument(
        "--pixel-folds", nargs="+", type=int, default=list(range(FOLDS)),
        help="the folds whose maps are scored (pixel AUROC, PRO: the slow part)",
    )  # fmt: skip
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--speed-images", type=int, default=32, help="test images in the throughput batch")
    parser.add_argument("--repeats", type=int, default=3, help="throughput runs per method (0: none)")
    parser.add_argument("--cache", type=Path, default=None, help="folder for the extracted features")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument(
        "--overwrite", action="store_true", help="let --out replace a file that is not an earlier result"
    )
    parser.add_argument(
        "--isolate", action="store_true",
        help="each dataset and method in a process of its own, for its peak RSS (needs --cache)",
    )  # fmt: skip
    parser.add_argument(
        "--max-rss-gb", type=float, default=None, help="with --isolate: kill a method above this RSS (GB)"
    )
    parser.add_argument("--time-limit", type=float, default=None, help="with --isolate: seconds per method")
    parser.add_argument("--extract-only", action="store_true", help="only build the feature cache")
    args = parser.parse_args(argv)
    if args.out is not None:  # claimed before any work: never an input, nor a file of another origin
        inputs = [Path(c) for c in args.configs if Path(c).is_file()]
        inputs += [] if args.cache is None else sorted(args.cache.glob("*.pt"))
        args.out = claim_json(args.out, command=COMMAND, inputs=inputs, overwrite=args.overwrite)
    roots = {"bottle": ("--mvtec", args.mvtec), "magnetic_tile": ("--magnetic-tile", args.magnetic_tile)}
    missing = [roots[name][0] for name in args.datasets if name in roots and roots[name][1] is None]
    if missing:
        print(f"error: give {' and '.join(missing)}: the folder of each dataset compared", file=sys.stderr)
        return 2
    if args.isolate and args.cache is None:
        print("error: --isolate needs --cache: the methods' processes share its features", file=sys.stderr)
        return 2
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    extractor = build_backbone(BACKBONE)
    try:
        methods: list[Method] = [config_method(config, extractor) for config in args.configs]
    except ArgumentsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    methods += [
        Ours(f"ours: {label}", lambda kw=kw: SpatialGaussianAD(BACKBONE, pretrained=False, **kw), extractor)
        for label, kw in OURS
    ]
    methods += [AnomalibDFM(extractor), AnomalibPaDiM(extractor)]
    methods += [AnomalibPatchCore(extractor, ratio) for ratio in PATCHCORE_RATIOS]
    if args.methods:
        unknown = sorted(set(args.methods) - {m.name for m in methods})
        if unknown:
            print(f"error: no method {unknown}: choose among {[m.name for m in methods]}", file=sys.stderr)
            return 2
        methods = [m for m in methods if m.name in args.methods]
    if args.extract_only:
        methods = []
    if any(m.name.startswith("anomalib") for m in methods):
        try:
            import anomalib  # noqa: F401
        except ImportError:
            print("error: anomalib is not installed: pip install -e '.[bench]'", file=sys.stderr)
            return 2
    if args.isolate:
        results = isolated(args, [m.name for m in methods])
    else:
        results = [run_dataset(name, args, methods, extractor) for name in args.datasets]
    table = markdown(results)
    print(table)
    if args.out is not None:
        names = {"best": BEST, "fine": FINE, "grid_maps": GRID_MAPS}
        document = {"results": results, **{k: f"ours: {v}" for k, v in names.items()}, "table": table}
        write_json(args.out, document, command=COMMAND)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
