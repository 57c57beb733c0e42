"""Fit a detector on one category and fold, then test it.

python train.py                                   # offline demo
python train.py --data.root /data/mvtec_ad --data.category bottle --data.fold 0
python train.py --config configs/gaussian.yaml --model.backbone efficientnet-b4
"""

import sys

from anomaly.cli import main

if __name__ == "__main__":
    sys.exit(main())
