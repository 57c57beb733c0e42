"""Streaming, mergeable moments of a feature stream, in float64.

Ledoit-Wolf needs more than the mean and the scatter matrix: sklearn's closed
form for the shrinkage uses ``sum_i ||x_i - mu||^4`` as well. We therefore keep
the raw moments of ``y = x - c`` around a fixed shift ``c`` (the mean of the
first batch, so that ``y`` is small and float64 loses nothing to cancellation):

* ``count``      n
* ``sum``        S1 = sum_i y_i                       (D)
* ``outer``      S2 = sum_i y_i y_i^T                 (D x D)
* ``sqnorm_vec`` S3 = sum_i ||y_i||^2 y_i             (D)
* ``quartic``    S4 = sum_i ||y_i||^4                 (scalar)

Moments about one shift can be re-expressed about any other shift exactly
(:func:`shift_moments`), which gives both the centred moments (shift to the
mean) and the merge of two accumulators with different shifts (DDP ranks).
Memory is O(D^2) per level, independent of the number of images and epochs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn


@dataclass(frozen=True)
class Moments:
    """Raw moments of ``x - shift`` (see the module docstring)."""

    count: Tensor  # scalar
    shift: Tensor  # (D,)
    sum: Tensor  # (D,)
    outer: Tensor  # (D, D)
    sqnorm_vec: Tensor  # (D,)
    quartic: Tensor  # scalar

    @property
    def n(self) -> int:
        return int(self.count.item())

    @property
    def mean(self) -> Tensor:
        """The empirical mean mu = c + S1 / n."""
        return self.shift + self.sum / self.count

    def centred(self) -> Moments:
        """The same moments about the empirical mean (then ``sum`` is ~0)."""
        return shift_moments(self, self.mean)

    def scatter(self) -> Tensor:
        """The centred scatter matrix sum_i (x_i - mu)(x_i - mu)^T."""
        mean_y = self.sum / self.count
        return self.outer - self.count * torch.outer(mean_y, mean_y)

    def centred_quartic(self) -> Tensor:
        """sum_i ||x_i - mu||^4, needed by the Ledoit-Wolf shrinkage (:func:`shifted_quartic` to the mean)."""
        return shifted_quartic(self, self.mean)


def batch_moments(x: Tensor, shift: Tensor) -> Moments:
    """Moments of one batch ``x`` (n, D) about ``shift`` (D,), in float64."""
    y = x.to(torch.float64) - shift
    sq = (y * y).sum(dim=1)
    return Moments(
        count=torch.tensor(float(y.shape[0]), dtype=torch.float64, device=y.device),
        shift=shift,
        sum=y.sum(dim=0),
        outer=y.T @ y,
        sqnorm_vec=sq @ y,
        quartic=(sq * sq).sum(),
    )


def shifted_quartic(m: Moments, new_shift: Tensor) -> Tensor:
    """``shift_moments(m, new_shift).quartic`` without its D x D temporaries (see there)."""
    d = m.shift - new_shift
    dd = d @ d
    s1_d = m.sum @ d
    trace_s2 = torch.diagonal(m.outer).sum()
    return (
        m.quartic
        + 4.0 * (m.sqnorm_vec @ d)
        + 4.0 * (d @ (m.outer @ d))
        + 2.0 * dd * trace_s2
        + 4.0 * dd * s1_d
        + m.count * dd * dd
    )


def shift_moments(m: Moments, new_shift: Tensor) -> Moments:
    """Re-express moments about ``c`` as moments about ``c'`` exactly.

    With ``d = c - c'`` and ``y' = y + d``:
    ``||y'||^2 = ||y||^2 + 2 d^T y + ||d||^2``, and expanding the sums gives the
    formulas below (all terms are moments we already keep).
    """
    d = m.shift - new_shift
    n = m.count
    dd = d @ d
    s1_d = m.sum @ d
    s2_d = m.outer @ d
    trace_s2 = torch.diagonal(m.outer).sum()  # sum ||y||^2
    sum_ = m.sum + n * d
    outer = m.outer + torch.outer(d, m.sum) + torch.outer(m.sum, d) + n * torch.outer(d, d)
    sqnorm_vec = m.sqnorm_vec + 2.0 * s2_d + dd * m.sum + d * trace_s2 + 2.0 * d * s1_d + n * dd * d
    return Moments(n, new_shift, sum_, outer, sqnorm_vec, shifted_quartic(m, new_shift))


def merge_moments(a: Moments, b: Moments) -> Moments:
    """The moments of the union of two samples (``b`` is moved to ``a``'s shift)."""
    b = shift_moments(b, a.shift)
    return Moments(
        count=a.count + b.count,
        shift=a.shift,
        sum=a.sum + b.sum,
        outer=a.outer + b.outer,
        sqnorm_vec=a.sqnorm_vec + b.sqnorm_vec,
        quartic=a.quartic + b.quartic,
    )


class RunningMoments(nn.Module):
    """An accumulator of :class:`Moments` whose state lives in buffers.

    Buffers follow the module to the batch's device, are saved in checkpoints
    and can be all-reduced across processes. Nothing per image is stored.
    """

    FIELDS = ("count", "shift", "sum", "outer", "sqnorm_vec", "quartic")

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        f64 = {"dtype": torch.float64}
        self.register_buffer("count", torch.zeros((), **f64))
        self.register_buffer("shift", torch.zeros(dim, **f64))
        self.register_buffer("sum", torch.zeros(dim, **f64))
        self.register_buffer("outer", torch.zeros(dim, dim, **f64))
        self.register_buffer("sqnorm_vec", torch.zeros(dim, **f64))
        self.register_buffer("quartic", torch.zeros((), **f64))

    def reset(self) -> None:
        for name in self.FIELDS:
            getattr(self, name).zero_()

    @property
    def n(self) -> int:
        return int(self.count.item())

    def moments(self) -> Moments:
        return Moments(*(getattr(self, name) for name in self.FIELDS))

    def load_moments(self, m: Moments) -> None:
        for name in self.FIELDS:
            getattr(self, name).copy_(getattr(m, name))

    @torch.no_grad()
    def update(self, x: Tensor) -> None:
        """Add a batch of feature vectors ``x`` (n, D)."""
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"expected features of shape (n, {self.dim}), got {tuple(x.shape)}")
        if x.shape[0] == 0:
            return
        if self.count.item() == 0:
            self.shift.copy_(x.to(torch.float64).mean(dim=0))
        # the batch is taken about this accumulator's own shift, so its moments add in place
        # (merge_moments with d = 0, without its D x D temporaries)
        y = x.to(torch.float64) - self.shift
        squares = (y * y).sum(dim=1)
        self.count += y.shape[0]
        self.sum += y.sum(dim=0)
        self.outer.addmm_(y.T, y)
        self.sqnorm_vec.addmv_(y.T, squares)
        self.quartic += (squares * squares).sum()

    @torch.no_grad()
    def merge_(self, other: Moments) -> None:
        """Add another accumulator's moments (e.g. from another process)."""
        if other.count.item() == 0:
            return
        if self.count.item() == 0:
            self.load_moments(other)
        else:
            self.load_moments(merge_moments(self.moments(), other))


def moment_tensors(moments) -> list[Tensor]:
    """The tensors of :class:`Moments`, or of a frozen dataclass of them, in field order."""
    tensors = []
    for item in dataclasses.fields(moments):
        value = getattr(moments, item.name)
        tensors.extend([value] if isinstance(value, Tensor) else moment_tensors(value))
    return tensors


def moments_like(template, tensors: Sequence[Tensor]):
    """Moments of ``template``'s kind (:class:`Moments`, or a dataclass of them) from
    :func:`moment_tensors`' list."""
    parts, rest = {}, list(tensors)
    for item in dataclasses.fields(template):
        value = getattr(template, item.name)
        if isinstance(value, Tensor):
            parts[item.name] = rest.pop(0)
        else:
            count = len(moment_tensors(value))
            parts[item.name], rest = moments_like(value, rest[:count]), rest[count:]
    return type(template)(**parts)


def all_gather_moments(moments):
    """Every process's moments, in rank order (a list of one without DDP).

    Works for moments of any shape (e.g. batched over grid cells) and for dataclasses of
    :class:`Moments` (a level modelled by several Gaussians).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [moments]
    fields = moment_tensors(moments)
    flat = torch.cat([f.reshape(-1) for f in fields])
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    out = []
    for buffer in gathered:
        parts, offset = [], 0
        for f in fields:
            parts.append(buffer[offset : offset + f.numel()].reshape(f.shape))
            offset += f.numel()
        out.append(moments_like(moments, parts))
    return out


def synchronise(accumulators: Sequence[RunningMoments]) -> None:
    """Replace each accumulator's moments by their merge over all processes, in rank order.

    A no-op without DDP. Works for any accumulator with ``reset`` and ``merge_``
    (per-cell ones included); a process that saw no image adds nothing.
    """
    for accumulator in accumulators:
        parts = all_gather_moments(accumulator.moments())
        if len(parts) == 1:
            continue
        accumulator.reset()
        for part in parts:
            accumulator.merge_(part)
