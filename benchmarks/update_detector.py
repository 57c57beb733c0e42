"""Updating a detector against refitting it: time and file size on an MVTec AD category (not a test).

python benchmarks/update_detector.py /data/mvtec_ad/bottle
python benchmarks/update_detector.py /data/mvtec_ad/bottle --new 50 --pooling cells --backbone efficientnet-b4

Fits a detector on all but the last ``--new`` training images, then times, side by side in one
process: ``anomaly update`` with the ``--new`` images (load, digest, screen them with the current
detector, absorb, refit, write), ``GaussianDetector.partial_fit`` alone, and a full refit on all the
training images. Prints the file size with and without the streamed moments, and how far the
updated detector's test scores are from the refitted one's (they should agree to rounding).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from anomaly.commands import main as anomaly
from anomaly.data.images import list_images
from anomaly.detector import GaussianDetector
from anomaly.pooling import build_pooling


def timed(action):
    start = time.perf_counter()
    result = action()
    return result, time.perf_counter() - start


def run(args: argparse.Namespace) -> None:
    train = list_images(args.category / "train" / "good")
    test = list_images(args.category / "test" / "good")[: args.test]
    old, new = train[: -args.new], train[-args.new :]

    def detector() -> GaussianDetector:
        pooling = build_pooling(args.pooling, grid_size=args.grid_size)
        return GaussianDetector(backbone=args.backbone, pooling=pooling, batch_size=args.batch_size)

    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        (folder / "new").mkdir()
        for path in new:
            (folder / "new" / path.name).symlink_to(path.resolve())
        fitted, fit_old_s = timed(lambda: detector().fit(old))
        with_moments = fitted.save(folder / "old.safetensors")
        without = fitted.save(folder / "small.safetensors", moments=False)
        argv = ["update", "--detector", str(with_moments), "--input", str(folder / "new")]
        argv += ["--out", str(folder / "new.safetensors"), "--batch-size", str(args.batch_size)]
        code, update_s = timed(lambda: anomaly(argv))
        assert code == 0, "anomaly update failed"
        _, partial_s = timed(lambda: GaussianDetector.load(with_moments).partial_fit(new))
        refit, refit_s = timed(lambda: detector().fit(train))
        updated = GaussianDetector.load(folder / "new.safetensors")
        ours, theirs = updated.decision_function(test), refit.decision_function(test)
        worst = float(np.max(np.abs(ours - theirs) / np.abs(theirs)))
        sizes = (with_moments.stat().st_size, without.stat().st_size)
    print(
        f"| {args.category.name}, {args.backbone}, pooling {args.pooling} | {len(old)} + {len(new)} images |"
    )
    print("|---|---|")
    print(f"| fit on the first {len(old)} images | {fit_old_s:.1f} s |")
    print(
        f"| `anomaly update` with {len(new)} new images (load, screen, absorb, refit, write) "
        f"| {update_s:.1f} s |"
    )
    print(f"| `partial_fit` with {len(new)} new images | {partial_s:.1f} s |")
    print(f"| full refit on all {len(train)} images | {refit_s:.1f} s |")
    print(f"| file with moments / without | {sizes[0] / 2**20:.2f} MiB / {sizes[1] / 2**20:.2f} MiB |")
    print(f"| largest relative difference of {len(test)} test scores, update vs refit | {worst:.1e} |")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("category", type=Path, help="an MVTec AD category folder, e.g. /data/mvtec_ad/bottle")
    parser.add_argument("--new", type=int, default=50, help="training images held back and added by update")
    parser.add_argument("--backbone", default="efficientnet-lite0")
    parser.add_argument("--pooling", default="global")
    parser.add_argument("--grid-size", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--test", type=int, default=10, help="good test images compared")
    run(parser.parse_args())


if __name__ == "__main__":
    main()
