"""Score new images with a saved detector.

anomaly predict --detector runs/gaussian/.../fold_0/detector.safetensors --input new/ --out scores.csv
anomaly predict --detector detector.safetensors --input 'line3/**/*.png'
anomaly predict --detector detector.safetensors --input part_0042.jpg
anomaly predict --detector cells_run/detector.safetensors --input new/ --maps maps/

Writes one CSV row per image: path, score (higher = more anomalous), the score
of every level, decision (1 = anomalous at the detector's saved threshold,
0 = normal; empty when the detector has none) and error (why an image could not
be read, or its score is not finite; the run goes on). Detectors with anomaly
maps (pooling cells or grid_maps) add map_max_x and map_max_y, the pixel of the map's maximum
in the original image; --maps DIR writes per image the map at the image's size
(.npy, float32) and a heat-map overlay (.png). When not a single image can be
read, that is an error and no CSV is written; --out is replaced only when the
run succeeds (an interrupted run keeps its rows in OUT.partial).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from anomaly.console import Terminated, run_command
from anomaly.detector.api import GaussianDetector, check_device
from anomaly.detector.inputs import expand_input
from anomaly.detector.predict import check_loader_options, predict_files
from anomaly.errors import UserError


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="anomaly predict", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--detector", required=True, help="detector.safetensors (or its run folder)")
    parser.add_argument(
        "--input", required=True, help="a folder (searched recursively), a glob, or one image"
    )
    parser.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="PATTERN",
        help="leave out files whose name matches, e.g. '*.png' for masks beside JPEG images (repeatable)",
    )
    parser.add_argument("--out", help="CSV file to write (default: standard output)")
    parser.add_argument(
        "--maps",
        metavar="DIR",
        help="write each image's anomaly map (.npy) and overlay (.png) here (pooling cells or grid_maps)",
    )
    parser.add_argument("--weights", help="backbone weights file, if it moved since the detector was saved")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-workers", type=int, default=0, help="image-reading worker processes")
    parser.add_argument("--device", default="cpu", help="e.g. cpu or cuda")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser.parse_args(argv)


@contextlib.contextmanager
def output_file(path: str | None) -> Iterator[TextIO]:
    """Standard output, or a temporary file beside ``path`` that becomes ``path`` only on success.

    A failure leaves no file. An interrupted run (Ctrl-C, SIGTERM) keeps the rows written so far
    in ``path.partial`` and leaves an earlier ``path`` as it was.
    """
    if path is None:
        yield sys.stdout
        return
    target = Path(path)
    if target.is_dir():
        raise UserError(f"--out {path} is a folder: give a CSV file name")
    blocking = next((folder for folder in target.parents if folder.exists() and not folder.is_dir()), None)
    if blocking is not None:
        raise UserError(f"--out {path}: {blocking} is a file, not a folder: give a path in a folder")
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        file = open(tmp, "w", newline="")  # noqa: SIM115 (closed below, before the rename)
    except OSError as exc:
        raise UserError(f"cannot write --out {path}: {exc.strerror or exc}") from exc
    try:
        with file:
            yield file
    except (KeyboardInterrupt, Terminated):
        if tmp.stat().st_size:
            os.replace(tmp, partial_path(target))
        raise
    else:
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def partial_path(target: Path) -> Path:
    """Where an interrupted run keeps its rows: never the name of a complete result."""
    return target.with_name(target.name + ".partial")


def run(args: argparse.Namespace) -> int:
    check_loader_options(args.batch_size, args.num_workers)
    check_device(args.device, hint="--device cpu")
    detector = GaussianDetector.load(args.detector, weights=args.weights, device=args.device)
    if detector.threshold_ is None:
        print(
            "note: this detector has no threshold (working point): the decision column is left empty; "
            "rank by score, or give it one: fit on a fold (its held-out images set it), with "
            "--model.threshold_method chi2 or --model.threshold, or GaussianDetector.calibrate()",
            file=sys.stderr,
        )
    paths = list(expand_input(args.input, args.exclude))
    with output_file(args.out) as out:
        summary = predict_files(
            detector, paths, out, args.batch_size, args.num_workers, not args.no_progress,
            Path(args.maps) if args.maps else None,
        )  # fmt: skip
    decided = "" if detector.threshold_ is None else f", {summary.anomalous} anomalous"
    score = detector.decision_score_
    threshold = "none" if detector.threshold_ is None else f"{detector.threshold_:.6g} on {score}"
    print(
        f"scored {summary.scored} images{decided}, {summary.failed} unreadable (threshold: {threshold})",
        file=sys.stderr,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(
        lambda: run(parse_args(argv)),
        on_interrupt="the rows scored so far are in --out's .partial file",
    )


if __name__ == "__main__":
    sys.exit(main())
