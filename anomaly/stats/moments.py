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

While it has absorbed no more rows than it has dimensions, an accumulator keeps
the rows ``y_i`` themselves (:class:`Rows`) instead of ``S2``: ``n D`` floats
instead of ``D^2``, from which every moment follows exactly, and from which the
Gaussian has an exact low-rank form (:mod:`anomaly.stats.low_rank`). With the
row that would make ``n > D`` it switches to ``S2`` for good.
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


@dataclass(frozen=True)
class Rows:
    """Every absorbed row about a shift, ``rows[i] = x_i - shift``: exact moments while ``n <= D``."""

    count: Tensor  # scalar
    shift: Tensor  # (D,)
    rows: Tensor  # (n, D)

    @property
    def n(self) -> int:
        return int(self.rows.shape[0])

    @property
    def mean(self) -> Tensor:
        return self.shift + self.rows.mean(dim=0)

    def moments(self) -> Moments:
        """The same sample's :class:`Moments` (a new ``D x D`` matrix)."""
        return moments_about(self.rows, self.shift)


def batch_moments(x: Tensor, shift: Tensor) -> Moments:
    """Moments of one batch ``x`` (n, D) about ``shift`` (D,), in float64."""
    return moments_about(x.to(torch.float64) - shift, shift)


def moments_about(y: Tensor, shift: Tensor) -> Moments:
    """The :class:`Moments` of rows already taken about ``shift``, ``y = x - shift`` (float64)."""
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
    and can be all-reduced across processes. While ``n <= D`` (and
    :attr:`KEEPS_ROWS`) it holds the rows themselves in ``rows`` and ``outer``
    is empty; after that it holds ``outer`` and ``rows`` is empty (see the
    module docstring).
    """

    FIELDS = ("count", "shift", "sum", "outer", "sqnorm_vec", "quartic")
    #: Whether the accumulator keeps its rows while ``n <= D`` (see the module docstring).
    KEEPS_ROWS = True

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        f64 = {"dtype": torch.float64}
        self.register_buffer("count", torch.zeros((), **f64))
        self.register_buffer("shift", torch.zeros(dim, **f64))
        self.register_buffer("sum", torch.zeros(dim, **f64))
        self.register_buffer("outer", torch.zeros(*self._outer_shape(dense=not self.KEEPS_ROWS), **f64))
        self.register_buffer("sqnorm_vec", torch.zeros(dim, **f64))
        self.register_buffer("quartic", torch.zeros((), **f64))
        if self.KEEPS_ROWS:
            self.register_buffer("rows", torch.zeros(0, dim, **f64))

    def _outer_shape(self, dense: bool) -> tuple[int, int]:
        return (self.dim, self.dim) if dense else (0, 0)

    @property
    def keeps_rows(self) -> bool:
        """Whether the accumulator holds its rows (``outer`` is then empty)."""
        return self.KEEPS_ROWS and self.outer.numel() == 0

    def reset(self) -> None:
        for name in self.FIELDS:
            getattr(self, name).zero_()
        if self.KEEPS_ROWS:
            self.outer = self.outer.new_zeros(self._outer_shape(dense=False))
            self.rows = self.rows.new_zeros(0, self.dim)

    @property
    def n(self) -> int:
        return int(self.count.item())

    def moments(self) -> Moments:
        """The :class:`Moments` (while the rows are kept, with a new ``D x D`` ``outer``)."""
        fields = {name: getattr(self, name) for name in self.FIELDS}
        return Moments(**{**fields, "outer": self.rows.T @ self.rows} if self.keeps_rows else fields)

    def value(self) -> Moments | Rows:
        """What was absorbed: :class:`Rows` while the accumulator keeps them, else :class:`Moments`."""
        return Rows(self.count, self.shift, self.rows) if self.keeps_rows else self.moments()

    def load_moments(self, m: Moments) -> None:
        if self.keeps_rows:  # from now on the D x D moments
            self.outer = torch.empty_like(m.outer)
            self.rows = self.rows.new_zeros(0, self.dim)
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
        self.add_centred(x.to(torch.float64) - self.shift)

    @torch.no_grad()
    def add_centred(self, y: Tensor) -> None:
        """Add rows already taken about this accumulator's shift, ``y = x - shift`` (float64)."""
        # about the accumulator's own shift the batch's moments add in place
        # (merge_moments with d = 0, without its D x D temporaries)
        squares = (y * y).sum(dim=1)
        self.count += y.shape[0]
        self.sum += y.sum(dim=0)
        self.sqnorm_vec.addmv_(y.T, squares)
        self.quartic += (squares * squares).sum()
        if self.keeps_rows and self.count.item() <= self.dim:
            self.rows = torch.cat([self.rows, y])
            return
        if self.keeps_rows:  # the rows would outgrow D x D moments: switch to them for good
            self.outer = self.rows.T @ self.rows
            self.rows = self.rows.new_zeros(0, self.dim)
        self.outer.addmm_(y.T, y)

    @torch.no_grad()
    def merge_(self, other: Moments | Rows) -> None:
        """Add another accumulator's :meth:`value` (e.g. from another process)."""
        if other.count.item() == 0:
            return
        if isinstance(other, Rows):  # added as rows, in whatever form this accumulator is
            if self.count.item() == 0:
                self.shift.copy_(other.shift)
            self.add_centred(other.rows + (other.shift - self.shift))
        elif self.count.item() == 0:
            self.load_moments(other)
        else:
            self.load_moments(merge_moments(self.moments(), other))


def kept_buffers(accumulator: nn.Module) -> dict[str, Tensor]:
    """An accumulator's buffers by name as a file holds them: all but the form not in use (an empty
    ``outer`` while the rows are kept, or empty ``rows`` once they are not)."""
    return {name: value for name, value in accumulator.named_buffers() if value.numel() or value.ndim == 0}


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
    if not distributed():
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


def distributed() -> bool:
    """Whether this process is one of several (DDP)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_gather_rows(accumulator: RunningMoments) -> list[Rows] | None:
    """Every process's :class:`Rows`, in rank order, where every process keeps its rows and all of them
    together still fit the accumulator (at most D); else ``None`` (the moments are exchanged instead)."""
    world, device = dist.get_world_size(), accumulator.count.device
    state = torch.tensor(
        [accumulator.count.item(), accumulator.keeps_rows], dtype=torch.float64, device=device
    )
    states = [torch.empty_like(state) for _ in range(world)]
    dist.all_gather(states, state)
    counts = [int(count) for count, _ in states]
    if not all(bool(keeps) for _, keeps in states) or sum(counts) > accumulator.dim:
        return None
    mine = torch.zeros(1 + max(counts), accumulator.dim, dtype=torch.float64, device=device)
    mine[0], mine[1 : 1 + accumulator.n] = accumulator.shift, accumulator.rows  # row 0: the shift
    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine)
    return [
        Rows(torch.tensor(float(count), dtype=torch.float64, device=device), part[0], part[1 : 1 + count])
        for count, part in zip(counts, gathered, strict=True)
    ]


def synchronise(accumulators: Sequence[nn.Module]) -> None:
    """Replace each accumulator's moments by their merge over all processes, in rank order.

    A no-op without DDP. Works for any accumulator made of :class:`RunningMoments` (per-cell ones
    included, each part exchanged on its own); a process that saw no image adds nothing. Rows are
    exchanged as rows while all of them fit (:func:`all_gather_rows`), so that the fit is the one a
    single process makes of them.
    """
    if not distributed():
        return
    parts_of = [part for accumulator in accumulators for part in accumulator.modules()]
    for accumulator in [part for part in parts_of if isinstance(part, RunningMoments)]:
        parts = (accumulator.KEEPS_ROWS and all_gather_rows(accumulator)) or all_gather_moments(
            accumulator.moments()
        )
        accumulator.reset()
        for part in parts:
            accumulator.merge_(part)
