"""Train the two-tower AlexNet on scikit-learn's handwritten digits, group-parallel.

Usage (the README's first command runs the first line)::

    torchrun --standalone --nproc-per-node 2 -m mpgroups.train
    torchrun --standalone --nproc-per-node 4 -m mpgroups.train --epochs 5 --samples 1000
    torchrun --standalone --nproc-per-node 2 --max-restarts 1 -m mpgroups.train \\
        --checkpoint-dir /tmp/ckpt --checkpoint-every 10      # resumes after a crash
    torchrun --standalone --nproc-per-node 4 -m mpgroups.train --gp 2  # 2 x 2 mesh, FSDP2 over dp
    python -m mpgroups.train                                   # one process, no group

The 1,797 8x8 digit images (bundled with scikit-learn, no download) are upscaled to
``--image-size`` and split once, by seed, into training and held-out sets. Every rank of a
group-parallel group sees the same batches (model parallelism: each rank computes its share of
every layer's channels); the epoch order comes from the seed and the epoch, so a resumed run
draws the same batches.

``--gp N`` makes a 2-D ``("dp", "gp")`` mesh: the model is group-parallel over ``N`` ranks and
data parallel over the ``P / N`` others (FSDP2's ``fully_shard`` over ``mesh["dp"]``, which
composes with the DTensor parameters of a parallelized model; DDP for ``--gp 1``, a plain
model), each dp rank taking its contiguous part of every batch. :func:`match_global_batch`
makes the replicas compute what one device
computes on the whole batch (BatchNorm statistics of the global batch, each sample's dropout
mask as one device draws it), so the loss curve still equals the one-process run's.

Rank 0 prints loss and held-out accuracy per epoch, then ``held-out accuracy: 0.xx``, the wall
time, and (``--compare``, on by default with more than one process) the check that the loss
curve equals a one-process run of the same model on the same data.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.elastic.multiprocessing.errors import record

from mpgroups.comm.collectives import all_reduce_sum
from mpgroups.models import AlexNet
from mpgroups.plans.global_batch import match_global_batch
from mpgroups.runtime import DistInfo, init_distributed, init_mesh, shutdown
from mpgroups.state.checkpoint import CheckpointManager, atomic_save
from mpgroups.state.state_dict import full_state_dict, local_parameter_bytes

__all__ = ["load_digits_data", "main", "train"]

CHANNELS = (32, 64, 96, 96, 64)
_DTYPES = {"float32": torch.float32, "float64": torch.float64}
_CURVE_TOLERANCE = {"float32": 1e-3, "float64": 1e-6}  # max relative difference per step


def load_digits_data(image_size: int, samples: int | None, seed: int, holdout: float = 0.2):
    """``(x_train, y_train, x_test, y_test)``: ``x`` is ``[n, 1, S, S]`` float32, normalised."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.int64)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    if samples is not None:
        if not 10 <= samples <= len(labels):
            raise ValueError(f"--samples must be between 10 and {len(labels)}, got {samples}")
        order = order[:samples]
    images = F.interpolate(images[order], size=image_size, mode="bilinear", align_corners=False)
    images = (images - images.mean()) / images.std()
    labels = labels[order]
    n_test = max(1, int(len(labels) * holdout))
    return images[n_test:], labels[n_test:], images[:n_test], labels[:n_test]


def _progress(total: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(
        total=total, disable=not enabled, desc=desc, leave=False, file=sys.stderr, mininterval=0.5
    )


def _accuracy(model: nn.Module, x: Tensor, y: Tensor, batch: int) -> float:
    was_training = model.training
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(y), batch):
            logits = model(x[start : start + batch])
            correct += (logits.argmax(1) == y[start : start + batch]).sum().item()
    model.train(was_training)
    return correct / len(y)


def build_model(args, info: DistInfo, parallel: bool, process_group=None) -> nn.Module:
    torch.manual_seed(args.seed)
    return AlexNet(
        num_classes=10,
        in_channels=1,
        process_group=process_group,
        channels=tuple(args.channels),
        hidden=args.hidden,
        dropout=args.dropout,
        batch_norm=True,
        parallel=parallel,
    ).to(device=info.device, dtype=_DTYPES[args.dtype])


def _mesh_axes(mesh) -> tuple:
    """``(gp process group or None for the default group, dp group, dp rank, dp size)``."""
    if mesh is None:
        return None, None, 0, 1
    dp = mesh["dp"]
    return mesh["gp"], dp.get_group(), dp.get_local_rank(), dp.size()


def train(args, info: DistInfo, parallel: bool = True, quiet: bool = False, mesh=None) -> dict:
    """Train; returns ``{"losses", "accuracy", "epochs": [...], "resumed_from", "model"}``.

    With a ``("dp", "gp")`` ``mesh`` the model is group-parallel over ``mesh["gp"]`` and data
    parallel over ``mesh["dp"]`` (FSDP2, or DDP when gp is 1); each dp rank takes its
    contiguous part of every batch and the losses recorded are the whole batch's.
    """
    x_train, y_train, x_test, y_test = load_digits_data(args.image_size, args.samples, args.seed)
    dtype = _DTYPES[args.dtype]
    x_train, y_train = x_train.to(info.device, dtype), y_train.to(info.device)
    x_test, y_test = x_test.to(info.device, dtype), y_test.to(info.device)
    gp_group, dp_group, dp_rank, dp = _mesh_axes(mesh)
    gp_parallel = parallel and (mesh is None or mesh["gp"].size() > 1)
    model = build_model(args, info, gp_parallel, gp_group)
    net = model
    if dp > 1:
        match_global_batch(model, dp_group)
        if gp_parallel:
            # The parallelized model's parameters are DTensors over gp: FSDP2 composes with
            # them (DDP takes plain tensors only). Whole parameters between forward and
            # backward, as DDP holds them; sharded over dp at rest, optimizer state included.
            from torch.distributed.fsdp import fully_shard

            net = fully_shard(model, mesh=mesh["dp"], reshard_after_forward=False)
        else:
            from torch.nn.parallel import DistributedDataParallel

            device_ids = [info.device.index] if info.device.type == "cuda" else None
            net = DistributedDataParallel(model, device_ids=device_ids, process_group=dp_group)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.weight_decay
    )
    steps_per_epoch = math.ceil(len(y_train) / args.batch_size)
    total_steps = steps_per_epoch * args.epochs
    smallest = len(y_train) - (steps_per_epoch - 1) * args.batch_size
    if smallest < dp:
        raise ValueError(
            f"the last batch of each epoch has {smallest} samples, fewer than the {dp} "
            f"data-parallel ranks; change --batch-size or --samples"
        )
    torch.manual_seed(args.seed + 1)  # dropout draws the same stream on every rank and P
    step, losses, epochs, resumed_from = 0, [], [], None

    manager = None
    if parallel and args.checkpoint_dir:
        manager = CheckpointManager(args.checkpoint_dir, keep=args.keep)
        saved = manager.load_latest()
        if saved is not None:
            model.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
            torch.set_rng_state(saved["rng"])
            if saved.get("cuda_rng") is not None:
                torch.cuda.set_rng_state(saved["cuda_rng"], info.device)
            step, losses, epochs = saved["step"], saved["losses"], saved["epochs"]
            resumed_from = step
            if info.is_main:
                print(f"resumed from step {step} of {total_steps} ({args.checkpoint_dir})")

    show = info.is_main and not quiet
    bar = _progress(total_steps, show and not args.no_progress, "train")
    bar.update(step)
    model.train()
    while step < total_steps:
        epoch, index = divmod(step, steps_per_epoch)
        order = torch.randperm(
            len(y_train), generator=torch.Generator().manual_seed(args.seed * 1000 + epoch)
        ).to(info.device)
        batch = order[index * args.batch_size : (index + 1) * args.batch_size]
        for group in optimizer.param_groups:  # cosine decay, a function of the step alone
            group["lr"] = args.lr * 0.5 * (1 + math.cos(math.pi * step / total_steps))
        optimizer.zero_grad(set_to_none=True)
        if dp == 1:
            loss = F.cross_entropy(net(x_train[batch]), y_train[batch])
            loss.backward()
        else:
            # This rank's share of the batch's mean loss; DDP and FSDP2 average the dp ranks'
            # gradients, so the backward pass takes dp times the share.
            rows = torch.tensor_split(batch, dp)[dp_rank]
            logits = net(x_train[rows])
            share = F.cross_entropy(logits, y_train[rows], reduction="sum") / len(batch)
            (share * dp).backward()
            loss = all_reduce_sum(share.detach(), dp_group)
        optimizer.step()
        losses.append(loss.item())
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if step % steps_per_epoch == 0:
            accuracy = _accuracy(model, x_test, y_test, args.batch_size)
            epoch_loss = sum(losses[-steps_per_epoch:]) / steps_per_epoch
            epochs.append({"epoch": epoch + 1, "loss": epoch_loss, "accuracy": accuracy})
            if show:
                bar.write(
                    f"epoch {epoch + 1}/{args.epochs}  loss {epoch_loss:.4f}  "
                    f"held-out accuracy {accuracy:.3f}"
                )
        if manager is not None and args.checkpoint_every and step % args.checkpoint_every == 0:
            state = {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "rng": torch.get_rng_state(),
                # dropout on a GPU draws from the device's generator
                "cuda_rng": torch.cuda.get_rng_state(info.device)
                if info.device.type == "cuda"
                else None,
                "step": step,
                "losses": losses,
                "epochs": epochs,
            }
            manager.save(step, state)
    bar.close()
    result = {
        "losses": losses,
        "epochs": epochs,
        "accuracy": _accuracy(model, x_test, y_test, args.batch_size),
        "resumed_from": resumed_from,
    }
    return result | {"model": model}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mpgroups.train", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.01, help="peak of the cosine schedule")
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--dropout", type=float, default=0.5)
    parser.add_argument("--image-size", type=int, default=32, help="upscaled size (>= 31)")
    parser.add_argument("--samples", type=int, default=None, help="use only this many images")
    parser.add_argument("--channels", type=int, nargs=5, default=list(CHANNELS))
    parser.add_argument("--hidden", type=int, default=256, help="classifier width")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--dtype",
        choices=sorted(_DTYPES),
        default="float64",
        help="float64 (default) keeps the P-process and 1-process loss curves equal to 1e-9 over "
        "the whole run; in float32 their 1e-7 rounding differences (sums taken in another "
        "order across ranks) grow through SGD until the curves part after some tens of steps",
    )
    parser.add_argument(
        "--gp",
        type=int,
        default=None,
        help="group-parallel ranks per model replica (consecutive ranks); data parallel (FSDP2, "
        "the batch split) over the rest. Default: every rank group-parallel",
    )
    parser.add_argument("--device", default=None, help="auto (default), cpu or cuda")
    parser.add_argument("--backend", default=None, help="auto (default), gloo or nccl")
    parser.add_argument("--pg-timeout", type=float, default=None, help="seconds (default 300)")
    parser.add_argument("--checkpoint-dir", default=None)
    parser.add_argument("--checkpoint-every", type=int, default=0, help="steps; 0: never")
    parser.add_argument("--keep", type=int, default=3, help="checkpoints kept")
    parser.add_argument(
        "--compare",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also train a one-process model and compare loss curves (default: when P > 1)",
    )
    parser.add_argument("--save", default=None, help="write the final full state dict here")
    parser.add_argument("--losses-json", default=None, help="write the loss curve here")
    parser.add_argument("--no-progress", action="store_true")
    return parser


@record
def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.image_size < 31:
        raise SystemExit(f"--image-size must be at least 31, got {args.image_size}")
    info = init_distributed(args.backend, args.device, args.pg_timeout)
    try:
        mesh = init_mesh(info, args.gp)
    except ValueError as err:
        shutdown()
        raise SystemExit(f"--gp: {err}") from None
    if info.device.type == "cpu" and "RANK" in os.environ and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // info.world_size))
    start = time.perf_counter()
    result = train(args, info, mesh=mesh)
    elapsed = time.perf_counter() - start
    model = result["model"]
    full = full_state_dict(model, rank0_only=True)
    if info.is_main:
        split = "" if mesh is None else f", mesh dp={mesh['dp'].size()} x gp={mesh['gp'].size()}"
        print(
            f"trained on {info.world_size} process(es), {info.backend or 'no process group'}, "
            f"{info.device}{split}; parameters on rank 0: "
            f"{local_parameter_bytes(model) / 2**20:.2f} MiB"
        )
        print(f"held-out accuracy: {result['accuracy']:.2f}")
        print(f"wall time: {elapsed:.1f} s")
        if args.save:
            atomic_save(full, args.save, checksum=False)
        if args.losses_json:
            Path(args.losses_json).write_text(json.dumps(result["losses"]))
    compare = args.compare if args.compare is not None else info.world_size > 1
    status = 0
    if compare:
        # Every rank trains the reference (no collectives), so no rank waits on another.
        reference = train(args, info, parallel=False, quiet=True)
        pairs = zip(result["losses"], reference["losses"], strict=True)
        worst = max(abs(a - b) / max(abs(b), 1e-12) for a, b in pairs)
        same = worst <= _CURVE_TOLERANCE[args.dtype]
        if info.is_main:
            print(
                f"loss curve vs a 1-process run over {len(reference['losses'])} steps: max "
                f"relative difference {worst:.2e} ({'equal' if same else 'DIFFERENT'})"
            )
        status = 0 if same else 1
    shutdown()
    return status


if __name__ == "__main__":
    sys.exit(main())
