"""Run under torchrun: after one good collective, rank 1 fails while rank 0 waits in the next.

``raise``: rank 1 raises in its own code (not in mpgroups) and exits.
``stall``: rank 1 stays alive and silent (a stuck data loader, a deadlock) and never calls.
"""

import sys
import time

import torch
from torch.distributed.elastic.multiprocessing.errors import record

import mpgroups
from mpgroups.runtime import init_distributed, shutdown


@record
def main(fault: str) -> None:
    info = init_distributed()
    layer = mpgroups.GroupParallelConv2d(8, 8, 3, groups=4)
    layer(torch.randn(2, 8, 5, 5))  # one good collective first
    if info.rank == 1:
        if fault == "raise":
            raise ValueError("boom from rank 1, in user code")
        time.sleep(600)
    layer(torch.randn(2, 8, 5, 5))  # rank 0 waits here for rank 1
    shutdown()


if __name__ == "__main__":
    if sys.argv[1:] not in (["raise"], ["stall"]):
        sys.exit(f"usage: {sys.argv[0]} raise|stall")
    sys.exit(main(sys.argv[1]))
