"""Tables of mean ± SEM image AUROC from finished runs.

python evaluate.py runs                          # Markdown tables on the console
python evaluate.py runs --format latex --out tables.tex
python evaluate.py runs/gaussian --format csv
"""

import sys

from anomaly.evaluation.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
