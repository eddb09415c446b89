"""The groups a spatially split tensor lives on: one per split dim, and the whole split.

A ``ProcessGroup`` (or 1-D ``DeviceMesh``) of ``P`` ranks splits dim 2: rank ``r`` holds
block ``r`` of the rows. A 2-D ``DeviceMesh`` with dims named ``("sp_h", "sp_w")`` splits
dims 2 and 3: its rank at ``(h, w)`` holds block ``h`` of dim 2 and block ``w`` of dim 3
(``torch.tensor_split``'s blocks). Halos along dim 2 move within ``mesh["sp_h"]`` (the ranks
that share ``w``), along dim 3 within ``mesh["sp_w"]``. What spans the whole image (a norm's
statistics, the sum of a parameter's gradient, the input checks) runs over one group of
every rank of the mesh, its ranks in the mesh's row-major order, made once per mesh.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch.distributed as dist

from mpgroups.comm.process_groups import named_subgroup, resolve_process_group
from mpgroups.sharding.layout import NOT_PICKLABLE
from mpgroups.sharding.spatial import BlockGrid

__all__ = [
    "GRID_DIM_NAMES",
    "SPACE_AND_GROUPS",
    "SpatialSplit",
    "check_grid",
    "is_space_and_groups",
    "mesh_group",
    "resolve_spatial_split",
]

GRID_DIM_NAMES = ("sp_h", "sp_w")  # a 2-D mesh's dims: split dims 2 and 3
SPACE_AND_GROUPS = ("sp", "gp")  # a 2-D mesh's dims: rows split, and channel groups
_whole_groups: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass(frozen=True, eq=False)
class SpatialSplit:
    """Where a split tensor's blocks live.

    Attributes:
        group: every rank of the split, in the grid's row-major order.
        axes: ``(tensor dim, process group)`` per split dim: the ranks a halo along that
            dim moves between (this rank's line of the grid).
        grid: how the ranks of ``group`` tile the split dims.
    """

    group: dist.ProcessGroup
    axes: tuple[tuple[int, dist.ProcessGroup], ...]
    grid: BlockGrid

    @property
    def dims(self) -> tuple[int, ...]:
        return self.grid.split_dims

    def __deepcopy__(self, memo) -> SpatialSplit:
        return self  # groups cannot be copied; an EMA copy shares them

    def __reduce_ex__(self, protocol):
        raise TypeError(NOT_PICKLABLE)


def mesh_group(mesh) -> dist.ProcessGroup:
    """One group of every rank of ``mesh``, in its row-major order, made once per mesh."""
    group = _whole_groups.get(mesh)
    if group is None:
        ranks = [int(r) for r in mesh.mesh.flatten().tolist()]
        if ranks == list(range(dist.get_world_size())):
            group = dist.group.WORLD
        else:
            group = named_subgroup(dist.group.WORLD, ranks, kind="grid")
        _whole_groups[mesh] = group
    return group


def is_space_and_groups(process_group) -> bool:
    """Whether ``process_group`` is a 2-D ``DeviceMesh`` with dims ``("sp", "gp")``."""
    from torch.distributed.device_mesh import DeviceMesh

    return (
        isinstance(process_group, DeviceMesh)
        and tuple(process_group.mesh_dim_names or ()) == SPACE_AND_GROUPS
    )


def check_grid(mesh):
    """``mesh``, if it is a spatial grid (2-D, dims ``("sp_h", "sp_w")``).

    Raises:
        ValueError: it is not, naming what a spatial split takes.
    """
    if mesh.ndim != 2 or tuple(mesh.mesh_dim_names or ()) != GRID_DIM_NAMES:
        raise ValueError(
            f"a spatial split takes a ProcessGroup, a 1-D DeviceMesh (dim 2 split), or a 2-D "
            f"DeviceMesh with mesh_dim_names={GRID_DIM_NAMES} (dims 2 and 3 split); got a mesh "
            f"of shape {tuple(mesh.shape)} named {mesh.mesh_dim_names}"
        )
    return mesh


def resolve_spatial_split(
    process_group=None,
) -> tuple[dist.ProcessGroup | None, SpatialSplit | None]:
    """``(group, split)`` for what a spatial layer was given: the whole group (or ``None``,
    as :func:`~mpgroups.comm.process_groups.resolve_process_group`), and the split, or
    ``None`` when one rank holds everything.

    Raises:
        ValueError: a mesh of more than two dims, or a 2-D mesh whose dims are not named
            ``("sp_h", "sp_w")``.
    """
    from torch.distributed.device_mesh import DeviceMesh

    if isinstance(process_group, DeviceMesh) and process_group.ndim > 1:
        mesh = check_grid(process_group)
        grid = BlockGrid(dims=(2, 3), shape=tuple(mesh.shape))
        axes = tuple((2 + i, mesh.get_group(name)) for i, name in enumerate(GRID_DIM_NAMES))
        if grid.size == 1:
            return None, None
        return mesh_group(mesh), SpatialSplit(mesh_group(mesh), axes, grid)
    group = resolve_process_group(process_group)
    if group is None or group.size() == 1:
        return group, None
    return group, SpatialSplit(group, ((2, group),), BlockGrid(dims=(2,), shape=(group.size(),)))
