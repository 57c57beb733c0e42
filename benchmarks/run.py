"""Scale benchmarks: the same as ``anomaly benchmark`` (see docs/benchmarks.md).

python benchmarks/run.py --root /data/mvtec_ad --category bottle [--quick]
"""

from __future__ import annotations

import sys

from anomaly import commands

if __name__ == "__main__":
    sys.exit(commands.main(["benchmark", *sys.argv[1:]]))
