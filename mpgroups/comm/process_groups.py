"""Process-group plumbing: resolve what a layer was given, the team subgroups of a filter
split, and the host group the input checks exchange their records over.

Nothing here moves tensor data; the collectives live in :mod:`mpgroups.comm.collectives`.
"""

from __future__ import annotations

import hashlib
import weakref
from datetime import timedelta

import torch
import torch.distributed as dist

__all__ = [
    "group_mesh",
    "group_rank",
    "host_group",
    "group_timeout",
    "named_subgroup",
    "rank_and_world_size",
    "resolve_process_group",
    "team_subgroup",
]

# A team subgroup is created once per (parent group, team) and shared by every layer that
# needs it: creating one per layer would open new connections for each conv of a model.
_team_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# The gloo twin of every group, for the input checks' records (never where the data moves).
_host_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# The 1-D DeviceMesh over a group, per device type, that a model's DTensor state lives on.
_mesh_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def resolve_process_group(process_group=None) -> dist.ProcessGroup | None:
    """The process group a layer runs over, or ``None`` for a single-device layer.

    Args:
        process_group: a ``ProcessGroup``, a 1-D ``DeviceMesh``, or ``None`` for the default
            group when ``torch.distributed`` is initialised (as DDP and SyncBatchNorm do).

    Raises:
        ValueError: a mesh with more than one dimension, or a group this process is not in.
    """
    if not dist.is_available():
        if process_group is not None:
            raise ValueError("torch.distributed is not available in this build of PyTorch")
        return None
    from torch.distributed.device_mesh import DeviceMesh

    if isinstance(process_group, DeviceMesh):
        if process_group.ndim != 1:
            raise ValueError(
                f"process_group must be a 1-D DeviceMesh, got one with {process_group.ndim} "
                f"dimensions {tuple(process_group.shape)}; pass mesh[dim_name] for one axis"
            )
        process_group = process_group.get_group()
    if process_group is None:
        return dist.group.WORLD if dist.is_initialized() else None
    if process_group == dist.GroupMember.NON_GROUP_MEMBER or dist.get_rank(process_group) < 0:
        raise ValueError(
            f"this process (global rank {dist.get_rank()}) is not a member of the process group "
            f"it was given; build the layer only on the group's ranks"
        )
    if not isinstance(process_group, dist.ProcessGroup):
        raise ValueError(
            f"process_group must be a ProcessGroup, a 1-D DeviceMesh or None, "
            f"got {type(process_group).__name__}"
        )
    return process_group


def group_mesh(process_group: dist.ProcessGroup, device_type: str, given=None):
    """The 1-D ``DeviceMesh`` over ``process_group`` for tensors on ``device_type``: ``given``
    when that is a ``DeviceMesh`` of the group (a dim of the user's mesh: FSDP2 then sees one
    root mesh), else one made once per group and device type and shared."""
    from torch.distributed.device_mesh import DeviceMesh

    if isinstance(given, DeviceMesh) and given.device_type == device_type:
        return given
    meshes = _mesh_cache.setdefault(process_group, {})
    if device_type not in meshes:
        meshes[device_type] = DeviceMesh.from_group(process_group, device_type)
    return meshes[device_type]


def rank_and_world_size(process_group) -> tuple[int, int]:
    """This process's rank in ``process_group`` and the group's size; ``(0, 1)`` for ``None``."""
    if process_group is None:
        return 0, 1
    return dist.get_rank(process_group), process_group.size()


def group_rank(
    process_group: dist.ProcessGroup, rank: int | None, rank_in_group: int | None, name: str
) -> int | None:
    """The rank within ``process_group`` that an argument names, given as torch names it:
    ``name`` (``src``, ``dst``) a global rank, ``group_<name>`` a rank within the group;
    ``None`` when neither is given.

    Raises:
        ValueError: both given, or a rank that is not in the group.
    """
    members = dist.get_process_group_ranks(process_group)
    if rank is not None and rank_in_group is not None:
        raise ValueError(f"give {name} (a global rank) or group_{name}, not both")
    if rank is not None:
        if rank not in members:
            raise ValueError(
                f"{name}={rank} is a global rank, as in torch.distributed, and the process group "
                f"holds the global ranks {members}; to name a rank within the group, pass "
                f"group_{name}"
            )
        return members.index(rank)
    if rank_in_group is not None and not 0 <= rank_in_group < len(members):
        raise ValueError(
            f"group_{name}={rank_in_group} is outside a process group of {len(members)} ranks"
        )
    return rank_in_group


def group_timeout(process_group: dist.ProcessGroup) -> timedelta | None:
    """The collective timeout of ``process_group``, when its backend exposes one."""
    for device in (torch.device("cpu"), torch.device("cuda")):
        try:
            return process_group._get_backend(device).options._timeout
        except (RuntimeError, AttributeError):
            continue
    return None


def team_subgroup(process_group: dist.ProcessGroup, team: tuple[int, int]) -> dist.ProcessGroup:
    """The subgroup of ``process_group`` made of its ranks ``team = (start, stop)``.

    Every rank of ``process_group`` calls this for its own team, in the same order (layer
    construction guarantees it); the teams of one size tile the group. The subgroup inherits
    the parent's backend and timeout, so a hang in it fails as fast as in the parent.

    Ranks must agree on the subgroup whatever other groups each has created before. NCCL
    splits the parent's communicator (``dist.split_group``, every parent rank taking part).
    gloo meets on the rendezvous store under the subgroup's name, which ``new_group`` derives
    from how many groups the process has made (a count that differs between ranks as soon as
    some of them make a group of their own); here the name comes from the parent's name and
    the team's ranks alone.
    """
    start, stop = team
    size = stop - start
    if size == process_group.size():
        return process_group
    ranks = dist.get_process_group_ranks(process_group)
    teams = _team_cache.setdefault(process_group, {})
    if size not in teams:
        if dist.get_backend(process_group) == "nccl":
            tiles = [ranks[i : i + size] for i in range(0, len(ranks), size)]
            teams[size] = dist.split_group(
                process_group,
                split_ranks=tiles,
                timeout=group_timeout(process_group),
                group_desc="mpgroups_team",
            )
        else:
            teams[size] = named_subgroup(process_group, ranks[start:stop])
    return teams[size]


def named_subgroup(
    parent: dist.ProcessGroup, ranks: list[int], backend: str | None = None, kind: str = "team"
) -> dist.ProcessGroup:
    """``dist.new_group(ranks, use_local_synchronization=True)`` with a name every member
    derives alike (``new_group`` has no name argument; this is its member-side path), over
    ``backend`` (default: the parent's)."""
    from torch.distributed import distributed_c10d as c10d

    key = f"{parent.group_name}:{','.join(map(str, ranks))}"
    digest = hashlib.sha1(key.encode(), usedforsecurity=False).hexdigest()[:16]
    name = f"mpgroups-{kind}-{digest}"
    backend = backend or dist.get_backend(parent)
    pg, _ = c10d._new_process_group_helper(
        len(ranks),
        ranks.index(dist.get_rank()),
        ranks,
        backend,
        c10d._get_default_store(),
        name,
        timeout=group_timeout(parent) or c10d._get_default_timeout(backend),
        group_desc=f"mpgroups_{kind}",
    )
    c10d._world.pg_group_ranks[pg] = {g: i for i, g in enumerate(ranks)}
    return pg


def host_group(process_group):
    """The group the input checks exchange their records over: a gloo group of the same
    ranks as ``process_group``, made once per group and named from it, so that every rank
    agrees on it whatever groups it made before.

    A record is host integers end to end, so a check never waits for a device (NCCL). The
    twin is made for a gloo group too: records never travel on the group the data moves on,
    so a rank at a check can never pair with a rank inside a data collective (one that went
    on past a step the first rank failed alone): the two wait instead, until the group's
    timeout, and a GPU run and a CPU run have the same groups.

    Every rank of ``process_group`` calls this in the same order (it is called where the
    guards are made: layer construction, ``parallelize``, the collective helpers).
    """
    if process_group is None or process_group.size() == 1:
        return process_group
    if dist.get_backend(process_group) == "fake":  # torch's FakeProcessGroup moves no data
        return process_group
    if process_group not in _host_cache:
        ranks = dist.get_process_group_ranks(process_group)
        _host_cache[process_group] = named_subgroup(process_group, ranks, "gloo", "checks")
    return _host_cache[process_group]
