"""Tables of mean ± SEM image AUROC from finished runs: the same as ``anomaly evaluate``.

python evaluate.py runs                          # Markdown tables on the console
python evaluate.py runs --format latex --out tables.tex
"""

from __future__ import annotations

import sys

from anomaly import commands


def main(argv: list[str] | None = None) -> int:
    return commands.main(["evaluate", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    commands.run(main)
