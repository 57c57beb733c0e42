"""Combine detectors fitted on disjoint images (other machines, sharded jobs) into the detector of all.

anomaly merge --detectors line3_a.safetensors line3_b.safetensors --out line3.safetensors
anomaly merge --detectors shard_*/detector.safetensors --out all.safetensors --calibrate held_out/

The detectors must have been fitted the same way (backbone and its weights, levels,
pooling and its options, image size, resize and fit rules, tiles, reduction, epochs and
augmentation, level weighting, decision score, precision): the first field in which two
differ is named, and nothing is written. Their streamed moments are merged and every
Gaussian refitted: the result equals one fit on all their images. Detectors that share an
image are refused (it would count twice). The threshold is the first detector's unless
--calibrate DIR (held-out good images) or --threshold sets it. --out replaces an existing
file only with --overwrite, and never one of the detectors.
"""

from __future__ import annotations

import argparse

from anomaly.commands.update import (
    add_output_options,
    add_working_point_options,
    calibration_images,
    new_output,
    save_new,
    set_working_point,
)
from anomaly.console import run_command
from anomaly.detector.api import GaussianDetector, merge
from anomaly.detector.io import check_device


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="anomaly merge", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--detectors", required=True, nargs="+", help="two or more detector files")
    add_output_options(parser, "the merged detector file")
    add_working_point_options(parser)
    parser.add_argument("--device", default="cpu", help="e.g. cpu or cuda")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    check_device(args.device, hint="--device cpu")
    out = new_output(args, args.detectors, "anomaly merge")
    calibration = calibration_images(args)
    detectors = [GaussianDetector.load(path, device=args.device) for path in args.detectors]
    for detector, path in zip(detectors, args.detectors, strict=True):
        detector.source_ = {**detector.source_, "file": path}
    merged = merge(detectors, names=args.detectors)
    set_working_point(merged, args, set(merged.model_.absorbed), calibration)
    save_new(merged, out)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(lambda: run(parse_args(argv)), on_interrupt="nothing was written")


if __name__ == "__main__":
    from anomaly.commands import run

    run(main)
