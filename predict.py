"""Score new images with a saved detector.

python predict.py --detector runs/gaussian/.../fold_0/detector.safetensors --input new/ --out scores.csv
python predict.py --detector detector.safetensors --input 'line3/**/*.png'
python predict.py --detector detector.safetensors --input part_0042.jpg

Writes one CSV row per image: path, score (higher = more anomalous), the score
of every level, decision (1 = anomalous at the detector's saved threshold,
0 = normal; empty when the detector has none) and error (why an image could not
be read; the run goes on).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

from anomaly.console import run_command
from anomaly.detector.api import GaussianDetector
from anomaly.detector.inputs import expand_input
from anomaly.detector.predict import predict_files


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--detector", required=True, help="detector.safetensors (or its run folder)")
    parser.add_argument(
        "--input", required=True, help="a folder (searched recursively), a glob, or one image"
    )
    parser.add_argument("--out", help="CSV file to write (default: standard output)")
    parser.add_argument("--weights", help="backbone weights file, if it moved since the detector was saved")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-workers", type=int, default=0, help="image-reading worker processes")
    parser.add_argument("--device", default="cpu", help="e.g. cpu or cuda")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    detector = GaussianDetector.load(args.detector, weights=args.weights, device=args.device)
    if detector.threshold_ is None:
        print(
            "note: this detector has no threshold (working point): the decision column is left empty; "
            "rank by score, or refit with a target FPR",
            file=sys.stderr,
        )
    paths = list(expand_input(args.input))
    with contextlib.ExitStack() as stack:
        out = sys.stdout
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            out = stack.enter_context(open(args.out, "w", newline=""))
        summary = predict_files(detector, paths, out, args.batch_size, args.num_workers, not args.no_progress)
    decided = "" if detector.threshold_ is None else f", {summary.anomalous} anomalous"
    threshold = "none" if detector.threshold_ is None else f"{detector.threshold_:.6g} on {detector.score}"
    print(
        f"scored {summary.scored} images{decided}, {summary.failed} unreadable (threshold: {threshold})",
        file=sys.stderr,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(lambda: run(parse_args(argv)), on_interrupt="the rows written so far are complete")


if __name__ == "__main__":
    sys.exit(main())
