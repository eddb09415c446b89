"""Run under torchrun: rank 1 stalls (alive, silent) while rank 0 waits in a collective."""

import sys
import time

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
        time.sleep(600)  # a stuck data loader, a deadlock: rank 1 never calls the layer
    layer(torch.randn(2, 8, 5, 5))  # rank 0 waits here until the process group's timeout
    shutdown()


if __name__ == "__main__":
    sys.exit(main())
