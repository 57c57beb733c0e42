"""Our detectors next to anomalib's DFM and PaDiM, on the same images and efficientnet-lite0 weights.

One process, two datasets, every method on the same fitting / held-out / test images:

* MVTec AD ``bottle``: the paper's 5-fold protocol (four fifths of ``train/good`` fit, the
  fifth is held out, the whole test set is scored); its defective test images have masks.
* Magnetic-Tile-Defect: a seeded 20% of ``MT_Free`` plus every defect image is the test set
  (``FolderDataModule``, ``test_normal_fraction 0.2``), the other 80% is split into the same
  5 folds; masks lie beside the images. The protocol is repeated for every ``--split-seeds``
  seed, and means and SEMs are over all (seed, fold) runs.

Methods:

* ``ours: paper default``: :class:`GaussianAD`, global pooling, all nine levels, sum mode.
* ``ours: ...``: :class:`SpatialGaussianAD` configurations (pooling, level weighting), among
  them the fine-map one (``cells 14x14, levels 3-6``: one Gaussian per position) and the
  grid-maps one (``grid maps 7x7, levels 3-6``: one joint Gaussian of the 7x7 grid per level,
  each cell scored given the others). anomalib is needed only when one of its methods is run.
* ``anomalib DFM`` / ``anomalib PaDiM`` (``pip install -e .[bench]``), their torch models
  with their default settings, except that their timm feature extractor is replaced by our
  efficientnet-lite0 extractor (the same ImageNet weights as ours; timm's lite0 checkpoint
  would need a hub download). The timm layer names map onto our levels: ``blocks.1`` = 3,
  ``blocks.2`` = 4, ``blocks.4`` = 6 (strides 4, 8, 16, as resnet's layer1-3 in their defaults).
  PaDiM keeps 100 random channels of the 176 (its resnet18 default is 100 of 448); DFM pools
  ``blocks.4`` by 4 (its default ``layer3``-like stride-16 layer) and scores by feature
  reconstruction error at 97% PCA variance.

Every image passes the backbone once; the pooled features (global and 4 x 4) and the unpooled
maps of levels 3-8 are cached in memory (and on disk with ``--cache``), and every method and
split fits and scores from them. For every method that makes a map, pixel AUROC and PRO (up to
FPR 0.3, :mod:`anomaly.evaluation.pro`) are computed at ``--pixel-size`` px on the
``--pixel-folds`` folds. Throughput (images/s) is measured separately end to end, from uint8
images through the backbone to the image scores (and the maps for the methods that make them),
on one batch of test images, the methods interleaved, best of ``--repeats``.

    venv-bench/bin/python benchmarks/compare_peers.py \\
        --mvtec /data/mvtec_ad --magnetic-tile /data/magnetic_tile \\
        --cache runs/compare_peers_cache --out runs/compare_peers.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from anomaly.backbones import build_backbone
from anomaly.backbones.extractor import FeatureExtractor
from anomaly.data import MVTecDataModule
from anomaly.data.datamodule import AnomalyDataModule
from anomaly.data.datasets import ImageDataset, Sample
from anomaly.data.folder import FolderDataModule
from anomaly.data.needs import DataNeeds
from anomaly.data.transforms import ImagePipeline
from anomaly.evaluation.aggregate import sem
from anomaly.evaluation.metrics import image_auroc
from anomaly.evaluation.pixel import upsample_maps
from anomaly.evaluation.pro import pixel_auroc_and_pro
from anomaly.methods.gaussian import GaussianAD
from anomaly.methods.spatial import SpatialGaussianAD

BACKBONE = "efficientnet-lite0"
TIMM_NAME = "efficientnet_lite0"
#: timm feature names of efficientnet_lite0 -> our 1-based levels (same channel widths and strides).
TIMM_LEVELS = {"blocks.1": 3, "blocks.2": 4, "blocks.4": 6}
#: Levels whose unpooled maps are cached (float16): the peers' three and the fine-map candidates.
MAP_LEVELS = (3, 4, 5, 6, 7, 8)
PADIM_LAYERS = ["blocks.1", "blocks.2", "blocks.4"]
PADIM_FEATURES = 100
DFM_LAYER = "blocks.4"
GRID_SIZES = (4,)
FOLDS = 5
SCORE = "mahalanobis/sum"

#: Our configurations: (label, SpatialGaussianAD keyword arguments).
OURS = [
    ("global, holdout weighting", {"pooling": "global", "level_weighting": "holdout"}),
    ("grid 4x4, levels 1-8", {"pooling": "grid", "grid_size": 4, "levels": list(range(1, 9))}),
    ("cells 4x4", {"pooling": "cells", "grid_size": 4}),
    ("cells 4x4, holdout weighting", {"pooling": "cells", "grid_size": 4, "level_weighting": "holdout"}),
    ("cells 14x14, levels 3-6", {"pooling": "cells", "grid_size": 14, "levels": [3, 4, 5, 6]}),
    ("grid maps 7x7, levels 3-6", {"pooling": "grid_maps", "grid_size": 7, "levels": [3, 4, 5, 6]}),
]
#: The configuration the README recommends: a 4x4 grid over every level whose k^2 C-dim Gaussian
#: fits the default 4 GiB budget (level 9's 20480 dims do not).
BEST = "grid 4x4, levels 1-8"
#: The fine-map configuration (configs/spatial_fine.yaml): one Gaussian per position of a 14x14
#: grid, the native stride-16 resolution of levels 5-6; levels 3-4 (strides 4, 8) average-pooled to it.
FINE = "cells 14x14, levels 3-6"
#: The grid configuration with maps (configs/spatial_grid_maps.yaml): one joint Gaussian of the
#: 7x7 grid per level; the map is each cell's distance given the other cells.
GRID_MAPS = "grid maps 7x7, levels 3-6"


# ------------------------------------------------------------------------------------ features
@dataclass
class Features:
    """Cached per-image features of one dataset, rows in ``paths`` order."""

    paths: list[str]
    pooled: list[Tensor]  # per level (N, C)
    grids: dict[int, list[Tensor]]  # k -> per level (N, C, k, k)
    maps: dict[int, Tensor]  # level -> unpooled (N, C, H, W) float16
    masks: Tensor | None = None  # (N, 1, S, S) uint8, zeros where an image has no mask
    row: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.row = {p: i for i, p in enumerate(self.paths)}

    def rows(self, samples: list[Sample]) -> Tensor:
        return torch.tensor([self.row[s.path] for s in samples])

    def grid(self, level: int, k: int, rows: Tensor) -> Tensor:
        """A level's map of the given images average-pooled to ``(n, C, k, k)``."""
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
        stored = torch.load(path)
        if stored["paths"] == [s.path for s in samples]:
            return Features(**stored)
    features = extract(extractor, samples, masks, bs)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {k: getattr(features, k) for k in ("paths", "pooled", "grids", "maps", "masks")}
        torch.save(data, path)
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


class Ours(Method):
    """GaussianAD (the paper's default) or a SpatialGaussianAD configuration."""

    def __init__(self, name: str, make: Callable[[], GaussianAD], extractor: FeatureExtractor) -> None:
        self.name, self.make, self.extractor = name, make, extractor
        self.model: GaussianAD | None = None

    def _inputs(self, feats: Features, rows: Tensor) -> list[Tensor]:
        model = self.model
        if model.pooling.name == "global":
            return [feats.pooled[lv - 1][rows] for lv in model.levels]
        return [model.pooling.arrange(feats.grid(lv, model.grid_size, rows)) for lv in model.levels]

    def fit(self, feats: Features, fit_rows: Tensor, holdout_rows: Tensor) -> None:
        self.model = self.make()
        self.model.extractor = self.model.detector.extractor = self.extractor  # one shared backbone
        detector = self.model.detector
        self.makes_maps = detector.makes_maps
        detector.update(self._inputs(feats, fit_rows))
        detector.finalise()
        if detector.level_weighting == "holdout":
            detector.set_level_weights(detector.score_features(self._inputs(feats, holdout_rows)))

    def score(self, feats: Features, rows: Tensor) -> tuple[Tensor, Tensor | None]:
        columns, maps = self.model.detector.score(self._inputs(feats, rows))
        return columns[SCORE], maps

    def infer(self, images: Tensor) -> Tensor:
        return self.model.score_images(images)[SCORE]


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
    runs = {m.name: [] for m in methods}
    for seed, dms in splits.items():
        train, test = dms[0].samples()
        labels, test_rows = torch.tensor([s.label for s in test]), feats.rows(test)
        for dm in dms:
            fit_rows, holdout_rows = feats.rows(dm.fit_samples), feats.rows(dm.holdout_samples)
            for m in methods:
                started = time.perf_counter()
                m.fit(feats, fit_rows, holdout_rows)
                scores, maps = m.score(feats, test_rows)
                run = {"split_seed": seed, "fold": dm.fold, "image_auroc": image_auroc(scores, labels)}
                if maps is not None and has_masks and dm.fold in args.pixel_folds:
                    masks = feats.masks[test_rows]
                    run["pixel_auroc"], run["pro"] = pixel_metrics(maps, masks, args.pixel_size)
                runs[m.name].append(run)
                print(
                    f"  seed {seed} fold {dm.fold} {m.name}: "
                    + ", ".join(f"{k} {v:.4f}" for k, v in run.items() if isinstance(v, float))
                    + f" ({time.perf_counter() - started:.1f} s)",
                    file=sys.stderr,
                )
    speed = {}
    if args.repeats > 0:
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


def markdown(results: list[dict]) -> str:
    """The main table, then image AUROC per split seed where a dataset has several."""
    lines = [
        "| dataset | method | image AUROC | pixel AUROC | PRO (FPR ≤ 0.3) | images/s |",
        "|---|---|---|---|---|---|",
    ]
    for result in results:
        for method, entry in result["methods"].items():
            speed = entry["images_per_second"]
            cells = [result["dataset"], method, fmt(entry["image_auroc"]), fmt(entry["pixel_auroc"])]
            cells += [fmt(entry["pro"]), "-" if speed is None else f"{speed:.1f}"]
            lines.append("| " + " | ".join(cells) + " |")
    for result in results:
        seeds = result["split_seeds"]
        if len(seeds) < 2:
            continue
        lines += ["", f"{result['dataset']}, image AUROC per split seed (mean ± SEM over the folds):", ""]
        lines.append("| method | " + " | ".join(f"seed {s}" for s in seeds) + " |")
        lines.append("|---|" + "---|" * len(seeds))
        for method, entry in result["methods"].items():
            per_seed = [fmt(tuple(entry["image_auroc_per_seed"][str(s)])) for s in seeds]
            lines.append(f"| {method} | " + " | ".join(per_seed) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mvtec", help="MVTec AD root (bottle is used); needed for the bottle dataset")
    parser.add_argument("--magnetic-tile", help="Magnetic-Tile-Defect root; needed for magnetic_tile")
    parser.add_argument("--datasets", nargs="+", default=["bottle", "magnetic_tile"])
    parser.add_argument("--folds", nargs="+", type=int, default=list(range(FOLDS)))
    parser.add_argument(
        "--split-seeds", nargs="+", type=int, default=[0, 1, 2],
        help="Magnetic-Tile's seeded 80/20 splits of MT_Free; results average over seeds x folds",
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
    args = parser.parse_args(argv)
    roots = {"bottle": ("--mvtec", args.mvtec), "magnetic_tile": ("--magnetic-tile", args.magnetic_tile)}
    missing = [roots[name][0] for name in args.datasets if name in roots and roots[name][1] is None]
    if missing:
        print(f"error: give {' and '.join(missing)}: the folder of each dataset compared", file=sys.stderr)
        return 2
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    extractor = build_backbone(BACKBONE)
    methods: list[Method] = [
        Ours("ours: paper default", lambda: GaussianAD(BACKBONE, pretrained=False), extractor)
    ]
    methods += [
        Ours(f"ours: {label}", lambda kw=kw: SpatialGaussianAD(BACKBONE, pretrained=False, **kw), extractor)
        for label, kw in OURS
    ]
    methods += [AnomalibDFM(extractor), AnomalibPaDiM(extractor)]
    if args.methods:
        methods = [m for m in methods if m.name in args.methods]
    if any(m.name.startswith("anomalib") for m in methods):
        try:
            import anomalib  # noqa: F401
        except ImportError:
            print("error: anomalib is not installed: pip install -e '.[bench]'", file=sys.stderr)
            return 2
    results = [run_dataset(name, args, methods, extractor) for name in args.datasets]
    table = markdown(results)
    print(table)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(
            json.dumps(
                {
                    "results": results,
                    "best": f"ours: {BEST}",
                    "fine": f"ours: {FINE}",
                    "grid_maps": f"ours: {GRID_MAPS}",
                    "table": table,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
