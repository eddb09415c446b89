"""Activation memory: the bytes a training forward saves for backward, per rank, vs one device.

Model parallelism is chosen for memory per device as much as for speed: a rank that computes
``1/P`` of a layer's channels also keeps ``1/P`` of what that layer saves for backward, while
a replicated activation (a layer's whole input, kept on every rank) is saved whole. This
counts it exactly, with ``torch.autograd.graph.saved_tensors_hooks``: during one training
forward every tensor autograd saves passes through the pack hook, and the bytes of the
distinct storages behind them are summed (a storage saved by several nodes, or viewed
several ways, counts once). Parameters are counted apart: they are there before the forward
and after it.

Each rank's model is built over a process group that moves no data (``loopback``: the rank's
own shapes and its own saved tensors, no wire), rank by rank in this one process, at P = 2 and
4; the reference is the plain model on one device, the same batch. Cases (``cases.py``): the
AlexNet step (the 2012 split) and the ResNeXt-50 stage-3 block under ``plan="auto"``.

Writes ``OUT/activation_memory.json`` and ``OUT/activation_memory.md`` (``--out``; by default
``benchmarks/out/activation_memory/``, which git ignores)::

    python benchmarks/activation_memory.py            # the full cases, about a minute
    python benchmarks/activation_memory.py --quick    # tiny cases
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cases import CASES, QUICK, build_parallel, build_single, make_input  # noqa: E402
from cases import labels as batch_labels  # noqa: E402
from harness import HERE, mib, prepare_out, publish, run_header  # noqa: E402
from harness import parser as benchmark_parser  # noqa: E402
from loopback import loopback_world  # noqa: E402

from mpgroups.layers.dtensor_state import local_tensor  # noqa: E402

DEFAULT_OUT = HERE / "out" / "activation_memory"
CASE_NAMES = ("alexnet_step", "resnext50_block")
WORLD_SIZES = (2, 4)


def saved_bytes(model: nn.Module, x: torch.Tensor, labels: torch.Tensor | None) -> dict:
    """``{"activations": bytes, "parameters": bytes}`` that one training forward of ``model``
    (and its loss) saves for backward: distinct storages, parameters apart."""
    param_storages = {local_tensor(p).untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = local_tensor(tensor).untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    x = x.detach().requires_grad_(labels is None)  # a block's input grad, as inside a network
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = model(x)
        loss = F.cross_entropy(out, labels) if labels is not None else out.pow(2).mean()
    loss.backward()
    params = sum(n for ptr, n in storages.items() if ptr in param_storages)
    return {"activations": sum(storages.values()) - params, "parameters": params}


def measure(case) -> dict:
    """The one-device counts and every rank's at each P."""
    x, labels = make_input(case, case.batch), batch_labels(case)
    row = {"single": saved_bytes(build_single(case), x, labels), "ranks": {}}
    for world in WORLD_SIZES:
        per_rank = []
        for rank in range(world):
            with loopback_world(world, rank) as group:
                per_rank.append(saved_bytes(build_parallel(case, group), x, labels))
        row["ranks"][str(world)] = per_rank
    return row


def table_lines(result: dict) -> list[str]:
    lines = [
        "Bytes saved for backward by one training forward, per rank (the largest rank) against "
        f"one device; `{result['command']}`",
        "",
        "| case | P | one device MiB | per rank MiB (largest) | per rank / one device "
        "| parameters saved per rank MiB |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in result["cases"].items():
        single = row["single"]["activations"]
        for world, ranks in row["ranks"].items():
            largest = max(r["activations"] for r in ranks)
            params = max(r["parameters"] for r in ranks)
            lines.append(
                f"| {name} | {world} | {mib(single)} | {mib(largest)} | "
                f"{largest / single:.3f} | {mib(params)} |"
            )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser(
        __doc__, out=DEFAULT_OUT, writes="activation_memory.json and activation_memory.md",
        reps=1, timeout=600, quick="tiny cases",
    )  # fmt: skip
    args = parser.parse_args(argv)
    prepare_out(args.out, ["activation_memory.json", "activation_memory.md"])
    torch.set_num_threads(max(1, min(args.cores, os.cpu_count() or 1)))
    cases = QUICK if args.quick else CASES
    result = {
        **run_header(argv, args.cores),
        "quick": args.quick,
        "cases": {name: measure(cases[name]) for name in CASE_NAMES},
    }
    print(publish(args.out, "activation_memory", result, table_lines(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
