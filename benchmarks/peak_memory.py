"""Peak memory and wall time of ``anomaly fit`` (fit + test) for several configs, side by side.

Each config runs in a fresh Python process on the same category, one after the other; the peak
resident memory (RSS) is that of the largest process (``getrusage(RUSAGE_CHILDREN)`` in a fresh
parent; ``--data.num_workers 0``, so that one process holds everything), the wall time that of the
whole command. ``--make SOURCE`` first writes a category of large images from the images of an
MVTec AD category ``SOURCE`` (resized to ``--size``, flipped copies where more are needed) in the
layout of ``anomaly.data.folder.FolderDataModule``: ``ROOT/normal`` and ``ROOT/test/{good,defect}``.

    python benchmarks/peak_memory.py /tmp/large_bottle --make ../shared/data/mvtec_ad/bottle
    python benchmarks/peak_memory.py /tmp/large_bottle --configs recommended spatial_grid_maps

The commands run this clone's code, or with ``PYTHONPATH=OTHER_CLONE`` another clone's (for a
before/after comparison on one machine).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import cv2

CLONE = Path(__file__).resolve().parents[1]
CONFIGS = ["recommended", "spatial_grid", "spatial_grid_maps", "paper"]
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")


def images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and "mask" not in p.name)


def make_category(root: Path, source: Path, size: int, normal: int, good: int, defects: int) -> None:
    """``normal`` + ``good`` + ``defects`` images of ``size`` px from an MVTec AD category."""
    train = images_in(source / "train" / "good")
    test_good = images_in(source / "test" / "good")
    test_bad = [p for p in images_in(source / "test") if p.parent.name != "good"]
    plan = {"normal": (train, normal), "test/good": (test_good, good), "test/defect": (test_bad, defects)}
    for folder, (paths, count) in plan.items():
        if not paths:
            raise SystemExit(f"error: {source} has no images for {folder}")
        (root / folder).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            image = cv2.imread(str(paths[i % len(paths)]), cv2.IMREAD_COLOR)
            if (i // len(paths)) % 2:
                image = cv2.flip(image, 1)
            image = cv2.resize(image, (size, size), interpolation=cv2.INTER_CUBIC)
            cv2.imwrite(str(root / folder / f"{i:04d}.png"), image)


PROBE = (
    "import resource, subprocess, sys, time; started = time.perf_counter(); "
    "code = subprocess.call(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); "
    "print(code, time.perf_counter() - started, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
)


def measure(config: str, root: Path, out: Path) -> dict:
    """Peak RSS (MiB) and wall time (s) of one ``anomaly fit`` in a fresh parent (``config``: a shipped
    config's name or a config file)."""
    name = Path(config).stem
    if Path(config).is_file():
        config = str(Path(config).resolve())  # the command runs in the scratch folder
    command = [
        sys.executable, "-m", "anomaly", "fit", "--config", "folder", "--config", config,
        "--data.root", str(root.resolve()), "--data.num_workers", "0", "--trainer.logger", "false",
        "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(out / name),
    ]  # fmt: skip
    # from the scratch folder: ``python -m`` puts the working directory first on the path
    env = {**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH") or str(CLONE)}
    probe = [sys.executable, "-c", PROBE, *command]
    code, seconds, max_rss_kib = subprocess.check_output(probe, cwd=out, env=env).split()
    results = sorted((out / name).rglob("results.json"))
    metrics = json.loads(results[-1].read_text()) if results else {}
    return {
        "config": config,
        "exit_code": int(code),
        "peak_rss_mib": int(max_rss_kib) / 1024,
        "seconds": float(seconds),
        "image_auroc": metrics.get("image_auroc"),
        "pixel_auroc": metrics.get("pixel_auroc"),
        "detector_mib": sum(p.stat().st_size for p in (out / name).rglob("detector.safetensors")) / 2**20,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("root", type=Path, help="the category: ROOT/normal and ROOT/test/<type>")
    parser.add_argument("--configs", nargs="+", default=CONFIGS)
    parser.add_argument(
        "--make", type=Path, default=None, help="write ROOT first from this MVTec AD category"
    )
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument(
        "--counts", nargs=3, type=int, default=[240, 20, 40], metavar=("NORMAL", "GOOD", "DEFECT")
    )
    args = parser.parse_args(argv)
    if args.make is not None:
        make_category(args.root, args.make, args.size, *args.counts)
    if not (args.root / "normal").is_dir():
        print(
            f"error: {args.root}/normal does not exist: give --make SOURCE to write the category",
            file=sys.stderr,
        )
        return 2
    print(f"{len(images_in(args.root))} images in {args.root}", file=sys.stderr)
    print("| config | peak RSS (MiB) | fit + test (s) | image AUROC | pixel AUROC | detector (MiB) | exit |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as scratch:
        for config in args.configs:
            r = measure(config, args.root, Path(scratch))
            auroc, pixel = ("-" if r[k] is None else f"{r[k]:.4f}" for k in ("image_auroc", "pixel_auroc"))
            print(
                f"| {config} | {r['peak_rss_mib']:.0f} | {r['seconds']:.0f} | {auroc} | {pixel} | "
                f"{r['detector_mib']:.0f} | {r['exit_code']} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
