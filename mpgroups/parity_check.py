"""Check one group-parallel layer against ``nn.Conv2d`` on every layout pair, under torchrun.

Usage::

    torchrun --standalone --nproc-per-node 2 -m mpgroups.parity_check
    torchrun --standalone --nproc-per-node 4 -m mpgroups.parity_check --groups 2  # teams

Every rank builds the same ``nn.Conv2d`` and data from one seed, shards the layer with
``from_conv``, runs forward and backward, and compares what it holds with the single-device
result. Rank 0 prints the worst error per layout pair (relative to the largest magnitude) and
the bytes each pair communicated; the exit status is non-zero when any error exceeds the
tolerance.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist
from torch import nn

from mpgroups.comm.counter import CommCounter
from mpgroups.layers.conv import LAYOUTS, GroupParallelConv2d

__all__ = ["main"]


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    scale = max(1.0, expected.abs().max().item())
    return (actual.double() - expected.double()).abs().max().item() / scale


def _check_pair(ref, x, grad_y, y_ref, x_grad_ref, layouts) -> tuple[float, int]:
    """One layout pair over the default process group: worst error and bytes sent."""
    layer = GroupParallelConv2d.from_conv(ref, input_layout=layouts[0], output_layout=layouts[1])
    in_keep = slice(*layer.input_shard) if layouts[0] == "sharded" else slice(None)
    out_keep = slice(*layer.output_shard) if layouts[1] == "sharded" else slice(None)
    x_local = x[:, in_keep].clone().requires_grad_()
    with CommCounter() as comm:
        y = layer(x_local)
        y.backward(grad_y[:, out_keep])
    o0, o1 = layer.out_slice
    error = max(
        _relative_error(y, y_ref[:, out_keep]),
        _relative_error(x_local.grad, x_grad_ref[:, in_keep]),
        _relative_error(layer.weight.grad, ref.weight.grad[o0:o1]),
        _relative_error(layer.bias.grad, ref.bias.grad[o0:o1]),
    )
    return error, comm.bytes()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--in-channels", type=int, default=64)
    parser.add_argument("--out-channels", type=int, default=128)
    parser.add_argument("--groups", type=int, default=4)
    parser.add_argument("--kernel-size", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=16, help="height and width of the input")
    parser.add_argument("--tolerance", type=float, default=1e-5)
    args = parser.parse_args(argv)

    if "RANK" in os.environ and not dist.is_initialized():
        dist.init_process_group("gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    world_size = dist.get_world_size() if dist.is_initialized() else 1

    torch.manual_seed(0)
    ref = nn.Conv2d(
        args.in_channels,
        args.out_channels,
        args.kernel_size,
        padding=args.kernel_size // 2,
        groups=args.groups,
    )
    x = torch.randn(args.batch, args.in_channels, args.size, args.size)
    x_ref = x.clone().requires_grad_()
    y_ref = ref(x_ref)
    grad_y = torch.randn_like(y_ref)
    y_ref.backward(grad_y)

    worst = torch.zeros(len(LAYOUTS) ** 2, dtype=torch.float64)
    lines = []
    for i, layouts in enumerate((a, b) for a in LAYOUTS for b in LAYOUTS):
        error, nbytes = _check_pair(ref, x, grad_y, y_ref, x_ref.grad, layouts)
        worst[i] = error
        lines.append(f"  {layouts[0]:>10} -> {layouts[1]:<10}  {nbytes:>9} B sent on rank 0")
    if dist.is_initialized():
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    ok = bool((worst <= args.tolerance).all())
    if rank == 0:
        print(
            f"GroupParallelConv2d({args.in_channels}, {args.out_channels}, "
            f"{args.kernel_size}, groups={args.groups}) on {world_size} process(es):"
        )
        for line, error in zip(lines, worst.tolist(), strict=True):
            print(f"{line}  max error {error:.2e}")
        print(f"max error vs nn.Conv2d: {worst.max().item():.2e} ({'ok' if ok else 'FAILED'})")
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
