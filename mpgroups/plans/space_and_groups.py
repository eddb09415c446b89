"""``parallelize(model, mesh, plan="spatial")`` over a ``DeviceMesh`` with dims
``("sp", "gp")``: a model split both ways, its rows over ``sp`` and its channel groups over
``gp`` (docs/design.md §8c).

The rank at ``(s, g)`` holds rows block ``s`` of every activation (dim 2, as
``plan="spatial"`` over ``mesh["sp"]``), and of each, the channels ``plan="auto"`` over
``mesh["gp"]`` gives rank ``g`` (a ResNeXt block: the column-parallel 1×1 conv's output
channels, the grouped conv's groups, the row-parallel 1×1 conv's partial sums). It is the
two plans composed:

1. what is split along the rows follows the plain model's traced forward, as for
   ``plan="spatial"`` alone;
2. the channel plan converts the grouped convs and their neighbours over ``mesh["gp"]``;
3. every layer fed split rows gets them over ``mesh["sp"]``: the spatial twins, BatchNorm
   with the statistics of its channels over the whole image, and the group-parallel convs
   with their rows split in place (their channel collectives stay within ``gp``, whose
   ranks hold the same rows); the chain ends gather the rows;
4. the parameters become DTensors on ``mesh["gp"]`` (``Shard`` where the channel plan splits
   them), their gradients summed over ``sp`` in the graph.

Each forward checks its input once at the root, over every rank of the mesh: the rows
balanced over ``sp``, the rest alike everywhere. ``unparallelize`` undoes both plans.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from mpgroups.comm.spatial_groups import mesh_group, resolve_spatial_split
from mpgroups.plans.dtensor_model import distribute_model_state
from mpgroups.plans.root_check import check_at_root
from mpgroups.plans.spatial_plan import convert_rows, split_flow, sync_state
from mpgroups.sharding.spatial import BlockGrid

__all__ = ["parallelize_space_and_groups"]


def parallelize_space_and_groups(
    model: nn.Module, mesh, sync_module_states: bool, convert_channels: Callable
) -> nn.Module:
    """See the module docstring; returns the converted root. ``convert_channels``:
    ``parallelize``'s conversion by a channel plan (``(model, group, plan, sync,
    finish=...) -> model``), which this plan builds on.

    Raises:
        PlanError: a module the spatial plan refuses on the split rows, or a channel plan
            that cannot be made (as ``parallelize`` raises them).
    """
    rows_mesh, groups_mesh = mesh["sp"], mesh["gp"]
    every_rank = mesh_group(mesh)
    if sync_module_states:
        sync_state(model, every_rank)
    _, rows_split = resolve_spatial_split(rows_mesh)
    flow = split_flow(model, rows_split)
    model = convert_channels(model, groups_mesh, "auto", False, finish=False)
    model = convert_rows(model, rows_mesh, flow, root_check=False)
    # One check over every rank: a bad batch on one rank raises on all of them, where a
    # check per mesh dim would leave the ranks of the other lines going on
    grid = BlockGrid(dims=(2, None), shape=tuple(mesh.shape))
    model._mpgroups_spatial = check_at_root(model, every_rank, ("input_guard", "rows_guard"), grid)
    groups = groups_mesh.get_group()
    if groups.size() > 1:
        distribute_model_state(model, groups, groups_mesh)
    return model
