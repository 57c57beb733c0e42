"""``python -m anomaly`` is the ``anomaly`` command."""

from anomaly.commands import run

run()
