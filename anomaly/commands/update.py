"""Teach a saved detector new good images: a new detector file, equal to a fit on all the images.

anomaly update --detector line3.safetensors --input shift_2026-12-05/ --out line3_v2.safetensors
anomaly update --detector line3.safetensors --input new/ --out v2.safetensors --reject-flagged
anomaly update --detector line3.safetensors --input new/ --out v2.safetensors --calibrate held_out/

The new images are read exactly as the detector's own were (image size, resize and fit
rules, tiles, pooling, levels and, for a detector of an augmented run, its augmented
epochs); their streamed moments are merged into the detector's and every Gaussian (and
PCA/NPCA projection) is refitted. The result equals a fit on the old and new images
together. The detector given is never modified; --out is written whole (an interrupted update leaves
none) and replaces an existing file only with --overwrite.

Before absorbing, the new images are scored by the current detector, and those it would
flag as anomalous are listed: a defective part slipped into the good folder should not
become "normal". --reject-flagged leaves them out. An image absorbed before (same bytes)
is skipped, never counted twice. The threshold is kept unless --calibrate DIR gives
held-out good images (then it is set at --fpr on them, and a holdout level weighting is
recomputed) or --threshold sets it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from anomaly.console import run_command
from anomaly.data.images import collect_images, file_digests, refuse_name_pairs
from anomaly.detector.api import GaussianDetector
from anomaly.detector.file import claim_detector_output, detector_files
from anomaly.detector.io import check_device
from anomaly.detector.learning import CANNOT_LEARN, fresh_indices
from anomaly.errors import UserError
from anomaly.stats.threshold import check_fpr

SHOWN = 5  # images named in a note before "..."


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="anomaly update", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--detector", required=True, help="the detector to learn from (never modified)")
    parser.add_argument(
        "--input", help="new good images: a folder (searched recursively), a glob, or one image"
    )
    add_output_options(parser, "the new detector file")
    parser.add_argument(
        "--reject-flagged",
        action="store_true",
        help="leave out the new images the current detector flags as anomalous",
    )
    add_working_point_options(parser)
    parser.add_argument("--weights", help="backbone weights file, if it moved since the detector was saved")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cpu", help="e.g. cpu or cuda")
    return parser.parse_args(argv)


def add_working_point_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--exclude", action="append", default=[], metavar="PATTERN",
        help="leave out files whose name matches, in every image folder given, e.g. '*.png' for masks "
        "beside JPEG images (repeatable)",
    )  # fmt: skip
    parser.add_argument(
        "--calibrate",
        metavar="DIR",
        help="held-out good images (not fitted on): set the threshold at --fpr on them",
    )
    parser.add_argument(
        "--fpr", type=float, help="false-positive rate for --calibrate (default: the detector's)"
    )
    parser.add_argument("--threshold", type=float, help="set this decision threshold instead")


# ---------------------------------------------------------------- shared by update and merge
def new_output(args: argparse.Namespace, inputs: list[str], command: str) -> Path:
    """The detector file ``--out`` names, claimed under the output policy: never an input detector;
    an existing file only with ``--overwrite``."""
    protected = [file for given in inputs for file in detector_files(given)]
    return claim_detector_output(args.out, inputs=protected, overwrite=args.overwrite, command=command)


def add_output_options(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--out", required=True, help=f"{what} (.safetensors, with its .json copy)")
    parser.add_argument(
        "--overwrite", action="store_true", help="let --out replace an existing file (never an input)"
    )


def good_images(spec: str, args: argparse.Namespace, option: str) -> list[Path]:
    """The good images ``option`` names (as ``anomaly predict`` collects them, less ``--exclude``);
    refused where masks seem to lie beside them, which would be learnt or calibrated on as images."""
    paths = collect_images(spec, args.exclude, option=option)
    if not paths:
        raise UserError(f"{option} {spec}: no images found")
    refuse_name_pairs(
        spec,
        paths,
        "if one of each is the other's mask, leave the masks out with --exclude, e.g. "
        "--exclude '*.png'; otherwise rename them",
    )
    return paths


def named(paths: list[Path], extra: list[str] | None = None) -> str:
    shown = [f"{p.name}{'' if extra is None else f' ({extra[i]})'}" for i, p in enumerate(paths[:SHOWN])]
    return ", ".join(shown) + (", ..." if len(paths) > SHOWN else "")


def note(message: str) -> None:
    print(f"note: {message}", file=sys.stderr)


def calibration_images(args: argparse.Namespace) -> list[Path] | None:
    """``--calibrate``'s images (``None`` without it), collected and checked before any work."""
    if args.threshold is not None and args.calibrate:
        raise UserError("give --threshold or --calibrate, not both")
    return good_images(args.calibrate, args, "--calibrate") if args.calibrate else None


def set_working_point(
    detector: GaussianDetector, args: argparse.Namespace, absorbed: set[str], calibration: list[Path] | None
) -> None:
    """The threshold (and holdout level weights): set, recalibrated on the held-out ``calibration``
    images (:func:`calibration_images`), or kept."""
    if args.threshold is not None:
        detector.threshold_ = float(args.threshold)
        detector.model_.set_threshold(detector.threshold_)
        note(f"threshold set to {detector.threshold_:.6g} on {detector.decision_score_} (--threshold)")
        return
    model = detector.model_
    if calibration is None:
        kept = "none" if detector.threshold_ is None else f"{detector.threshold_:.6g}"
        weighting = " and the holdout level weights" if model.level_weighting != "none" else ""
        note(
            f"threshold kept at {kept} on {detector.decision_score_}{weighting}; pass --calibrate DIR "
            "with held-out good images to recalibrate"
        )
        return
    fpr = args.fpr if args.fpr is not None else detector.fpr_
    if fpr is None:
        raise UserError("--calibrate needs a false-positive rate: pass --fpr, e.g. 0.01")
    check_fpr(fpr)
    digests = file_digests(calibration)
    fitted = [p for p, digest in zip(calibration, digests, strict=True) if digest in absorbed]
    if fitted:
        raise UserError(
            f"--calibrate {args.calibrate}: {len(fitted)} image(s) were fitted on ({named(fitted)}); "
            "calibrate on held-out good images only"
        )
    if model.level_weighting != "none":
        model.reset_level_weights()
        columns = detector.score_columns(calibration)
        model.set_level_weights({name: torch.as_tensor(values) for name, values in columns.items()})
    detector.calibrate(calibration, fpr)
    note(
        f"threshold recalibrated on {len(calibration)} held-out images: "
        f"{detector.threshold_:.6g} at FPR {fpr:g}"
    )


def save_new(detector: GaussianDetector, out: Path) -> Path:
    path = detector.save(out)
    print(
        f"wrote {path} ({detector.model_.samples} samples of {len(detector.model_.absorbed)} images)",
        file=sys.stderr,
    )
    return path


# ---------------------------------------------------------------- update
def screen(detector: GaussianDetector, paths: list[Path], reject: bool) -> list[Path]:
    """Report how the current detector scores ``paths``; with ``reject``, leave out those it flags."""
    threshold = detector.threshold_
    if threshold is None:
        note("the detector has no threshold: the new images cannot be screened for anomalies")
        return paths
    scores = detector.decision_function(paths)
    flagged = np.flatnonzero(scores > threshold)
    if not len(flagged):
        note(f"the current detector flags none of the {len(paths)} new images (threshold {threshold:.6g})")
        return paths
    flagged_paths = [paths[i] for i in flagged]
    listed = named(flagged_paths, [f"score {scores[i]:.4g}" for i in flagged])
    action = "left out (--reject-flagged)" if reject else "absorbed anyway; --reject-flagged leaves them out"
    print(
        f"warning: the current detector flags {len(flagged)} of {len(paths)} new images as anomalous "
        f"(threshold {threshold:.6g} on {detector.decision_score_}): {listed}; {action}",
        file=sys.stderr,
    )
    return [p for i, p in enumerate(paths) if i not in set(flagged.tolist())] if reject else paths


def run(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")
    if not (args.input or args.calibrate or args.threshold is not None):
        raise UserError("give new good images with --input (or only --calibrate DIR / --threshold)")
    check_device(args.device, hint="--device cpu")
    out = new_output(args, [args.detector], "anomaly update")
    calibration = calibration_images(args)
    detector = GaussianDetector.load(args.detector, weights=args.weights, device=args.device)
    detector.batch_size = args.batch_size
    model = detector.model_
    if args.input:
        if not model.learns:
            raise UserError(f"{args.detector} cannot be updated: {CANNOT_LEARN}")
        paths = good_images(args.input, args, "--input")
        digests = file_digests(paths)
        fresh, repeated = fresh_indices(digests, model.absorbed)
        if not fresh:
            raise UserError(
                f"no new image to absorb: all {len(paths)} were absorbed before (nothing written)"
            )
        if repeated:
            note(
                f"{len(repeated)} image(s) absorbed before (or repeated) skipped: "
                f"{named([paths[i] for i in repeated])}"
            )
        paths = screen(detector, [paths[i] for i in fresh], args.reject_flagged)
        if not paths:
            raise UserError("no new image to absorb: the detector would not change (nothing written)")
        before = len(model.absorbed)
        detector.partial_fit(paths)
        note(f"absorbed {len(model.absorbed) - before} new images ({len(model.absorbed)} in all)")
    set_working_point(detector, args, set(model.absorbed), calibration)
    detector.source_ = {**detector.source_, "updated_from": str(Path(args.detector))}
    save_new(detector, out)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(
        lambda: run(parse_args(argv)), on_interrupt="nothing was written; the detector is unchanged"
    )


if __name__ == "__main__":
    from anomaly.commands import run

    run(main)
