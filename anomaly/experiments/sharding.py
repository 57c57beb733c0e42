"""Splitting a table's grid between machines (``--shard K/N``) and GPUs (``--devices``).

A shard is a fixed part of the grid: cell ``i`` of the grid (in its canonical order,
see :func:`~anomaly.experiments.runner.grid_cells`) belongs to shard ``i mod N``.
The split depends only on the table, the categories and the folds, never on which
runs already exist, so shards resume independently and together make exactly the
runs of one unsharded sweep.

With ``--devices``, one machine runs several cells at once, each in its own process
that sees one GPU (``CUDA_VISIBLE_DEVICES``).
"""

from __future__ import annotations

import os
import queue
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import TypeVar

from anomaly.errors import UserError

T = TypeVar("T")
SHARD_SYNTAX = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


@dataclass(frozen=True)
class Shard:
    """Part ``index`` (0-based) of ``count`` equal parts of a grid."""

    index: int = 0
    count: int = 1

    @classmethod
    def parse(cls, text: str) -> Shard:
        """``"K/N"`` with ``K`` in ``0..N-1`` (SLURM: ``$SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT``)."""
        match = SHARD_SYNTAX.match(text)
        if match is None:
            raise UserError(f"--shard must be K/N (e.g. 0/4, the first of 4 shards), got '{text}'")
        index, count = int(match[1]), int(match[2])
        if count < 1 or not 0 <= index < count:
            raise UserError(
                f"--shard {text}: K must be in 0..N-1 and N at least 1 (shards are numbered from 0, "
                "as SLURM's --array=0-<N-1>)"
            )
        return cls(index, count)

    def select(self, cells: Sequence[T]) -> list[T]:
        """This shard's cells: every ``count``-th one, starting at ``index``."""
        return list(cells[self.index :: self.count])

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def device_ids(spec: str, environ: Mapping[str, str] | None = None) -> list[str]:
    """The GPU ids of ``--devices``: ``N`` (the first N visible GPUs) or a list such as ``0,2,3``.

    With ``N``, the GPUs already visible to this process (``CUDA_VISIBLE_DEVICES``, as a
    scheduler such as SLURM sets it) are used, else ``0..N-1``.
    """
    environ = os.environ if environ is None else environ
    text = spec.strip()
    if text.isdigit():
        count = int(text)
        if count < 1:
            raise UserError(f"--devices must be at least 1, got {spec}")
        visible = [d.strip() for d in environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
        if visible and count > len(visible):
            raise UserError(
                f"--devices {count}: only {len(visible)} GPUs are visible (CUDA_VISIBLE_DEVICES="
                f"{environ['CUDA_VISIBLE_DEVICES']})"
            )
        return visible[:count] if visible else [str(i) for i in range(count)]
    ids = [d.strip() for d in text.split(",")]
    if not ids or not all(ids) or len(set(ids)) != len(ids):
        raise UserError(
            f"--devices must be a number of GPUs or a list of distinct GPU ids (0,1,3), got '{spec}'"
        )
    return ids


def run_on_devices(
    items: Sequence[T], devices: Sequence[str], launch: Callable[[T, str], int]
) -> Iterator[tuple[T, int]]:
    """Run ``launch(item, device)`` for every item, at most one at a time on each device.

    Items start in their order as devices become free; yields ``(item, exit status)``
    as each one finishes. ``launch`` blocks until its run ends (e.g. a subprocess).
    """
    free: queue.Queue[str] = queue.Queue()
    for device in devices:
        free.put(device)

    def task(item: T) -> int:
        device = free.get()
        try:
            return launch(item, device)
        finally:
            free.put(device)

    pool = ThreadPoolExecutor(max_workers=len(devices), thread_name_prefix="device")
    try:
        futures = {pool.submit(task, item): item for item in items}
        for future in as_completed(futures):
            yield futures[future], future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
