"""anomaly export --detector detector.safetensors --format onnx --out detector.onnx

--out is never the detector (or its weights), and replaces an existing file only when it
is an earlier export of the same format, or with --overwrite. The file is written whole:
an interrupted or failed export leaves an earlier one as it was.
"""

from __future__ import annotations

import argparse

from anomaly.console import run_command
from anomaly.detector.api import GaussianDetector
from anomaly.detector.file import detector_files
from anomaly.export.onnx import export_onnx, is_onnx_export
from anomaly.export.torchscript import export_torchscript, is_torchscript_export
from anomaly.outputs import claim_output

EXPORTERS = {"onnx": export_onnx, "torchscript": export_torchscript}
#: Recognise an earlier export of each format, which a new export may replace.
EXPORTED = {"onnx": is_onnx_export, "torchscript": is_torchscript_export}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="anomaly export", description="Export a saved detector to ONNX or TorchScript."
    )
    parser.add_argument("--detector", required=True, help="detector.safetensors (or its run folder)")
    parser.add_argument("--format", choices=sorted(EXPORTERS), default="onnx")
    parser.add_argument("--out", required=True, help="file to write, e.g. detector.onnx or detector.pt")
    parser.add_argument("--input-dtype", choices=["uint8", "float"], default="uint8",
                        help="images as uint8 0..255 (default) or float 0..1")  # fmt: skip
    parser.add_argument("--weights", help="backbone weights file, if it moved since the detector was saved")
    parser.add_argument(
        "--overwrite", action="store_true", help="let --out replace a file that is not an earlier export"
    )
    args = parser.parse_args(argv)

    def command() -> int:
        out = claim_output(
            args.out,
            inputs=detector_files(args.detector, args.weights),
            ours=EXPORTED[args.format],
            overwrite=args.overwrite,
            command="anomaly export",
        )
        detector = GaussianDetector.load(args.detector, weights=args.weights)
        path = EXPORTERS[args.format](detector, out, args.input_dtype)
        height, width = detector.model_.geometry.canvas(detector.image_size_)
        outputs = "score, level_scores" + (", map" if detector.model_.makes_maps else "")
        print(f"wrote {path}: input (B, 3, {height}, {width}) {args.input_dtype} images; outputs {outputs}")
        return 0

    return run_command(command)


if __name__ == "__main__":
    from anomaly.commands import run

    run(main)
