"""Fit a detector on one category and fold, then test it: the same as ``anomaly fit``.

python train.py                                   # offline demo
python train.py --data.root /data/mvtec_ad --data.category bottle --data.fold 0
python train.py --config spatial_grid --model.backbone efficientnet-b4
"""

from __future__ import annotations

import sys

from anomaly import commands


def main(argv: list[str] | None = None) -> int:
    return commands.main(["fit", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    commands.run(main)
