"""The paper's tables as run grids: ``anomaly reproduce table1 --data.root ROOT``."""
