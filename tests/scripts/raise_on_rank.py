"""Run under torchrun: rank 1 raises in its own code while rank 0 waits in a collective."""

import sys

import torch
from torch.distributed.elastic.multiprocessing.errors import record

import mpgroups
from mpgroups.runtime import init_distributed, shutdown


@record
def main() -> None:
    info = init_distributed()
    layer = mpgroups.GroupParallelConv2d(8, 8, 3, groups=4)
    layer(torch.randn(2, 8, 5, 5))  # one good collective first
    if info.rank == 1:
        raise ValueError("boom from rank 1, in user code")
    layer(torch.randn(2, 8, 5, 5))  # rank 0 waits here for a rank that is gone
    shutdown()


if __name__ == "__main__":
    sys.exit(main())
