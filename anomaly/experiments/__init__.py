"""The paper's tables as run grids: ``python -m anomaly.experiments table1 --data.root ROOT``."""
