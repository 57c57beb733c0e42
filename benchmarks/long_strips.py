"""Long and large images: stretch vs pad vs crop vs tiles (see docs/own-data.md).

Builds a long-strip dataset from real photos, in MVTec layout, under a folder you give
(never inside the project), then fits and tests one run per layout and prints image and
pixel AUROC::

    python benchmarks/long_strips.py build --bottle /data/mvtec_ad/bottle --out /tmp/strips
    python benchmarks/long_strips.py compare --root /tmp/strips --category bottle_strips \\
        --runs /tmp/strips-runs

The strips are horizontal bands of MVTec AD ``bottle`` images (900x900): ``--strips`` bands of
``--strip-height`` pixels, evenly spaced from top to bottom (default three 900x360 bands, 2.5:1).
A band is anomalous when it holds pixels of the image's ground-truth mask (its band of the mask
is saved as its mask); the other bands, also those of defective photos, are normal test images.
Training bands come from the first ``--train-images`` sorted training photos.

``compare`` also runs on any MVTec-layout or configured data: ``--config magnetic_tile --root
/data/magnetic_tile`` compares the layouts on Magnetic-Tile (fold 0). ``subset`` links every
k-th image of each ``*/Imgs`` folder of Magnetic-Tile (and its mask) into a smaller copy of its
layout, for a bounded comparison on a small machine::

    python benchmarks/long_strips.py subset --source /data/magnetic_tile --out /tmp/mt --every 3 2
    python benchmarks/long_strips.py compare --root /tmp/mt --config magnetic_tile --configs default \
        --layouts stretch pad crop "tiles 2x2" --runs /tmp/mt-runs

``build`` and ``subset`` fill a new (or empty) folder, which appears only once it is complete.
``compare``'s ``--runs`` must be a new or empty folder, or one ``compare`` wrote before (it
records what it wrote, as ``anomaly predict --maps`` does): a rerun replaces its runs, logs
and ``comparison.json``, each written whole.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from anomaly.atomic import built_whole, open_atomically
from anomaly.console import run_command
from anomaly.outputs import OutputFolder, claim_new_folder, write_json

COMMAND = "benchmarks/long_strips.py"
PROJECT = Path(__file__).resolve().parents[1]
#: (label, extra ``anomaly fit`` options) of each compared layout.
LAYOUTS = {
    "stretch": [],
    "pad": ["--data.fit", "pad"],
    "crop": ["--data.fit", "crop"],
    "tiles 1x3": ["--data.tiles", "1x3"],
    "tiles 1x3 + pad": ["--data.tiles", "1x3", "--data.fit", "pad"],
    "tiles 2x2": ["--data.tiles", "2x2"],
}


def strip_rows(height: int, strip_height: int, strips: int) -> list[int]:
    """The top rows of ``strips`` bands of ``strip_height`` evenly spaced over ``height`` pixels."""
    if strips == 1:
        return [(height - strip_height) // 2]
    return [round(i * (height - strip_height) / (strips - 1)) for i in range(strips)]


def build(bottle: Path, out: Path, category: str, strip_height: int, strips: int, train_images: int) -> None:
    """Write ``out/<category>`` in MVTec layout (train/good, test/good, test/defect, ground_truth)."""
    base = claim_new_folder(out / category, option="--out", command=f"{COMMAND} build")
    with built_whole(base) as building:
        counts = write_strips(bottle, building, strip_height, strips, train_images)
    print(f"wrote {base}: " + ", ".join(f"{n} {what}" for what, n in counts.items()))


def write_strips(bottle: Path, base: Path, strip_height: int, strips: int, train_images: int) -> dict:
    """The bands of :func:`build` written under ``base``; the number of images of each kind."""
    counts = {"train": 0, "test normal": 0, "test anomalous": 0}

    def save(array: np.ndarray, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(path)

    for photo in sorted((bottle / "train" / "good").glob("*.png"))[:train_images]:
        rgb = np.asarray(Image.open(photo).convert("RGB"))
        for k, top in enumerate(strip_rows(rgb.shape[0], strip_height, strips)):
            save(rgb[top : top + strip_height], base / "train" / "good" / f"{photo.stem}_{k}.png")
            counts["train"] += 1
    for folder in sorted(p for p in (bottle / "test").iterdir() if p.is_dir()):
        for photo in sorted(folder.glob("*.png")):
            rgb = np.asarray(Image.open(photo).convert("RGB"))
            mask_file = bottle / "ground_truth" / folder.name / f"{photo.stem}_mask.png"
            mask = np.asarray(Image.open(mask_file).convert("L")) if mask_file.exists() else None
            for k, top in enumerate(strip_rows(rgb.shape[0], strip_height, strips)):
                name = f"{folder.name}_{photo.stem}_{k}"
                band = None if mask is None else mask[top : top + strip_height]
                if band is not None and band.any():
                    save(rgb[top : top + strip_height], base / "test" / "defect" / f"{name}.png")
                    save(band, base / "ground_truth" / "defect" / f"{name}_mask.png")
                    counts["test anomalous"] += 1
                else:
                    save(rgb[top : top + strip_height], base / "test" / "good" / f"{name}.png")
                    counts["test normal"] += 1
    return counts


def subset(source: Path, out: Path, every_normal: int, every_defect: int) -> None:
    """Symbolic links to every k-th ``.jpg`` (and its ``.png`` mask) of each ``*/Imgs`` folder."""
    out = claim_new_folder(out, option="--out", command=f"{COMMAND} subset")
    counts = {}
    with built_whole(out) as building:
        for folder in sorted(source.glob("*/Imgs")):
            step = every_normal if folder.parent.name == "MT_Free" else every_defect
            target = building / folder.relative_to(source)
            target.mkdir(parents=True)
            images = sorted(folder.glob("*.jpg"))[::step]
            for image in images:
                for path in (image, image.with_suffix(".png")):
                    if path.exists():
                        (target / path.name).symlink_to(path.resolve())
            counts[out / folder.relative_to(source)] = len(images)
    for target, count in counts.items():
        print(f"{target}: {count} images")


def run_fit(args: list[str], log: Path) -> dict | None:
    """One ``anomaly fit`` in a subprocess; its results.json, or ``None`` when it failed."""
    root_dir = Path(args[args.index("--trainer.default_root_dir") + 1])
    started = time.perf_counter()
    with open_atomically(log) as handle:  # whole when the run has ended
        command = [sys.executable, "-m", "anomaly", "fit", *args]
        code = subprocess.call(command, stdout=handle, stderr=handle, cwd=PROJECT)
    if code != 0:
        print(f"  failed (exit {code}), see {log}")
        return None
    (results,) = root_dir.glob("**/results.json")
    data = json.loads(results.read_text())
    data["wall_seconds"] = time.perf_counter() - started
    return data


def slug(config: str, layout: str) -> str:
    """The name of a (config, layout) run's folder and log in ``--runs``."""
    return f"{config}-{layout.replace(' ', '').replace('+', '-')}"


def compare(args: argparse.Namespace) -> None:
    runs = OutputFolder(args.runs, option="--runs", command=f"{COMMAND} compare")
    names = [slug(config, layout) for config in args.configs for layout in args.layouts]
    runs.claim([*names, *(f"{name}.log" for name in names), "comparison.json"])
    runs = runs.folder
    rows = []
    for config in args.configs:
        for layout in args.layouts:
            name = slug(config, layout)
            fit_args = [
                *([] if config == "default" else ["--config", config]),  # the model, then the data
                *(["--config", args.config] if args.config else []),
                "--data.root", str(args.root),
                "--data.num_workers", "0",
                "--data.fold", "0",
                "--trainer.default_root_dir", str(runs / name),
                *(["--data.category", args.category] if args.category else []),
                *LAYOUTS[layout],
            ]  # fmt: skip
            print(f"{config:14s} {layout:16s} ...", flush=True)
            results = run_fit(fit_args, runs / f"{name}.log")
            if results is None:
                continue
            row = {
                "config": config,
                "layout": layout,
                "image_auroc": results["image_auroc"],
                "pixel_auroc": results.get("pixel_auroc"),
                "n_train": results["n_train"],
                "n_test": results["n_test"],
                "n_test_anomalous": results["n_test_anomalous"],
                "seconds": round(results["wall_seconds"]),
            }
            rows.append(row)
            print("  " + json.dumps(row), flush=True)
    write_json(runs / "comparison.json", {"rows": rows}, command=f"{COMMAND} compare")
    print("\n| config | layout | image AUROC | pixel AUROC | seconds |\n|---|---|---|---|---|")
    for row in rows:
        pixel = "" if row["pixel_auroc"] is None else f"{row['pixel_auroc']:.3f}"
        print(
            f"| {row['config']} | {row['layout']} | {row['image_auroc']:.3f} | {pixel} | {row['seconds']} |"
        )


def main(argv: list[str] | None = None) -> int:
    return run_command(lambda: dispatch(argv))


def dispatch(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    make = sub.add_parser("build", help="write the long-strip dataset")
    make.add_argument("--bottle", required=True, type=Path, help="the MVTec AD bottle folder")
    make.add_argument("--out", required=True, type=Path, help="folder to write (outside the project)")
    make.add_argument("--category", default="bottle_strips")
    make.add_argument("--strip-height", type=int, default=360)
    make.add_argument("--strips", type=int, default=3, help="bands per photo")
    make.add_argument("--train-images", type=int, default=209, help="training photos used (sorted)")
    part = sub.add_parser("subset", help="link every k-th Magnetic-Tile image into a smaller copy")
    part.add_argument("--source", required=True, type=Path, help="the magnetic_tile folder")
    part.add_argument("--out", required=True, type=Path)
    part.add_argument("--every", nargs=2, type=int, default=[3, 2], metavar=("NORMAL", "DEFECT"))
    run = sub.add_parser("compare", help="fit and test one run per layout, print the table")
    run.add_argument("--root", required=True, type=Path, help="the data root (--data.root)")
    run.add_argument("--category", default=None, help="--data.category (MVTec layout)")
    run.add_argument("--config", default=None, help="a data config applied first, e.g. magnetic_tile")
    run.add_argument("--configs", nargs="+", default=["default", "spatial_cells"], help="model configs")
    run.add_argument("--layouts", nargs="+", default=list(LAYOUTS)[:4], choices=list(LAYOUTS))
    run.add_argument("--runs", required=True, type=Path, help="folder for the runs and comparison.json")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if args.command == "build":
        build(args.bottle, args.out, args.category, args.strip_height, args.strips, args.train_images)
    elif args.command == "subset":
        subset(args.source, args.out, *args.every)
    else:
        compare(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
