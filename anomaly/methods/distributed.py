"""Lightning's DDP for methods fitted by statistics rather than by gradients, and gathering rows.

``DistributedDataParallel`` refuses a module without trainable parameters, yet a
statistics-only method (the Gaussian: frozen backbone, streamed moments) still
needs DDP's processes and collectives to shard the images and merge the moments.
:class:`StatisticsDDPStrategy` is Lightning's ``DDPStrategy`` (same launcher, same
process group) that skips the gradient wrapper when there is nothing to train and
synchronises the module's state instead, as Lightning does outside fitting.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from pytorch_lightning.strategies import DDPStrategy, Strategy
from pytorch_lightning.strategies.ddp import _sync_module_states
from torch import Tensor, nn

# Lightning's registered DDP names and the process start method each one uses.
DDP_START_METHODS = {"ddp": "popen", "ddp_spawn": "spawn", "ddp_fork": "fork", "ddp_notebook": "fork"}


def has_trainable_parameters(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


class StatisticsDDPStrategy(DDPStrategy):
    """``DDPStrategy`` that leaves a module without trainable parameters unwrapped."""

    def configure_ddp(self) -> None:
        if has_trainable_parameters(self.model):
            super().configure_ddp()
        else:
            _sync_module_states(self.model)


def statistics_replacement(chosen: Strategy, model: nn.Module) -> Strategy | None:
    """The :class:`StatisticsDDPStrategy` to use instead of the plain DDP that Lightning chose.

    ``strategy: auto`` with several devices makes Lightning pick ``DDPStrategy``,
    which a model with nothing to train cannot use. ``None`` when ``chosen`` is fine.
    """
    if type(chosen) is DDPStrategy and not has_trainable_parameters(model):
        return StatisticsDDPStrategy(start_method=chosen._start_method)
    return None


def resolve_strategy(strategy: str | Strategy, model: nn.Module) -> str | Strategy:
    """A DDP strategy name becomes :class:`StatisticsDDPStrategy` for a model with nothing to train."""
    if isinstance(strategy, str) and strategy in DDP_START_METHODS and not has_trainable_parameters(model):
        return StatisticsDDPStrategy(start_method=DDP_START_METHODS[strategy])
    return strategy


def gather_batches(batches: list[Tensor]) -> list[Tensor]:
    """Every process's batches, in rank order, on every process (unchanged without DDP)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return batches
    gathered: list[list[Tensor] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, [b.cpu() for b in batches])
    return [batch for part in gathered for batch in part or []]


def gather_rows(rows: dict[str, Tensor]) -> dict[str, Tensor]:
    """Concatenate every process's rows (of possibly different lengths) on every process.

    Every process must call it; one that holds no rows (fewer images than processes) passes ``{}``
    or empty tensors, and still receives everyone's rows.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return rows
    gathered: list[dict[str, Tensor] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, {k: v.cpu() for k, v in rows.items()})
    names = next((list(g) for g in gathered if g), list(rows))
    return {k: torch.cat([g[k] for g in gathered if g and k in g]) for k in names}
