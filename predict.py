"""Score new images with a saved detector: the same as ``anomaly predict`` (see docs/cli.md).

python predict.py --detector runs/gaussian/.../fold_0/detector.safetensors --input new/ --out scores.csv
"""

from __future__ import annotations

import sys

from anomaly import commands


def main(argv: list[str] | None = None) -> int:
    return commands.main(["predict", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
