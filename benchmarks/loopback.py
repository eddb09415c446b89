"""A process group that moves no data: for timing a rank's local work without the wire.

Its collectives return at once, having filled the receive buffer with this rank's own data
(an all-gather writes every rank's chunk with the local shard, a reduce-scatter the first
chunk of its input; releases before torch 2.13 may leave a reduce-scatter's output unwritten),
so the buffers a layer reads after a collective hold data, as they would after a real one,
and the input checks' record exchange sees every rank agree. A group-parallel model built over
it runs mpgroups' own code on each rank (every slice, copy, buffer and input check) with the
rank's own shapes; the time inside its collectives (``CommCounter``) is what the wire would
replace.

It is PyTorch's ``fake`` backend (the C++ ``FakeProcessGroup``), with which PyTorch's own
tests simulate ranks; a module of ``torch.testing`` registers it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch.distributed as dist
from torch.testing._internal.distributed import fake_pg  # noqa: F401  (registers "fake")

BACKEND = "fake"


def loopback_group(group: dist.ProcessGroup) -> dist.ProcessGroup:
    """A group of ``group``'s ranks, in its order, that moves no data; its members call it."""
    ranks = dist.get_process_group_ranks(group)
    return dist.new_group(ranks, backend=BACKEND, use_local_synchronization=True)


@contextmanager
def loopback_world(world: int, rank: int = 0) -> Iterator[dist.ProcessGroup]:
    """A default group of ``world`` ranks that moves no data, this process its ``rank``.

    For a process that has no process group (the one-process run): the model built over it
    is that rank's share at ``world`` ranks (rank 0 by default), and a ``CommCounter`` sees
    the collectives that rank issues. The group is destroyed on exit.
    """
    dist.init_process_group(BACKEND, store=dist.HashStore(), rank=rank, world_size=world)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()
