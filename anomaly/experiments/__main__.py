import sys

from anomaly.experiments.cli import main

sys.exit(main())
