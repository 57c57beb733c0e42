"""``python -m anomaly`` is the ``anomaly`` command."""

import sys

from anomaly.commands import main

sys.exit(main())
