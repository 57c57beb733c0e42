"""The category's minimum anomaly size for the autoencoder's CCA score (Table V, VIII).

anomaly min-anomaly-size --data.root /data/mvtec_ad --data.category screw

reads every ground-truth mask of the category's test set, takes each mask's
largest 8-connected component as a fraction of the image area, and writes the
smallest of these (see :mod:`anomaly.evaluation.connected_components`) to
``--output`` (default ``min_anomaly_sizes/<category>.json``), the file the
autoencoder's ``--model.min_anomaly_size_file`` reads. Where a category has no
masks, pass the fraction by hand with ``--model.min_anomaly_size``. An existing
``--output`` is replaced only when it is such a file (a rerun), or with ``--overwrite``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from anomaly.console import run_command
from anomaly.data.images import load_mask
from anomaly.data.mvtec import scan_mvtec
from anomaly.errors import UserError
from anomaly.evaluation.connected_components import min_anomaly_fraction, write_min_anomaly_size
from anomaly.outputs import claim_output, starts_with

DEFAULT_OUTPUT = "min_anomaly_sizes/{category}.json"
#: How a file this command wrote begins (:func:`write_min_anomaly_size`): a rerun may replace it.
SIZE_FILE_START = b'{\n  "category": '


def compute(root: Path, category: str) -> tuple[float, int]:
    """(minimum anomaly fraction, number of masks used) of an MVTec-layout category."""
    _, test = scan_mvtec(root, category)
    masks = [s.mask for s in test if s.label == 1 and s.mask is not None]
    if not masks:
        raise UserError(
            f"category '{category}' under '{root}' has no ground-truth masks (ground_truth/<defect>/"
            "<name>_mask.png): pass the minimum anomaly size by hand with --model.min_anomaly_size FRACTION"
        )
    try:
        return min_anomaly_fraction(load_mask(path) for path in masks)
    except UserError:  # an unreadable mask (a ValueError too) is an error, not an empty one
        raise
    except ValueError:
        raise UserError(
            f"every ground-truth mask of category '{category}' is empty: "
            "pass the minimum anomaly size by hand with --model.min_anomaly_size FRACTION"
        ) from None


def parse_args(args: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="anomaly min-anomaly-size", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data.root", dest="root", required=True, help="folder holding the categories")
    parser.add_argument("--data.category", dest="category", required=True, help="e.g. screw")
    parser.add_argument(
        "--output", default=DEFAULT_OUTPUT, help=f"JSON file to write (default {DEFAULT_OUTPUT})"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="let --output replace a file that is not an earlier one"
    )
    return parser.parse_args(args)


def main(args: list[str] | None = None) -> int:
    options = parse_args(args)

    def command() -> int:
        output = claim_output(
            options.output.format(category=options.category), ours=starts_with(SIZE_FILE_START),
            overwrite=options.overwrite, option="--output", command="anomaly min-anomaly-size",
        )  # fmt: skip
        fraction, n_masks = compute(Path(options.root).expanduser(), options.category)
        write_min_anomaly_size(output, options.category, fraction, n_masks, str(options.root))
        print(
            f"{options.category}: minimum anomaly size {fraction:.6g} of the image ({n_masks} masks)"
            f" -> {output}"
        )
        return 0

    return run_command(command)


if __name__ == "__main__":
    from anomaly.commands import run

    run(main)
