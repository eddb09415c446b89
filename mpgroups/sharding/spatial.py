"""Which rows of a spatially split tensor each rank holds, and which it needs from its
neighbours to compute its block of a convolution's output (no communication here).

A tensor ``[N, C, L, *rest]`` split along its first spatial dim (dim 2) gives rank ``r`` the
rows of ``torch.tensor_split(x, P, dim=2)[r]``: balanced, the first ``L % P`` ranks one row
more. A convolution's output rows are split the same way, so a chain of layers keeps that
layout from end to end. For its output rows ``[a, b)``, a conv with kernel ``k``, stride
``s``, dilation ``d`` and padding ``p_lo`` before the first row reads the global input rows
``a·s - p_lo`` to ``(b - 1)·s - p_lo + d·(k - 1)``: its *window*. Rows before 0 or past the
end are the padding: zeros, or, for the other padding modes, the rows torch's ``F.pad``
would copy there (reflected, repeated or wrapped). The rows of the window that another rank
holds are its *halo*; :func:`halo_plan` says which rank sends which rows to whom. Every rank
computes the same plan from the same sizes, so the sends and receives always pair.
"""

from __future__ import annotations

from dataclasses import dataclass

from mpgroups.sharding.placement import Slice

__all__ = [
    "PADDING_MODES",
    "AdaptiveRows",
    "BlockGrid",
    "ConvRows",
    "HaloPlan",
    "RowMap",
    "TransposedRows",
    "UpsampleRows",
    "HaloTooWideError",
    "halo_plan",
    "row_blocks",
    "smallest_size",
]

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
ZERO_ROW = -1  # a window row that is zero padding


class HaloTooWideError(ValueError):
    """A rank's block is too small for its window: it would need rows from a rank that is
    not its neighbour."""


def row_blocks(size: int, world_size: int) -> tuple[Slice, ...]:
    """``(start, stop)`` of every rank's rows, balanced as ``torch.tensor_split``."""
    base, extra = divmod(size, world_size)
    starts = [r * base + min(r, extra) for r in range(world_size + 1)]
    return tuple(zip(starts[:-1], starts[1:], strict=True))


@dataclass(frozen=True)
class BlockGrid:
    """How the ranks of a group tile a split tensor: ``shape[i]`` ranks along mesh axis
    ``i``, which splits tensor dim ``dims[i]`` (``None``: an axis whose ranks hold the same
    blocks, such as the channel groups' of a model split both ways). Group rank ``r`` sits
    at the row-major coordinate of ``shape``: a 1-D split gives rank ``r`` block ``r`` of
    dim 2; a ``P_h × P_w`` grid gives rank ``h·P_w + w`` block ``h`` of dim 2 and block ``w``
    of dim 3; each block is ``torch.tensor_split``'s.

    What the input checks exchange per rank is its block's size along the split dims: an
    int for one dim, a tuple for several (``-1``: a rank that sent no tensor)."""

    dims: tuple[int | None, ...]
    shape: tuple[int, ...]

    @property
    def size(self) -> int:
        count = 1
        for ranks in self.shape:
            count *= ranks
        return count

    @property
    def split_dims(self) -> tuple[int, ...]:
        """The tensor dims split, in mesh order."""
        return tuple(d for d in self.dims if d is not None)

    @property
    def checked_dims(self) -> int | tuple[int, ...]:
        """The ``channel_dim`` of the input checks: one dim, or the tuple of them."""
        dims = self.split_dims
        return dims[0] if len(dims) == 1 else dims

    def coordinate(self, rank: int) -> tuple[int, ...]:
        """Group rank ``rank``'s index along each mesh axis."""
        coordinate = []
        for ranks in reversed(self.shape):
            rank, index = divmod(rank, ranks)
            coordinate.append(index)
        return tuple(reversed(coordinate))

    def _axes(self) -> list[int]:
        return [axis for axis, dim in enumerate(self.dims) if dim is not None]

    def totals(self, sent: list) -> tuple[int, ...]:
        """The whole tensor's size along each split dim, from what every rank holds: along
        the dim of mesh axis ``a``, the blocks of the ranks at coordinate 0 on every other
        axis."""
        sizes = [None if s == -1 else (s if isinstance(s, tuple) else (s,)) for s in sent]
        totals = []
        for index, axis in enumerate(self._axes()):
            line = [
                s[index]
                for r, s in enumerate(sizes)
                if s is not None
                and all(c == 0 for i, c in enumerate(self.coordinate(r)) if i != axis)
            ]
            totals.append(sum(line))
        return tuple(totals)

    def expected(self, sent: list) -> list:
        """What each rank should hold of :meth:`totals` (``sent`` itself when a rank sent no
        tensor: its record says what it sent)."""
        if any(s == -1 for s in sent):
            return sent
        axes = self._axes()
        blocks = [
            row_blocks(t, self.shape[a]) for t, a in zip(self.totals(sent), axes, strict=True)
        ]
        expected = []
        for rank in range(len(sent)):
            coordinate = self.coordinate(rank)
            own = [blocks[i][coordinate[a]] for i, a in enumerate(axes)]
            sizes = tuple(stop - start for start, stop in own)
            expected.append(sizes[0] if len(sizes) == 1 else sizes)
        return expected

    def note(self, sent: list) -> list[str]:
        totals = " × ".join(map(str, self.totals(sent)))
        return [f"balanced blocks of {totals} rows"] * len(sent)


@dataclass(frozen=True)
class ConvRows:
    """A convolution (or pooling) along one dim: what maps its input rows to output rows.

    ``pad_lo``/``pad_hi``: padding before the first and after the last row (``"same"``
    splits ``dilation·(kernel - 1)`` as torch does: the extra row, if any, after). With
    ``ceil_mode`` a window may reach past the padding; those rows are padding too.
    """

    kernel: int
    stride: int = 1
    dilation: int = 1
    pad_lo: int = 0
    pad_hi: int = 0
    padding_mode: str = "zeros"
    ceil_mode: bool = False  # a pooling's: a last, partial window counts

    def __post_init__(self) -> None:
        if self.padding_mode not in PADDING_MODES:
            raise ValueError(
                f"padding_mode must be one of {PADDING_MODES}, got {self.padding_mode!r}"
            )
        if min(self.kernel, self.stride, self.dilation) < 1 or min(self.pad_lo, self.pad_hi) < 0:
            raise ValueError(f"a conv needs kernel, stride, dilation >= 1 and padding >= 0: {self}")

    @property
    def span(self) -> int:
        """Input rows one output row reads: ``dilation·(kernel - 1) + 1``."""
        return self.dilation * (self.kernel - 1) + 1

    def out_size(self, size: int) -> int:
        """Output rows for ``size`` input rows (as ``nn.Conv`` and the poolings; may be 0 or
        less: too small)."""
        reach = size + self.pad_lo + self.pad_hi - self.span
        if not self.ceil_mode:
            return reach // self.stride + 1
        rows = -(-reach // self.stride) + 1
        # torch's rule: the last window must start inside the input or its leading padding
        return rows - 1 if (rows - 1) * self.stride >= size + self.pad_lo else rows

    def window(self, out_rows: Slice, size: int) -> range:
        """The global input rows (padding included: below 0 or past the end) that output
        rows ``[a, b)`` read (``size``: the input's rows)."""
        a, b = out_rows
        if b <= a:
            return range(0)
        return range(a * self.stride - self.pad_lo, (b - 1) * self.stride - self.pad_lo + self.span)

    def source_row(self, row: int, size: int) -> int:
        """The input row whose value a window row holds, or ``ZERO_ROW`` for zero padding
        (as ``F.pad``: reflect without repeating the edge, replicate the edge, wrap around)."""
        if 0 <= row < size:
            return row
        if self.padding_mode == "zeros":
            return ZERO_ROW
        if self.padding_mode == "replicate":
            return min(max(row, 0), size - 1)
        if self.padding_mode == "circular":
            return row % size
        period = 2 * (size - 1)  # reflect
        row = abs(row) % period if period else 0
        return period - row if row >= size else row

    def describe(self) -> str:
        return (
            f"kernel {self.kernel}, stride {self.stride}, dilation {self.dilation}, "
            f"padding ({self.pad_lo}, {self.pad_hi})"
        )

    @property
    def reach(self) -> int:
        """A bound on how far a window reaches (sizes :func:`smallest_size` searches)."""
        return self.span + self.stride + self.pad_lo + self.pad_hi


@dataclass(frozen=True)
class UpsampleRows:
    """``nn.Upsample`` by a whole ``scale`` along one dim: output row ``o`` reads row
    ``o // scale`` (``"nearest"``), ``(2o + 1) // (2·scale)`` (``"nearest-exact"``), or the
    two rows around ``(o + ½)/scale - ½`` (``"linear"``, ``align_corners=False``)."""

    scale: int
    mode: str = "nearest"
    padding_mode = "zeros"  # no padding rows

    def out_size(self, size: int) -> int:
        return size * self.scale

    def _source(self, row: int) -> int:
        if self.mode == "nearest":
            return row // self.scale
        if self.mode == "nearest-exact":
            return (2 * row + 1) // (2 * self.scale)
        return max((2 * row + 1 - self.scale) // (2 * self.scale), 0)  # linear

    def window(self, out_rows: Slice, size: int) -> range:
        a, b = out_rows
        if b <= a:
            return range(0)
        last = self._source(b - 1) + (self.mode == "linear")
        return range(min(self._source(a), size - 1), min(last, size - 1) + 1)

    def source_row(self, row: int, size: int) -> int:
        return row

    def describe(self) -> str:
        return f"upsampling x{self.scale} ({self.mode})"

    @property
    def reach(self) -> int:
        return 2


@dataclass(frozen=True)
class TransposedRows:
    """A transposed convolution along one dim: input row ``i`` adds to output rows
    ``i·stride - padding + j·dilation`` for ``j < kernel``; ``output_padding`` rows more at
    the end."""

    kernel: int
    stride: int = 1
    dilation: int = 1
    padding: int = 0
    output_padding: int = 0
    padding_mode = "zeros"

    @property
    def span(self) -> int:
        return self.dilation * (self.kernel - 1) + 1

    def out_size(self, size: int) -> int:
        return (size - 1) * self.stride - 2 * self.padding + self.span + self.output_padding

    def window(self, out_rows: Slice, size: int) -> range:
        a, b = out_rows
        if b <= a:
            return range(0)
        first = max(0, -(-(a + self.padding - self.span + 1) // self.stride))
        last = min(size - 1, (b - 1 + self.padding) // self.stride)
        return range(first, last + 1)

    def source_row(self, row: int, size: int) -> int:
        return row

    def describe(self) -> str:
        return (
            f"transposed kernel {self.kernel}, stride {self.stride}, dilation "
            f"{self.dilation}, padding {self.padding}"
        )

    @property
    def reach(self) -> int:
        return self.span + self.stride + self.padding


@dataclass(frozen=True)
class AdaptiveRows:
    """An adaptive pooling to ``out`` rows: output row ``o`` reads rows
    ``floor(o·L/out)`` to ``ceil((o + 1)·L/out)`` (exclusive), as torch's adaptive pools."""

    out: int
    padding_mode = "zeros"  # no padding rows

    def out_size(self, size: int) -> int:
        return self.out

    def rows_of(self, row: int, size: int) -> tuple[int, int]:
        """``(start, stop)`` of the input rows output row ``row`` pools."""
        return row * size // self.out, -(-(row + 1) * size // self.out)

    def window(self, out_rows: Slice, size: int) -> range:
        a, b = out_rows
        if b <= a:
            return range(0)
        return range(self.rows_of(a, size)[0], self.rows_of(b - 1, size)[1])

    def source_row(self, row: int, size: int) -> int:
        return row

    def describe(self) -> str:
        return f"adaptive pooling to {self.out} rows"

    @property
    def reach(self) -> int:
        return 2


RowMap = ConvRows | UpsampleRows | TransposedRows | AdaptiveRows  # what a layer does to rows


@dataclass(frozen=True)
class HaloPlan:
    """One rank's part of a halo exchange for one layer.

    Attributes:
        rank, world_size: this rank in the group.
        in_rows: ``(start, stop)`` of the input rows every rank holds.
        out_rows: ``(start, stop)`` of the output rows every rank computes.
        runs: the window, in order, as runs ``(source, start, length)``: ``source`` is a
            group rank (this rank: rows of its own block; another: rows of what it receives
            from that rank) or ``ZERO_ROW`` (zeros); ``start`` indexes that source's rows.
        sends: ``(peer, local rows)`` this rank sends, each to the rank that reads them.
        receives: ``(peer, rows)`` how many rows this rank receives from each peer.
    """

    rank: int
    world_size: int
    in_rows: tuple[Slice, ...]
    out_rows: tuple[Slice, ...]
    runs: tuple[tuple[int, int, int], ...]
    sends: tuple[tuple[int, tuple[int, ...]], ...]
    receives: tuple[tuple[int, int], ...]

    @property
    def window_rows(self) -> int:
        return sum(length for _, _, length in self.runs)


def _needed(rows: RowMap, in_rows, out_block: Slice, size: int) -> dict[int, list[int]]:
    """Per owner rank: the global input rows ``out_block``'s window reads from it, sorted."""
    owners: dict[int, set[int]] = {}
    for row in rows.window(out_block, size):
        source = rows.source_row(row, size)
        if source != ZERO_ROW:
            owner = next(r for r, (a, b) in enumerate(in_rows) if a <= source < b)
            owners.setdefault(owner, set()).add(source)
    return {owner: sorted(needed) for owner, needed in owners.items()}


def _neighbours(rank: int, world_size: int, wraps: bool) -> set[int]:
    near = {rank - 1, rank, rank + 1}
    if wraps:
        near |= {(rank - 1) % world_size, (rank + 1) % world_size}
    return {r for r in near if 0 <= r < world_size}


def _fits(rows: RowMap, size: int, world_size: int) -> bool:
    """Whether every rank gets an output row and reads only its neighbours' rows."""
    out_size = rows.out_size(size)
    if out_size < world_size or size < world_size:
        return False
    in_rows, out_rows = row_blocks(size, world_size), row_blocks(out_size, world_size)
    wraps = rows.padding_mode == "circular"
    return all(
        len(rows.window(out_rows[r], size)) > 0
        and set(_needed(rows, in_rows, out_rows[r], size)) <= _neighbours(r, world_size, wraps)
        for r in range(world_size)
    )


def smallest_size(rows: RowMap, size: int, world_size: int) -> int | None:
    """The smallest input size of at least ``size`` for which :func:`halo_plan` works, or
    ``None`` if none up to a generous bound does."""
    bound = 4 * size + 4 * world_size * rows.reach
    return next((n for n in range(size, bound + 1) if _fits(rows, n, world_size)), None)


def halo_plan(rows: RowMap, size: int, world_size: int, rank: int) -> HaloPlan:
    """Rank ``rank``'s part of the exchange that gives every rank the window of its output
    block, for ``size`` input rows split as :func:`row_blocks` splits them.

    Raises:
        HaloTooWideError: a rank would get no output row, no input row (its block is empty),
            or would need rows from a rank that is not its neighbour (wrapping around for
            circular padding); the message names the smallest size that works.
    """
    if rows.padding_mode == "reflect" and size <= max(rows.pad_lo, rows.pad_hi):
        raise ValueError(
            f"reflect padding of {max(rows.pad_lo, rows.pad_hi)} rows needs more input rows "
            f"than that; the input has {size}"
        )
    if not _fits(rows, size, world_size):
        smallest = smallest_size(rows, size, world_size)
        works = f"{smallest} rows or more" if smallest is not None else "a larger input"
        raise HaloTooWideError(
            f"{size} rows split over {world_size} ranks are too few for {rows.describe()}: "
            f"each rank needs at least one output row and one input row to read, and may "
            f"read only its neighbours' rows (its halo); {works} works (or fewer ranks)"
        )
    in_rows = row_blocks(size, world_size)
    out_rows = row_blocks(rows.out_size(size), world_size)
    needs = [_needed(rows, in_rows, out_rows[r], size) for r in range(world_size)]
    start = in_rows[rank][0]
    received = {
        owner: {row: i for i, row in enumerate(global_rows)}
        for owner, global_rows in needs[rank].items()
        if owner != rank
    }
    runs: list[list[int]] = []
    for row in rows.window(out_rows[rank], size):
        source = rows.source_row(row, size)
        if source == ZERO_ROW:
            owner, index = ZERO_ROW, 0
        else:
            owner = next(r for r, (a, b) in enumerate(in_rows) if a <= source < b)
            index = source - start if owner == rank else received[owner][source]
        last = runs[-1] if runs else None
        contiguous = owner == ZERO_ROW or index == last[1] + last[2] if last else False
        if last is not None and last[0] == owner and contiguous:
            last[2] += 1
        else:
            runs.append([owner, index, 1])
    sends = tuple(
        (reader, tuple(row - start for row in needs[reader][rank]))
        for reader in range(world_size)
        if reader != rank and rank in needs[reader]
    )
    receives = tuple((owner, len(global_rows)) for owner, global_rows in sorted(received.items()))
    return HaloPlan(
        rank=rank,
        world_size=world_size,
        in_rows=in_rows,
        out_rows=out_rows,
        runs=tuple(tuple(run) for run in runs),
        sends=sends,
        receives=receives,
    )
