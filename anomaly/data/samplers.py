"""A sampler that visits every image exactly once per epoch, on any number of processes.

Lightning's default distributed sampler pads the last batch by repeating
images, which would count some images twice in the streamed statistics. This
sampler shards ``range(n)`` as ``rank::world_size`` instead (no padding, no
drop), and encodes the epoch in the index it yields (``epoch * n + i``) so that
the dataset can seed each image's augmentation reproducibly.

Gradient training is the exception (``pad=True``, its training loader only):
every process must take the same number of steps, or gradient synchronisation
waits for ever. The order is then padded with its first images up to a multiple
of the number of processes, as ``DistributedSampler`` does; a few images weigh
slightly more in that epoch's gradient, which training tolerates.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch.utils.data import Sampler


def process_rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class EpochShardSampler(Sampler[int]):
    """Yields ``epoch * n + i`` for this process's share of ``range(n)``.

    Args:
        n: dataset length.
        shuffle: permute the order each epoch, seeded by ``seed`` and the epoch.
        seed: seed of the permutation.
        pad: give every process the same number of images by repeating the order's first
            ones (gradient training under DDP only; never for statistics or scores).
    """

    def __init__(self, n: int, shuffle: bool = False, seed: int = 0, pad: bool = False) -> None:
        self.n = n
        self.shuffle = shuffle
        self.seed = seed
        self.pad = pad
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning before each epoch."""
        self.epoch = epoch

    def _order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.n))
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return torch.randperm(self.n, generator=generator).tolist()

    def __iter__(self) -> Iterator[int]:
        rank, world = process_rank_and_world()
        offset = self.epoch * self.n
        order = self._order()
        if self.pad and self.n and self.n % world:
            order += (order * world)[: world - self.n % world]
        return iter(offset + i for i in order[rank::world])

    def __len__(self) -> int:
        rank, world = process_rank_and_world()
        if self.pad:
            return -(-self.n // world)
        return len(range(rank, self.n, world))
