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
(NAME.map.npy, float32) and a heat-map overlay (NAME.overlay.png, at most 1024
pixels long), NAME being the image's path below the input folder (a/x.png ->
a%2Fx.png), and names them in the map_file and overlay_file columns. When not a
single image can be read, that is an error and no CSV is written; --out is
replaced only when the run succeeds (an interrupted run keeps its rows in
OUT.partial).

Nothing is written over an input or the detector. --out may replace a CSV an
earlier run wrote, another file only with --overwrite; --maps must be a new or
empty folder, or one an earlier --maps wrote (it is never read as input).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TextIO

from anomaly.atomic import naming, replaced_atomically
from anomaly.console import Terminated, run_command
from anomaly.data.images import collect_images
from anomaly.detector.file import detector_files
from anomaly.detector.io import check_device, load_model
from anomaly.detector.predict import check_loader_options, maps_folder, predict_files
from anomaly.outputs import claim_output, starts_with

#: How a CSV of ``anomaly predict`` starts: an earlier run's file may be replaced.
PREDICT_CSV = starts_with(b"path,score,")


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
        "--overwrite",
        action="store_true",
        help="let --out replace an existing file that is not an earlier run's CSV (never an input)",
    )
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


class NamedFile:
    """A text file whose write errors (a full disk names no file) name ``path``."""

    def __init__(self, file: TextIO, path: Path) -> None:
        self.file, self.path = file, path

    def write(self, text: str) -> int:
        try:
            return self.file.write(text)
        except OSError as error:
            raise naming(error, self.path) from error

    def flush(self) -> None:
        try:
            self.file.flush()
        except OSError as error:
            raise naming(error, self.path) from error


@contextlib.contextmanager
def output_file(
    path: str | None, protected: Iterable[Path] = (), overwrite: bool = False
) -> Iterator[TextIO]:
    """Standard output, or a temporary file beside ``path`` that becomes ``path`` only on success.

    ``path`` is claimed first (:func:`~anomaly.outputs.claim_output`): never one of
    ``protected`` (the inputs, the detector), nor an existing file that is not an earlier
    run's CSV unless ``overwrite``. A failure leaves no file. An interrupted run (Ctrl-C,
    SIGTERM) keeps the rows written so far in ``path.partial`` and leaves an earlier
    ``path`` as it was; a successful run removes an earlier run's ``path.partial``.
    """
    if path is None:
        yield sys.stdout
        return
    protected = list(protected)
    claim = {"inputs": protected, "ours": PREDICT_CSV, "overwrite": overwrite, "command": "anomaly predict"}
    target = claim_output(path, **claim)
    partial = claim_output(partial_path(target), **claim, option="--out's interrupted rows")
    with replaced_atomically(target) as tmp, open(tmp, "w", newline="") as file:
        try:
            yield NamedFile(file, target)
            file.flush()
        except (KeyboardInterrupt, Terminated):
            file.close()
            if tmp.stat().st_size:
                os.replace(tmp, partial)
            raise
    if os.path.lexists(partial) and PREDICT_CSV(partial):
        partial.unlink()


def partial_path(target: Path) -> Path:
    """Where an interrupted run keeps its rows: never the name of a complete result."""
    return target.with_name(target.name + ".partial")


def run(args: argparse.Namespace) -> int:
    check_loader_options(args.batch_size, args.num_workers)
    device = check_device(args.device, hint="--device cpu")
    leave_out = [] if args.maps is None else [maps_folder(args.maps).folder]  # checked before reading
    paths = collect_images(args.input, args.exclude, leave_out=leave_out)
    protected = [*detector_files(args.detector, args.weights), *paths]
    with output_file(args.out, protected, args.overwrite) as out:
        model, _ = load_model(args.detector, weights=args.weights, device=device)
        if model.threshold is None:
            print(
                "note: this detector has no threshold (working point): the decision column is left empty; "
                "rank by score, or give it one: fit on a fold (its held-out images set it), with "
                "--model.threshold_method chi2 or --model.threshold, or GaussianDetector.calibrate()",
                file=sys.stderr,
            )
        summary = predict_files(
            model, paths, out, args.batch_size, args.num_workers, not args.no_progress,
            args.maps, protected=detector_files(args.detector, args.weights),
        )  # fmt: skip
    decided = "" if model.threshold is None else f", {summary.anomalous} anomalous"
    threshold = "none" if model.threshold is None else f"{model.threshold:.6g} on {model.decision_score}"
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
    from anomaly.commands import run

    run(main)
