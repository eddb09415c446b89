"""Checks that turn a mismatch between ranks into one clear error on every rank, not a hang.

Before a layer's collectives, every rank describes its input in a small record (shape, dtype,
device type, whether a backward through it is recorded, which layer and which call of it, and
whether its own local checks passed) and
the ranks exchange the records in one tiny all-gather (:func:`all_gather_records`). Each rank
then checks all records the same way, so either every rank proceeds or every rank raises
:class:`InputMismatchError` with the same message naming each rank's values.

``MPGROUPS_CHECKS=0`` (or ``checks=False`` on a layer) skips the exchange for speed: local
checks still raise on the rank that fails them, and a mismatch between ranks then ends at the
process group's timeout instead.
"""

from __future__ import annotations

import os
import time
import zlib
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from mpgroups.collectives import WIRE_DTYPES, all_gather_records
from mpgroups.counter import record

__all__ = [
    "RECORD_SIZE",
    "InputMismatchError",
    "channel_counts",
    "check_across_ranks",
    "checks_enabled",
    "fingerprint",
]

_DTYPES = WIRE_DTYPES
_DEVICE_TYPES = ("cpu", "cuda", "meta")
_MAX_DIMS = 5
# layout of a record: fingerprint, call, local problem, dtype, device, grad, ndim,
# shape[_MAX_DIMS]; grad: whether this call records a backward through the input.
_FINGERPRINT, _CALL, _PROBLEM, _DTYPE, _DEVICE, _GRAD, _NDIM, _SHAPE = range(8)
RECORD_SIZE = _SHAPE + _MAX_DIMS


class InputMismatchError(ValueError):
    """Inputs that cannot go through a collective together; raised on every rank."""


def checks_enabled(flag: bool | None = None) -> bool:
    """``flag`` when given, else the ``MPGROUPS_CHECKS`` environment variable (default on)."""
    if flag is not None:
        return flag
    return os.environ.get("MPGROUPS_CHECKS", "1").strip().lower() not in ("0", "false", "off")


def fingerprint(*parts) -> int:
    """A number that is the same on every process for the same ``parts`` (not ``hash()``)."""
    return zlib.crc32(repr(parts).encode()) & 0x7FFFFFFF


def _code(value, table) -> int:
    return table.index(value) if value in table else -1


# What a rank's local check found, as sent to the other ranks.
NO_TENSOR, BAD_DIMS, BAD_CHANNELS, BAD_DTYPE, BAD_DEVICE = 1, 2, 3, 4, 5
_PROBLEMS = {
    NO_TENSOR: "not a tensor",
    BAD_DIMS: "the wrong number of dimensions for this layer",
    BAD_CHANNELS: "the wrong number of channels",
    BAD_DTYPE: "a dtype that does not match the weight's {weight_dtype}",
    BAD_DEVICE: "a device that does not match the weight's ({weight_device})",
}


def _encode(x, layer_id: int, call: int, problem_code: int) -> Tensor:
    record = torch.full((RECORD_SIZE,), -1, dtype=torch.int64)
    record[_FINGERPRINT], record[_CALL], record[_PROBLEM] = layer_id, call, problem_code
    if isinstance(x, Tensor):
        record[_DTYPE] = _code(x.dtype, _DTYPES)
        record[_DEVICE] = _code(x.device.type, _DEVICE_TYPES)
        record[_GRAD] = int(torch.is_grad_enabled() and x.requires_grad)
        record[_NDIM] = x.dim()
        for i, size in enumerate(x.shape[:_MAX_DIMS]):
            record[_SHAPE + i] = size
    return record


def _describe(record: list[int]) -> str:
    ndim = record[_NDIM]
    if ndim < 0:
        return "no tensor"
    shape = record[_SHAPE : _SHAPE + min(ndim, _MAX_DIMS)]
    dtype = _DTYPES[record[_DTYPE]] if record[_DTYPE] >= 0 else "an unknown dtype"
    device = _DEVICE_TYPES[record[_DEVICE]] if record[_DEVICE] >= 0 else "another device type"
    return f"{list(shape)} {str(dtype).replace('torch.', '')} on {device}"


def check_across_ranks(x, **kwargs) -> list[list[int]]:
    """See :func:`_check_across_ranks`; the whole check (records, exchange, comparison) is
    recorded in open :class:`~mpgroups.CommCounter` s as op ``"input_check"``, kind
    ``"check"``, with its wall time: the cost of the checks."""
    start = time.perf_counter()
    try:
        return _check_across_ranks(x, **kwargs)
    finally:
        group = kwargs["process_group"]
        size = group.size() if group is not None else 1
        record("input_check", size, 0, kind="check", seconds=time.perf_counter() - start)


def _check_across_ranks(
    x,
    *,
    process_group,
    rank: int,
    layer: str,
    layer_id: int,
    call: int,
    problem: tuple[int, str] | None,
    channel_dim: int,
    expected_channels: Sequence[int] | Callable[[list[int]], Sequence[int]],
    channels_note: Sequence[str] | Callable[[list[int]], Sequence[str]],
    weight: Tensor | None = None,
) -> list[list[int]]:
    """Exchange input records and raise :class:`InputMismatchError` on every rank if needed.

    Args:
        x: this rank's input.
        layer: how to name the layer in messages.
        layer_id: :func:`fingerprint` of the layer's configuration (catches ranks calling
            different layers).
        call: how many times this rank has called the layer (catches ranks out of step).
        problem: this rank's local check failure as ``(code, message)``, or ``None``.
        channel_dim: the channel dimension in ``x``.
        expected_channels, channels_note: per rank, the channel count the layer expects and
            what it is ("its shard 16..32 of 64 channels"); or functions of the list of every
            rank's channel count that return them.
        weight: the layer's weight, to name its dtype and device in messages.

    Returns:
        Every rank's record (rows of ``RECORD_SIZE`` integers), when nothing is wrong.
    """
    code = 0 if problem is None else problem[0]
    records = all_gather_records(_encode(x, layer_id, call, code), process_group).tolist()
    if callable(expected_channels) or callable(channels_note):
        sent = [rec[_SHAPE + channel_dim] if rec[_NDIM] > channel_dim else -1 for rec in records]
        if callable(expected_channels):
            expected_channels = expected_channels(sent)
        if callable(channels_note):
            channels_note = channels_note(sent)
    lines = []
    if problem is not None:
        lines.append(f"rank {rank}: {problem[1]}")
    details = {
        "weight_dtype": str(getattr(weight, "dtype", "?")).replace("torch.", ""),
        "weight_device": getattr(getattr(weight, "device", None), "type", "?"),
    }
    for r, rec in enumerate(records):
        if rec[_FINGERPRINT] != layer_id:
            lines.append(f"rank {r} is calling a different layer than {layer} (ranks out of step)")
        elif rec[_CALL] != call:
            lines.append(f"rank {r} is at call {rec[_CALL]} of {layer}, rank {rank} at call {call}")
    reference = records[0]
    for r, rec in enumerate(records):
        sent = _describe(rec)
        if rec[_NDIM] < 0:
            lines.append(f"rank {r} sent {sent}")
            continue
        if r != rank and rec[_PROBLEM] > 0 and rec[_PROBLEM] != BAD_CHANNELS:
            what = _PROBLEMS.get(rec[_PROBLEM], "an input its local checks refused")
            lines.append(f"rank {r} sent {sent}: {what.format(**details)}")
        channels = rec[_SHAPE + channel_dim] if rec[_NDIM] > channel_dim else None
        if channels is not None and channels != expected_channels[r]:
            lines.append(
                f"rank {r} sent {channels} input channels ({sent}), the layer expects "
                f"{expected_channels[r]} ({channels_note[r]})"
            )
        for what, index in (("dtype", _DTYPE), ("device type", _DEVICE), ("dims", _NDIM)):
            if rec[index] != reference[index]:
                lines.append(f"rank {r} sent {sent}, rank 0 sent {_describe(reference)} ({what})")
        if rec[_NDIM] == reference[_NDIM]:
            other = [
                i
                for i in range(min(rec[_NDIM], _MAX_DIMS))
                if i != channel_dim and rec[_SHAPE + i] != reference[_SHAPE + i]
            ]
            if other:
                dims = ", ".join(map(str, other))
                lines.append(
                    f"rank {r} sent {sent}, rank 0 sent {_describe(reference)} (dim {dims} differs)"
                )
    with_grad = [r for r, rec in enumerate(records) if rec[_GRAD] == 1]
    without_grad = [r for r, rec in enumerate(records) if rec[_GRAD] == 0]
    if with_grad and without_grad:
        # The input grad's collectives in backward would wait for the ranks that record none.
        lines.append(
            f"ranks {with_grad} record a backward through the input and ranks {without_grad} "
            f"do not (torch.no_grad() or an input without requires_grad): the backward's "
            f"collectives need every rank"
        )
    if lines:
        unique = list(dict.fromkeys(lines))
        raise InputMismatchError(
            f"{layer}: inputs on the ranks do not fit together:\n  " + "\n  ".join(unique)
        )
    return records


def channel_counts(records: list[list[int]], channel_dim: int = 1) -> list[int]:
    """Each rank's channel count from the records :func:`check_across_ranks` returns."""
    return [rec[_SHAPE + channel_dim] for rec in records]
