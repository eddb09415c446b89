"""What every spatially split layer shares: its group, the check that the ranks' blocks of
rows fit together, the halo plan per input size, and the window a forward computes on.

A layer's input on rank ``r`` of ``P`` is ``[N, C, l_r, *rest]``: rows
``torch.tensor_split(x, P, dim=2)[r]`` of the whole input. The check (one small exchange per
call, as for a standalone channel layer) compares every rank's dims, channels, dtype and
grad mode and gives every rank the total row count its plan needs; with checks off the count
comes from a one-integer all-reduce instead.
"""

from __future__ import annotations

import torch.distributed as dist
from torch import Tensor

from mpgroups.comm.checks import (
    BAD_SHAPE,
    InputGuard,
    Problem,
    balanced_blocks,
    channel_counts,
    tensor_problem,
)
from mpgroups.comm.collectives import outside_graphs, sum_over_ranks
from mpgroups.comm.halo import halo_exchange
from mpgroups.comm.process_groups import host_group, resolve_process_group
from mpgroups.layers.base import SharesProcessGroup
from mpgroups.sharding.spatial import ConvRows, HaloPlan, halo_plan

__all__ = ["SpatialLayer"]

_PLANS_KEPT = 16  # input sizes a layer keeps the plan of
_TOTALS_KEPT = 64  # as many as an input guard keeps agreed signatures: they evict alike


class SpatialLayer(SharesProcessGroup):
    """Mixed in before a ``torch.nn`` layer class whose rows along dim 2 are split."""

    _dims: int  # spatial dims of the layer's input

    @property
    def _input_dims(self) -> tuple[int, int]:
        """The fewest and most dims the layer's input may have."""
        return self._dims + 2, self._dims + 2

    def _set_group(
        self, process_group, checks: bool | None, rows: ConvRows, channels: int | None
    ) -> None:
        """``rows``: how the layer maps input rows to output rows along dim 2; ``channels``:
        the input channels it takes (``None``: any, the same on every rank)."""
        self.process_group = resolve_process_group(process_group)
        self.rows = rows
        self._channels = channels
        self._plans: dict[int, HaloPlan] = {}
        self._totals: dict[tuple, int] = {}  # (input shape, root's agreed context): rows
        pg = self.process_group
        if pg is not None and pg.size() > 1:
            site = f"{type(self).__name__}({super().extra_repr()})"
            config = (type(self).__name__, channels, rows)
            self.input_guard = InputGuard(
                site, config, pg, channel_dim=2, checks=checks, counted="rows"
            )

    @property
    def splits_rows(self) -> bool:
        """Whether the layer's rows are split over more than one rank."""
        return self.process_group is not None and self.process_group.size() > 1

    def _problem(self, x) -> Problem | None:
        channels = "C" if self._channels is None else self._channels
        fewest, most = self._input_dims
        dims = f"{fewest}-D" if fewest == most else f"{fewest}-D to {most}-D"
        problem = tensor_problem(x, f"[N, {channels}, rows, ...] ({dims})", fewest, most)
        if problem is None and self._channels is not None and x.shape[1] != self._channels:
            problem = (BAD_SHAPE, f"{x.shape[1]} channels, the layer takes {self._channels}")
        return problem

    # Outside any compiled graph, as a channel layer's check is: the exchange of records and
    # the plan (host integers, the group's own methods) are not for a graph to hold.
    @outside_graphs
    def _total_rows(self, x: Tensor, weight: Tensor | None = None) -> int:
        """Every rank's rows together, once the ranks agree that their blocks fit. Under a
        split model's root check a layer exchanges only for an input it has not seen with
        the model's agreed total (every rank decides alike); it then knows the total."""
        pg, world = self.process_group, self.process_group.size()
        records = self.input_guard(
            x,
            problem=self._problem(x),
            expected_channels=balanced_blocks,
            channels_note=lambda sent: [f"balanced blocks of {sum(sent)} rows"] * world,
            weight=weight,
        )
        clock = self.input_guard.clock
        key = (tuple(x.shape), clock.agreed_context() if clock is not None else ())
        if records is not None:
            total = sum(channel_counts(records, 2))
            if len(self._totals) >= _TOTALS_KEPT:
                del self._totals[next(iter(self._totals))]
            self._totals[key] = total
        elif clock is not None and clock.checked and key in self._totals:
            total = self._totals[key]
        else:
            total = sum_over_ranks(x.shape[2], host_group(pg))
        if clock is not None and clock.checked:
            clock.note(self.input_guard.site_id, total)
        return total

    @outside_graphs
    def _plan(self, total: int) -> HaloPlan:
        plan = self._plans.get(total)
        if plan is None:
            pg = self.process_group
            plan = halo_plan(self.rows, total, pg.size(), dist.get_rank(pg))
            if len(self._plans) >= _PLANS_KEPT:
                del self._plans[next(iter(self._plans))]
            self._plans[total] = plan
        return plan

    def _window(self, x: Tensor, weight: Tensor | None = None, fill: float = 0.0):
        """``(window, plan, total rows)``: the rows this rank's output block reads, padding
        rows holding ``fill``."""
        total = self._total_rows(x, weight)
        plan = self._plan(total)
        return halo_exchange(x, plan, self.process_group, dim=2, fill=fill), plan, total

    def extra_repr(self) -> str:
        ranks = self.process_group.size() if self.process_group is not None else 1
        return f"{super().extra_repr()}, rows split over {ranks} ranks"
