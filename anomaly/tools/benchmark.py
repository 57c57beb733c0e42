"""Scale benchmarks, measured side by side in one run and reported as ratios (a markdown table).

1. images/s of the full feature pipeline (decode, resize, normalise, forward, pool,
   accumulate float64 moments) against the bare forward pass on pre-made tensors;
2. peak resident memory of a fit with 1 versus 20 augmented epochs (one subprocess each);
3. wall time of the 5-fold protocol (all levels x {Mahalanobis, L2, SED} x {none, NPCA 1%})
   with and without the feature cache, against one extraction pass over the same images;
4. wall time of the Ledoit-Wolf finalisation (shrinkage and inversion) per level, float64,
   at efficientnet-b4's level widths (synthetic moments).

CPU: efficientnet-lite0 with its real weights. With CUDA: efficientnet-b4 at 380 px, features
under bf16 autocast (fp16 where bf16 is unsupported), statistics in float64.

    anomaly benchmark --root /data/mvtec_ad --category bottle [--quick]
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from anomaly.atomic import write_bytes_atomic
from anomaly.backbones import backbone_spec, build_backbone
from anomaly.cli import quiet_lightning
from anomaly.console import run_command
from anomaly.data import MVTecDataModule
from anomaly.data.datasets import ImageDataset
from anomaly.data.image_cache import ResizedImageCache
from anomaly.data.images import load_rgb, require_folder
from anomaly.data.mvtec import scan_mvtec
from anomaly.data.transforms import ImagePipeline, resize_square
from anomaly.evaluation.callback import RunReport
from anomaly.methods.gaussian import GaussianAD
from anomaly.methods.run import fit
from anomaly.outputs import claim_output, starts_with
from anomaly.stats.gaussian import fit_gaussian
from anomaly.stats.moments import RunningMoments

B4_DIMS = backbone_spec("efficientnet-b4").level_dims


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    text = (
        f"{cpu}, {os.cpu_count()} logical cores, torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    if torch.cuda.is_available():
        text += f"; GPU: {torch.cuda.get_device_name(0)}"
    return text


def autocast(device: torch.device):
    if device.type != "cuda":
        return nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def subset_category(root: Path, category: str, n_train: int | None, n_per_defect: int, out: Path) -> Path:
    """``root`` itself, or (quick mode) a linked subset of the category under ``out``."""
    if n_train is None:
        return root
    base = out / "subset" / category
    for split, folders, limit in (("train", ["good"], n_train), ("test", None, n_per_defect)):
        source = root / category / split
        for folder in folders or sorted(p.name for p in source.iterdir() if p.is_dir()):
            files = sorted((source / folder).iterdir())[:limit]
            (base / split / folder).mkdir(parents=True, exist_ok=True)
            for f in files:
                (base / split / folder / f.name).symlink_to(f)
    return out / "subset"


# ------------------------------------------------------------------ 1. throughput
def pipeline_rate(args, samples, extractor, device: torch.device, cache: ResizedImageCache | None) -> float:
    """images/s of loader (decode or cached read, resize, to tensor) + forward + pool + accumulate."""
    accumulators = [RunningMoments(d).to(device) for d in extractor.level_dims]
    dataset = ImageDataset(samples, ImagePipeline(extractor.image_size), image_cache=cache)
    loader = DataLoader(
        dataset, batch_size=args.batch_size, num_workers=args.workers, pin_memory=device.type == "cuda",
        prefetch_factor=4 if args.workers else None,
    )  # fmt: skip
    start = time.perf_counter()
    for batch in loader:
        with autocast(device):
            features = extractor(batch["image"].to(device, non_blocking=True))
        for accumulator, feats in zip(accumulators, features, strict=True):
            accumulator.update(feats)
    sync(device)
    return len(samples) / (time.perf_counter() - start)


def throughput(args, root: Path, device: torch.device, out: Path) -> list[tuple[str, str, str]]:
    extractor = build_backbone(args.backbone, pretrained=not args.random_weights).to(device)
    size = extractor.image_size
    dm = MVTecDataModule(str(root), args.category, fold=None)
    train, _ = dm.samples()
    samples = (train * (args.images // len(train) + 1))[: args.images]

    premade = torch.randint(0, 256, (args.batch_size, 3, size, size), dtype=torch.uint8, device=device)
    with autocast(device):
        extractor(premade)  # warm-up
    sync(device)
    start = time.perf_counter()
    for _ in range(0, len(samples), args.batch_size):
        with autocast(device):
            extractor(premade)
    sync(device)
    forward_rate = len(samples) / (time.perf_counter() - start)

    decoding_rate = pipeline_rate(args, samples, extractor, device, None)
    cache = ResizedImageCache(out / "image_cache", size)
    for sample in train:  # fill the resized-image cache (a first epoch or an earlier run does this)
        cache.load(sample.path)
    cached_rate = pipeline_rate(args, samples, extractor, device, cache)
    start = time.perf_counter()
    for sample in samples[:16]:
        resize_square(load_rgb(sample.path), size)
    decode_ms = 1000 * (time.perf_counter() - start) / 16
    start = time.perf_counter()
    for sample in samples[:16]:
        cache.load(sample.path)
    cached_ms = 1000 * (time.perf_counter() - start) / 16
    return [
        ("1", "images/s: full pipeline, images read through the resized-image cache / bare forward "
         "(same batch size)",
         f"{cached_rate:.1f} / {forward_rate:.1f} = **{cached_rate / forward_rate:.2f}×** (target ≥ 0.9)"),
        ("1", "images/s: full pipeline, every image decoded and resized / bare forward",
         f"{decoding_rate:.1f} / {forward_rate:.1f} = **{decoding_rate / forward_rate:.2f}×**"),
        ("1", "one image in one process: decode + resize / cached read / bare forward",
         f"{decode_ms:.1f} ms / {cached_ms:.2f} ms / {1000 / forward_rate:.1f} ms"),
    ]  # fmt: skip


# ---------------------------------------------------------------------- 2. memory
def peak_rss_mib(args, root: Path, epochs: int, out: Path) -> float:
    """Peak RSS of the largest process of one ``anomaly fit``, measured in a fresh parent."""
    command = [
        sys.executable, "-m", "anomaly", "fit", "--config", "paper",
        "--data.root", str(root), "--data.category", args.category,
        "--data.augment", "true", "--data.num_workers", str(args.workers),
        "--data.batch_size", str(args.batch_size), "--model.backbone", args.backbone,
        "--model.pretrained", str(not args.random_weights).lower(),
        "--trainer.max_epochs", str(epochs), "--trainer.logger", "false",
        "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(out / f"mem{epochs}"),
        "--data.image_cache", str(out / f"mem{epochs}_images"),
    ]  # fmt: skip
    if torch.cuda.is_available():
        command += ["--trainer.accelerator", "gpu", "--trainer.precision", "bf16-mixed"]
    probe = (
        "import resource, subprocess, sys; "
        f"done = subprocess.run({command!r}, capture_output=True); "
        "sys.stderr.write(done.stderr.decode()[-2000:]) if done.returncode else None; "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return int(done.stdout.strip().splitlines()[-1]) / 1024  # kB -> MiB (Linux)


def memory(args, root: Path, out: Path) -> list[tuple[str, str, str]]:
    one = peak_rss_mib(args, root, 1, out)
    many = peak_rss_mib(args, root, args.epochs, out)
    return [
        ("2", f"peak RSS of a fit: {args.epochs} / 1 augmented epochs",
         f"{many:.0f} MiB / {one:.0f} MiB = **{many / one:.2f}×** (target ≤ 1.2)"),
    ]  # fmt: skip


# -------------------------------------------------------------------- 3. protocol
def extraction_pass(args, root: Path, device: torch.device) -> float:
    extractor = build_backbone(args.backbone, pretrained=not args.random_weights).to(device)
    dm = MVTecDataModule(str(root), args.category, fold=None)
    train, test = dm.samples()
    loader = DataLoader(
        ImageDataset(train + test, ImagePipeline(extractor.image_size)), batch_size=args.batch_size,
        num_workers=args.workers, pin_memory=device.type == "cuda",
    )  # fmt: skip
    start = time.perf_counter()
    for batch in loader:
        with autocast(device):
            extractor(batch["image"].to(device, non_blocking=True))
    sync(device)
    return time.perf_counter() - start


def protocol(args, root: Path, cache: Path | None, out: Path, figures: bool = False, folds: int = 5) -> float:
    """All 5 folds x {none, NPCA 1%}; every run scores all levels with all three score types.

    ``figures``: draw each run's PNGs (the CLI's default); a sweep passes ``--figures false``.
    """
    trainer_options = {"accelerator": "gpu", "precision": "bf16-mixed"} if torch.cuda.is_available() else {}
    start = time.perf_counter()
    for fold in range(folds):
        for reduction in ("none", "npca"):
            model = GaussianAD(
                args.backbone,
                pretrained=not args.random_weights,
                reduction=reduction,
                variance_threshold=0.99 if reduction == "npca" else None,
            )
            dm = MVTecDataModule(
                str(root), args.category, fold=fold, batch_size=args.batch_size, num_workers=args.workers,
                feature_cache=None if cache is None else str(cache),
            )  # fmt: skip
            trainer = pl.Trainer(
                max_epochs=1, devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, default_root_dir=out / f"{fold}-{reduction}",
                use_distributed_sampler=False, callbacks=[RunReport(figures)], **trainer_options,
            )  # fmt: skip
            fit(trainer, model, dm)
            trainer.test(model, datamodule=dm, verbose=False)
    return time.perf_counter() - start


def protocol_ratios(args, root: Path, device: torch.device, out: Path) -> list[tuple[str, str, str]]:
    single = extraction_pass(args, root, device)
    cached = protocol(args, root, out / "cache", out / "cached")
    warm = protocol(args, root, out / "cache", out / "warm", folds=1)  # the cache is filled now
    drawn = protocol(args, root, out / "cache", out / "drawn", figures=True, folds=1)
    uncached = protocol(args, root, None, out / "uncached")
    return [
        ("3", "5 folds × {none, NPCA 1%} × 9 levels × 3 scores, feature cache, `--figures false` "
         "/ one extraction pass",
         f"{cached:.1f} s / {single:.1f} s = **{cached / single:.2f}×** (target ≤ 1.5)"),
        ("3", "the same without the cache / one extraction pass",
         f"{uncached:.1f} s / {single:.1f} s = **{uncached / single:.2f}×**"),
        ("3", "fold 0 × {none, NPCA 1%} again on the filled cache, per run: with the run's figures "
         "(the default) / without",
         f"{drawn / 2:.2f} s / {warm / 2:.2f} s"),
    ]  # fmt: skip


# --------------------------------------------------------------- 4. finalisation
def finalisation(device: torch.device) -> list[tuple[str, str, str]]:
    generator = torch.Generator().manual_seed(0)
    cells = []
    for dim in B4_DIMS:
        accumulator = RunningMoments(dim).to(device)
        accumulator.update(torch.randn(dim + 64, dim, generator=generator).to(device))
        times = []
        for _ in range(3):  # the fastest of three
            sync(device)
            start = time.perf_counter()
            fit_gaussian(accumulator.moments())
            sync(device)
            times.append(time.perf_counter() - start)
        cells.append(f"{dim}: {1000 * min(times):.1f} ms")
    return [
        (
            "4",
            "Ledoit-Wolf shrinkage + inversion per level, float64 (efficientnet-b4 widths)",
            ", ".join(cells),
        )
    ]


#: How a table this command wrote begins (a rerun may replace it).
TABLE_START = b"Machine: "


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="anomaly benchmark", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", required=True, help="folder holding the MVTec AD categories")
    parser.add_argument("--category", default="bottle")
    parser.add_argument("--backbone", default=None, help="default: efficientnet-b4 on CUDA, else -lite0")
    parser.add_argument(
        "--random-weights",
        action="store_true",
        help="time the backbone with random weights (a machine without the download; speed is the same)",
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    parser.add_argument("--images", type=int, default=192, help="images timed in measurement 1")
    parser.add_argument("--epochs", type=int, default=20, help="augmented epochs of measurement 2")
    parser.add_argument("--quick", action="store_true", help="24 train, 12 test images per defect type")
    parser.add_argument("--only", default="1234", help="which measurements to run, e.g. 14")
    parser.add_argument("--out", default=None, help="also write the table to this file")
    parser.add_argument(
        "--overwrite", action="store_true", help="let --out replace a file that is not an earlier table"
    )
    args = parser.parse_args(argv)
    if args.out is not None:  # claimed before any work: never an input, nor a file of another origin
        args.out = claim_output(
            args.out, ours=starts_with(TABLE_START), overwrite=args.overwrite, command="anomaly benchmark"
        )
    root = Path(args.root).expanduser()
    require_folder(root, "--root", "give the folder holding the MVTec AD categories")
    scan_mvtec(root, args.category)  # a wrong root or category: one line, before any work
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.backbone = args.backbone or ("efficientnet-b4" if device.type == "cuda" else "efficientnet-lite0")
    quiet_lightning()
    warnings.filterwarnings("ignore")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        root = subset_category(Path(args.root), args.category, 24 if args.quick else None, 12, out)
        rows = []
        steps = {
            "1": lambda: throughput(args, root, device, out),
            "2": lambda: memory(args, root, out),
            "3": lambda: protocol_ratios(args, root, device, out),
            "4": lambda: finalisation(device),
        }
        for key in args.only:
            rows += steps[key]()
            print(f"measurement {key} done after {time.perf_counter() - started:.0f} s", file=sys.stderr)
    precision = "bf16 autocast features, float64 statistics" if device.type == "cuda" else "float32 features"
    lines = [
        f"{TABLE_START.decode()}{machine()}. Backbone: {args.backbone} ({precision}"
        f"{', random weights' if args.random_weights else ''}); category {args.category}"
        f"{' (quick: the first 24 train images, 12 test images per defect type)' if args.quick else ''}; "
        f"batch size {args.batch_size}, "
        f"{args.workers} loader workers; total {time.perf_counter() - started:.0f} s.",
        "",
        "| # | measurement | result |",
        "|---|---|---|",
        *[f"| {n} | {what} | {value} |" for n, what, value in rows],
    ]
    table = "\n".join(lines)
    print(table)
    if args.out is not None:
        write_bytes_atomic(args.out, (table + "\n").encode())
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(lambda: run(argv))


if __name__ == "__main__":
    from anomaly.commands import run

    run(main)
