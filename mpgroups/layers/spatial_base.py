"""What every spatially split layer shares: its groups, the check that the ranks' blocks
fit together, the halo plans per input size, and the window a forward computes on.

A layer's input on rank ``r`` of a group of ``P`` is ``[N, C, l_r, *rest]``: rows
``torch.tensor_split(x, P, dim=2)[r]`` of the whole input. On a 2-D mesh ``("sp_h", "sp_w")``
the rank at ``(h, w)`` holds block ``h`` along dim 2 and block ``w`` along dim 3
(:mod:`mpgroups.comm.spatial_groups`). The check (one small exchange per call, as for a
standalone channel layer) compares every rank's dims, channels, dtype and grad mode and
gives every rank the totals its plans need; with checks off the totals come from a
one-integer all-reduce per split dim instead.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.distributed as dist
from torch import Tensor

from mpgroups.comm.checks import (
    BAD_SHAPE,
    InputGuard,
    Problem,
    channel_counts,
    tensor_problem,
)
from mpgroups.comm.collectives import outside_graphs, sum_over_ranks
from mpgroups.comm.halo import Exchange, halo_exchange
from mpgroups.comm.process_groups import host_group
from mpgroups.comm.spatial_groups import resolve_spatial_split
from mpgroups.layers.base import SharesProcessGroup
from mpgroups.sharding.spatial import ConvRows, HaloPlan, HaloTooWideError, RowMap, halo_plan

__all__ = ["SPATIAL_STATE", "SpatialLayer", "pointwise_rows"]

# What a layer holds for its split besides its torch.nn self: what undoing the split drops
SPATIAL_STATE = ("row_split", "rows", "_channels", "_plans", "_totals", "rows_guard", "_row_scales")

_PLANS_KEPT = 16  # input sizes a layer keeps the plan of
_TOTALS_KEPT = 64  # as many as an input guard keeps agreed signatures: they evict alike


def pointwise_rows(axis: int) -> ConvRows:
    """The row map of a layer whose output row ``i`` reads input row ``i`` alone, along any
    dim (a norm, a dropout: no halo)."""
    return ConvRows(kernel=1)


class SpatialLayer(SharesProcessGroup):
    """Mixed in before a ``torch.nn`` layer class whose rows along dim 2 (and columns along
    dim 3, on a 2-D mesh) are split."""

    _dims: int  # spatial dims of the layer's input

    @property
    def _input_dims(self) -> tuple[int, int]:
        """The fewest and most dims the layer's input may have."""
        return self._dims + 2, self._dims + 2

    def _set_group(
        self,
        process_group,
        checks: bool | None,
        row_map: Callable[[int], RowMap],
        channels: int | None,
    ) -> None:
        """``row_map(i)``: how the layer maps input rows to output rows along spatial dim
        ``i`` (dim ``2 + i``), asked for each split dim only; ``channels``: the input
        channels it takes (``None``: any, the same on every rank)."""
        group, self.row_split = resolve_spatial_split(process_group)
        self._keep_group(group)
        self._channels = channels
        self._plans: dict[tuple[int, ...], tuple[HaloPlan, ...]] = {}
        self._totals: dict[tuple, tuple[int, ...]] = {}  # (input shape, root's context): totals
        if self.row_split is None:
            self.rows: tuple[RowMap, ...] = ()
            return
        most_dims = self._input_dims[1] - 2
        if len(self.row_split.dims) > most_dims:
            raise ValueError(
                f"{type(self).__name__} takes {most_dims} spatial dim(s) and the mesh splits "
                f"{len(self.row_split.dims)} (dims {self.row_split.dims})"
            )
        self.rows = tuple(row_map(i) for i in range(len(self.row_split.dims)))
        site = f"{type(self).__name__}({super().extra_repr()})"
        config = (type(self).__name__, channels, self.rows, self.row_split.grid)
        self.rows_guard = InputGuard(
            site, config, group, channel_dim=self.row_split.grid.checked_dims,
            checks=checks, counted="rows",
        )  # fmt: skip

    def _keep_group(self, group) -> None:
        """Hold the split's whole group as ``process_group`` (where the layer's parameter
        grads are summed, its norms' statistics taken)."""
        self.process_group = group

    @property
    def splits_rows(self) -> bool:
        """Whether the layer's rows are split over more than one rank."""
        return self.row_split is not None

    def _problem(self, x) -> Problem | None:
        channels = "C" if self._channels is None else self._channels
        fewest, most = self._input_dims
        fewest = max(fewest, 2 + len(self.row_split.dims))
        dims = f"{fewest}-D" if fewest == most else f"{fewest}-D to {most}-D"
        problem = tensor_problem(x, f"[N, {channels}, rows, ...] ({dims})", fewest, most)
        if problem is None and self._channels is not None and x.shape[1] != self._channels:
            problem = (BAD_SHAPE, f"{x.shape[1]} channels, the layer takes {self._channels}")
        return problem

    # Outside any compiled graph, as a channel layer's check is: the exchange of records and
    # the plan (host integers, the group's own methods) are not for a graph to hold.
    @outside_graphs
    def _total_rows(self, x: Tensor, weight: Tensor | None = None) -> tuple[int, ...]:
        """The whole input's size along each split dim, once the ranks agree that their
        blocks fit. Under a split model's root check a layer exchanges only for an input it
        has not seen with the model's agreed totals (every rank decides alike); it then
        knows them."""
        grid = self.row_split.grid
        records = self.rows_guard(
            x, problem=self._problem(x), expected_channels=grid.expected,
            channels_note=grid.note, weight=weight,
        )  # fmt: skip
        clock = self.rows_guard.clock
        key = (tuple(x.shape), clock.agreed_context() if clock is not None else ())
        if records is not None:
            totals = grid.totals(channel_counts(records, grid.checked_dims))
            if len(self._totals) >= _TOTALS_KEPT:
                del self._totals[next(iter(self._totals))]
            self._totals[key] = totals
        elif clock is not None and clock.checked and key in self._totals:
            totals = self._totals[key]
        else:
            axes = self.row_split.axes
            totals = tuple(sum_over_ranks(x.shape[d], host_group(g)) for d, g in axes)
        if clock is not None and clock.checked:
            clock.note(self.rows_guard.site_id, *totals)
        return totals

    @outside_graphs
    def _exchanges(self, totals: tuple[int, ...]) -> list[Exchange]:
        """``(plan, dim, group)`` of each split dim's halo exchange for these totals."""
        plans, axes = self._plans.get(totals), self.row_split.axes
        if plans is None:
            plans = []
            for rows, total, (dim, group) in zip(self.rows, totals, axes, strict=True):
                try:
                    plans.append(halo_plan(rows, total, group.size(), dist.get_rank(group)))
                except HaloTooWideError as error:
                    if len(self.row_split.dims) == 1:
                        raise
                    raise HaloTooWideError(f"along dim {dim}: {error}") from None
            plans = tuple(plans)
            if len(self._plans) >= _PLANS_KEPT:
                del self._plans[next(iter(self._plans))]
            self._plans[totals] = plans
        return [(plan, dim, group) for plan, (dim, group) in zip(plans, axes, strict=True)]

    def _window(self, x: Tensor, weight: Tensor | None = None, fill: float = 0.0):
        """``(window, exchanges, totals)``: the block and halo this rank's output block
        reads, padding holding ``fill``."""
        totals = self._total_rows(x, weight)
        exchanges = self._exchanges(totals)
        for plan, dim, group in exchanges:
            x = halo_exchange(x, plan, group, dim=dim, fill=fill)
        return x, exchanges, totals

    def _own_out(self, exchanges: list[Exchange]) -> list[tuple[int, int]]:
        """``(start, stop)`` of this rank's output block along each split dim."""
        return [plan.out_rows[plan.rank] for plan, _, _ in exchanges]

    def extra_repr(self) -> str:
        grid = self.row_split.grid if self.row_split is not None else None
        if grid is None or len(grid.split_dims) == 1:
            return f"{super().extra_repr()}, rows split over {grid.size if grid else 1} ranks"
        shape = " × ".join(map(str, grid.shape))
        return f"{super().extra_repr()}, dims {grid.split_dims} split over {shape} ranks"
