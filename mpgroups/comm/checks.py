"""Input checks: a mismatch between ranks becomes one clear error on every rank, not a hang.

Before a call site's collectives, every rank describes its input in a small record (shape,
dtype, device type, whether a backward through it is recorded, which call site and which call
of it, and whether its own local checks passed) and the ranks exchange the records in one tiny
all-gather (:func:`~mpgroups.comm.collectives.all_gather_records`). Each rank then reads all
records the same way, so either every rank proceeds or every rank raises
:class:`InputMismatchError` with the same message naming each rank's values.

Every checked call site (the layers, :class:`~mpgroups.GatherChannels`, ``gather_channels``,
``scatter_channels``, ``to_conv``/``full_weight``, ``full_state_dict``) goes through one
:class:`InputGuard`.

A layer inside a parallelized model (one with a :class:`RootCheck`), during a forward whose
root checked, exchanges only on its first call with a new input signature (shape, dtype,
device type, grad mode): once the ranks agree on the model's inputs, modes and weights, which
the root checks every forward, every layer's input follows from them, so every rank decides
alike and a model's steady-state forward makes one exchange. A standalone call site, or a
layer called outside its model's forward, exchanges on every call.

``MPGROUPS_CHECKS`` sets how much is checked: ``1`` (default) as above; ``detail`` makes every
call site exchange on every call, also inside a parallelized model (the debug setting: it
catches ranks that took different branches inside the model, or whose shapes follow from
different data, which the root cannot see);
``0`` (or ``checks=False`` on a layer) skips the exchanges for speed. Local checks still raise
on the rank that fails them, but with ``0`` a mismatch *between* ranks is no longer caught:
depending on the sizes involved it hangs until the process group's timeout, aborts one rank
inside the backend (gloo: "Received data size doesn't match expected size"), or, when the
element counts happen to agree, returns wrong numbers on every rank.
"""

from __future__ import annotations

import copy
import os
import sys
import time
import weakref
import zlib
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves

from mpgroups.comm.collectives import (
    WIRE_DTYPES,
    all_gather_records,
    all_ranks_agree,
    outside_graphs,
    settle_first,
    settle_pending,
    start_all_gather_records,
)
from mpgroups.comm.counter import record
from mpgroups.comm.process_groups import host_group, rank_and_world_size
from mpgroups.sharding.layout import NOT_PICKLABLE
from mpgroups.sharding.spatial import BlockGrid

__all__ = [
    "BAD_SHAPE",
    "RECORD_SIZE",
    "InputGuard",
    "InputMismatchError",
    "RootCheck",
    "channel_counts",
    "check_same_call",
    "check_across_ranks",
    "checks_mode",
    "layer_input_problem",
    "tensor_problem",
    "fingerprint",
]

_DEVICE_TYPES = ("cpu", "cuda", "meta")
_RECORD_DIMS = 5
# layout of a record: fingerprint, call, local problem, dtype, device, grad, mode, others,
# state, ndim, shape[_RECORD_DIMS]; grad: whether this call records a backward through the
# input; mode: grad mode, autocast and inference mode as bits; others, state (a model's root
# only, else -1): digests of the model's other tensor inputs and of its parallel layers'
# weight dtypes and devices.
_FINGERPRINT, _CALL, _PROBLEM, _DTYPE, _DEVICE, _GRAD, _MODE, _OTHERS, _STATE, _NDIM, _SHAPE = (
    range(11)
)
RECORD_SIZE = _SHAPE + _RECORD_DIMS


class InputMismatchError(ValueError):
    """Inputs that cannot go through a collective together; raised on every rank."""


def checks_mode(flag: bool | None = None) -> str:
    """``"off"``, ``"on"`` or ``"detail"``: the ``MPGROUPS_CHECKS`` environment variable
    (``0``/``1``/``detail``; default ``1``), unless ``flag`` is given: ``False`` is
    ``"off"``, ``True`` is ``"on"`` (``"detail"`` when the variable says so)."""
    value = os.environ.get("MPGROUPS_CHECKS", "1").strip().lower()
    if value == "detail" and flag is not False:
        return "detail"
    if flag is not None:
        return "on" if flag else "off"
    return "off" if value in ("0", "false", "off") else "on"


def fingerprint(*parts) -> int:
    """A number that is the same on every process for the same ``parts`` (not ``hash()``)."""
    return zlib.crc32(repr(parts).encode()) & 0x7FFFFFFF


# What a rank's local check found, as sent to the other ranks.
NO_TENSOR, BAD_DIMS, BAD_CHANNELS, BAD_DTYPE, BAD_DEVICE, BAD_SHAPE = 1, 2, 3, 4, 5, 6
_PROBLEMS = {
    NO_TENSOR: "not a tensor",
    BAD_DIMS: "the wrong number of dimensions for {site}",
    BAD_CHANNELS: "the wrong number of channels",
    BAD_DTYPE: "a dtype that does not match the weight's {weight_dtype}",
    BAD_DEVICE: "a device that does not match the weight's ({weight_device})",
    BAD_SHAPE: "a shape {site} cannot take",
}

Problem = tuple[int, str]


def tensor_problem(x, expects: str, min_dims: int, max_dims: int | None = None) -> Problem | None:
    """The local problem when ``x`` is no tensor, or has fewer than ``min_dims`` or more than
    ``max_dims`` dims (``expects`` says what the call site takes); else ``None``."""
    if not isinstance(x, Tensor):
        return NO_TENSOR, f"expects {expects}, got {type(x).__name__}"
    if x.dim() < min_dims or (max_dims is not None and x.dim() > max_dims):
        return BAD_DIMS, f"expects {expects}, got {x.dim()}-D of shape {tuple(x.shape)}"
    return None


def layer_input_problem(
    x,
    expects: str,
    dims: tuple[int, int],
    channel_dim: int,
    channels: int,
    note: str,
    weight: Tensor,
) -> Problem | None:
    """A layer's local input problem: not a tensor, ``x.dim()`` outside ``dims = (min, max)``,
    ``channels`` not found on ``channel_dim`` (``note`` says what they are), or a dtype or
    device other than ``weight``'s; ``None`` when ``x`` can be this rank's input."""
    problem = tensor_problem(x, expects, *dims)
    if problem is not None:
        return problem
    if x.shape[channel_dim] != channels:
        return BAD_CHANNELS, (
            f"input has {x.shape[channel_dim]} channels, the layer expects {channels} ({note})"
        )
    # Under autocast the layer casts its input itself, as torch.nn's layers do.
    if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
        return BAD_DTYPE, f"input dtype {x.dtype} does not match the weight's {weight.dtype}"
    if x.device != weight.device:
        return BAD_DEVICE, f"input is on {x.device}, the weight on {weight.device}"
    return None


def _records_grad(x: Tensor) -> bool:
    """Whether this call records a backward through ``x``."""
    return torch.is_grad_enabled() and x.requires_grad


def _code(value, table) -> int:
    return table.index(value) if value in table else -1


def _mode_bits(device_type: str) -> int:
    """Grad mode, autocast (on ``device_type``) and inference mode, as bits 0, 1, 2."""
    return (
        int(torch.is_grad_enabled())
        | int(torch.is_autocast_enabled(device_type)) << 1
        | int(torch.is_inference_mode_enabled()) << 2
    )


def _describe_mode(bits: int) -> str:
    names = (("grad enabled", "grad disabled"), ("autocast", "no autocast"))
    words = [names[i][0] if bits >> i & 1 else names[i][1] for i in range(2)]
    return ", ".join(words + ["inference mode"] * (bits >> 2 & 1))


def _encode(
    x, site_id: int, call: int, problem_code: int, others: int = -1, state: int = -1
) -> Tensor:
    rec = [-1] * RECORD_SIZE
    rec[_FINGERPRINT], rec[_CALL], rec[_PROBLEM] = site_id, call, problem_code
    rec[_OTHERS], rec[_STATE] = others, state
    rec[_MODE] = _mode_bits(x.device.type if isinstance(x, Tensor) else "cpu")
    if isinstance(x, Tensor):
        rec[_DTYPE] = _code(x.dtype, WIRE_DTYPES)
        rec[_DEVICE] = _code(x.device.type, _DEVICE_TYPES)
        rec[_GRAD] = int(_records_grad(x))
        rec[_NDIM] = x.dim()
        shape = x.shape[:_RECORD_DIMS]
        rec[_SHAPE : _SHAPE + len(shape)] = shape
    return torch.tensor(rec, dtype=torch.int64)


def _describe(rec: list[int]) -> str:
    ndim = rec[_NDIM]
    if ndim < 0:
        return "no tensor"
    shape = rec[_SHAPE : _SHAPE + min(ndim, _RECORD_DIMS)]
    dtype = WIRE_DTYPES[rec[_DTYPE]] if rec[_DTYPE] >= 0 else "an unknown dtype"
    device = _DEVICE_TYPES[rec[_DEVICE]] if rec[_DEVICE] >= 0 else "another device type"
    return f"{list(shape)} {str(dtype).replace('torch.', '')} on {device}"


def _channel_index(rec: list[int], channel_dim: int) -> int | None:
    """Where this record's channels are: ``channel_dim``, or counted from its end if < 0."""
    ndim = rec[_NDIM]
    index = ndim + channel_dim if channel_dim < 0 else channel_dim
    return index if 0 <= index < min(ndim, _RECORD_DIMS) else None


def _channel_indices(rec: list[int], channel_dim: int | tuple[int, ...]) -> set[int]:
    dims = channel_dim if isinstance(channel_dim, tuple) else (channel_dim,)
    return {_channel_index(rec, dim) for dim in dims} - {None}


def channel_counts(
    records: list[list[int]], channel_dim: int | tuple[int, ...] = 1
) -> list[int | tuple[int, ...]]:
    """Each rank's channel count (-1 where it has none) from the exchanged records; for a
    tuple of dims (a block of a grid), each rank's sizes along them."""
    dims = channel_dim if isinstance(channel_dim, tuple) else (channel_dim,)
    counts = []
    for rec in records:
        indices = [_channel_index(rec, dim) for dim in dims]
        if None in indices:
            counts.append(-1)
        else:
            sizes = tuple(rec[_SHAPE + index] for index in indices)
            counts.append(sizes if isinstance(channel_dim, tuple) else sizes[0])
    return counts


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
    layer: str,
    layer_id: int,
    call: int,
    problem: Problem | None,
    channel_dim: int | tuple[int, ...],
    expected_channels: Sequence[int | None] | Callable[[list[int]], Sequence[int | None]],
    channels_note: Sequence[str] | Callable[[list[int]], Sequence[str]],
    weight: Tensor | None = None,
    counted: str = "input channels",
) -> list[list[int]]:
    """Exchange input records and raise :class:`InputMismatchError` on every rank if needed.

    Args:
        x: this rank's input (``None`` on a rank that contributes no tensor).
        layer: how to name the call site in messages.
        layer_id: :func:`fingerprint` of the call site's configuration (catches ranks
            calling different sites).
        call: how many times this rank has called the site (catches ranks out of step).
        problem: this rank's local check failure as ``(code, message)``, or ``None``.
        channel_dim: the channel dimension of every rank's input; negative counts from each
            record's own end (``-3`` for a Conv2d, batched or not); a tuple of dims counts
            a block's sizes along each (a spatial grid's).
        expected_channels, channels_note: per rank, the channel count the site expects and
            what it is ("its shard 16..32 of 64 channels"), ``None`` for a rank that sends no
            tensor; or functions of the list of every rank's channel count that return them.
        weight: the layer's weight, to name its dtype and device in messages.
        counted: what ``channel_dim`` counts, in messages (``"rows"`` for a spatial block).

    Returns:
        Every rank's record (rows of ``RECORD_SIZE`` integers), when nothing is wrong.
        The message's lines are the same on every rank; its first names this rank's site.
    """
    code = 0 if problem is None else problem[0]
    like = x if isinstance(x, Tensor) else None
    records = all_gather_records(_encode(x, layer_id, call, code), process_group, like).tolist()
    return judge_records(
        records, layer=layer, channel_dim=channel_dim, expected_channels=expected_channels,
        counted=counted,
        channels_note=channels_note, weight=weight,
    )  # fmt: skip


def judge_records(
    records: list[list[int]],
    *,
    layer: str,
    channel_dim: int | tuple[int, ...],
    expected_channels,
    channels_note,
    weight: Tensor | None = None,
    tensor_optional: bool = False,
    counted: str = "input channels",
) -> list[list[int]]:
    """Return every rank's exchanged record, or raise :class:`InputMismatchError` with the
    same message on every rank (arguments as :func:`_check_across_ranks`'s;
    ``tensor_optional``: ranks that all sent no tensor agree)."""
    sent_channels = channel_counts(records, channel_dim)
    if callable(expected_channels):
        expected_channels = expected_channels(sent_channels)
    if callable(channels_note):
        channels_note = channels_note(sent_channels)
    details = {
        "site": layer,
        "weight_dtype": str(getattr(weight, "dtype", "?")).replace("torch.", ""),
        "weight_device": getattr(getattr(weight, "device", None), "type", "?"),
    }
    lines = []
    sites = [rec[_FINGERPRINT] for rec in records]
    calls = [rec[_CALL] for rec in records]
    if len(set(sites)) > 1:
        by_site = [[r for r, site in enumerate(sites) if site == s] for s in dict.fromkeys(sites)]
        # Nothing else compares across different call sites.
        raise InputMismatchError(
            f"{layer}: ranks {' and '.join(map(str, by_site))} are calling different call "
            f"sites (ranks out of step, or another layer or model)"
        )
    if len(set(calls)) > 1:
        lines.append(f"the ranks are at calls {calls} of {layer} (ranks out of step)")
    holders = [r for r in range(len(records)) if expected_channels[r] is not None]
    reference = records[holders[0]] if holders else None
    for r in holders:
        rec = records[r]
        sent = _describe(rec)
        if rec[_NDIM] < 0 and (not tensor_optional or reference[_NDIM] >= 0):
            lines.append(f"rank {r} sent {sent}")
            continue
        if rec[_PROBLEM] > 0 and rec[_PROBLEM] != BAD_CHANNELS:
            what = _PROBLEMS.get(rec[_PROBLEM], "an input its local checks refused")
            lines.append(f"rank {r} sent {sent}: {what.format(**details)}")
        if sent_channels[r] != -1 and sent_channels[r] != expected_channels[r]:
            lines.append(
                f"rank {r} sent {sent_channels[r]} {counted} ({sent}), {layer} expects "
                f"{expected_channels[r]} ({channels_note[r]})"
            )
        if rec[_MODE] != reference[_MODE]:
            lines.append(
                f"rank {r} runs with {_describe_mode(rec[_MODE])}, rank {holders[0]} with "
                f"{_describe_mode(reference[_MODE])}"
            )
        if rec[_OTHERS] != reference[_OTHERS]:
            lines.append(
                f"rank {r} passed other tensors besides the first (shapes, dtypes, devices or "
                f"requires_grad) than rank {holders[0]}"
            )
        if rec[_STATE] != reference[_STATE]:
            lines.append(
                f"rank {r}'s model holds parameters of other dtypes, devices or requires_grad, "
                f"or is in another train/eval mode, than rank {holders[0]}'s (a .double(), a "
                f"freeze or an .eval() on some ranks only)"
            )
        for what, index in (("dtype", _DTYPE), ("device type", _DEVICE), ("dims", _NDIM)):
            if rec[index] != reference[index]:
                lines.append(
                    f"rank {r} sent {sent}, rank {holders[0]} sent {_describe(reference)} ({what})"
                )
        if rec[_NDIM] == reference[_NDIM]:
            counted_dims = _channel_indices(rec, channel_dim)
            other = [
                i
                for i in range(min(rec[_NDIM], _RECORD_DIMS))
                if i not in counted_dims and rec[_SHAPE + i] != reference[_SHAPE + i]
            ]
            if other:
                dims = ", ".join(map(str, other))
                lines.append(
                    f"rank {r} sent {sent}, rank {holders[0]} sent {_describe(reference)} "
                    f"(dim {dims} differs)"
                )
    with_grad = [r for r in holders if records[r][_GRAD] == 1]
    without_grad = [r for r in holders if records[r][_GRAD] == 0]
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


class InputGuard:
    """The check of one call site, run before its collectives.

    With more than one rank and checks on, a call exchanges records (see the module
    docstring) and any problem on any rank raises :class:`InputMismatchError` on all of
    them: every call of a standalone site; under a model's root check (``clock``), the first
    call with each new input signature, or a call whose local check failed. Otherwise a local
    problem raises on its own rank (``TypeError`` for a non-tensor, ``ValueError`` else) and
    nothing is exchanged.

    Args:
        site: how messages name the call site, e.g. ``"GroupParallelConv2d(8, 8, groups=4)"``.
        config: what identifies the site on every rank (its :func:`fingerprint`).
        process_group: where the site's collectives run (``None``: a single rank).
        channel_dim, counted: as in :func:`check_across_ranks`.
        checks: ``True``/``False``, or ``None`` for ``MPGROUPS_CHECKS``.
    """

    def __init__(
        self,
        site: str,
        config: tuple,
        process_group,
        *,
        channel_dim: int | tuple[int, ...] = 1,
        checks: bool | None = None,
        counted: str = "input channels",
    ) -> None:
        self.site = site
        self.site_id = fingerprint(*config)
        self.process_group = process_group
        # The records travel on the host (a gloo twin of a device group): no device sync.
        self.record_group = host_group(process_group)
        self.rank, self.world_size = rank_and_world_size(process_group)
        self.channel_dim = channel_dim
        self.counted = counted
        self.checks = checks
        self.calls = 0
        # The root check of the model the site belongs to (set by parallelize): the site's
        # records then carry the model's step, and its calls count within that step.
        self.clock: RootCheck | None = None
        self._step = 0
        # Input signatures every rank agreed on here, under the clock (insertion-ordered).
        self._agreed: dict[tuple, None] = {}

    def __deepcopy__(self, memo) -> InputGuard:
        twin = copy.copy(self)  # shares the process group
        twin._agreed = dict(self._agreed)
        memo[id(self)] = twin
        return twin

    def _mode(self, communicates: bool = True) -> str:
        """This call's :func:`checks_mode`; ``"off"`` where no collective follows."""
        return checks_mode(self.checks) if communicates and self.world_size > 1 else "off"

    def exchanges(self, communicates: bool = True) -> bool:
        """Whether a call exchanges records (it does when a collective follows)."""
        return self._mode(communicates) != "off"

    def __call__(
        self,
        x,
        *,
        problem: Problem | None,
        expected_channels,
        channels_note,
        weight: Tensor | None = None,
        communicates: bool = True,
    ) -> list[list[int]] | None:
        """Check ``x``; return every rank's record when they were exchanged, else ``None``."""
        mode = self._mode(communicates)
        if mode != "off":
            clock = self.clock
            if clock is not None and clock.checked and problem is None and mode == "on":
                # Under torch.compile the root's check (outside the graph) is the model's
                # only one: a layer's would break the graph at every layer.
                if torch.compiler.is_compiling():
                    return None
                return self._exchange_once(x, expected_channels, channels_note, weight)
            return self._exchange(x, problem, expected_channels, channels_note, weight)
        if problem is not None:
            error = TypeError if problem[0] == NO_TENSOR else ValueError
            where = f"rank {self.rank} of {self.world_size}"
            raise error(f"{self.site} on {where}: {problem[1]}")
        return None

    def _exchange_once(self, x: Tensor, expected_channels, channels_note, weight):
        """The exchange of a site under a root check: only for an input signature the ranks
        have not agreed on here before (every rank decides alike, since the root agreed on
        the model's input and every layer's input follows from it)."""
        call = self._next_call()
        # The root's agreed context joins the key: a site whose input differs across ranks
        # (a block of rows) may see the same shape on one rank for different model inputs.
        context = self.clock.agreed_context()
        signature = (tuple(x.shape), x.dtype, x.device.type, _records_grad(x), context)
        if signature in self._agreed:
            return None
        records = self._exchange(x, None, expected_channels, channels_note, weight, call)
        if len(self._agreed) >= _SIGNATURES_KEPT:
            del self._agreed[next(iter(self._agreed))]
        self._agreed[signature] = None
        return records

    # Outside any compiled graph: the call count changes every call (a graph would be
    # recompiled for each value), and the exchange reads the real input.
    @outside_graphs
    def _exchange(self, x, problem, expected_channels, channels_note, weight, call=None):
        if call is None:
            call = self._next_call()
        return check_across_ranks(
            x,
            process_group=self.record_group,
            layer=self.site,
            layer_id=self.site_id,
            call=call,
            problem=problem,
            channel_dim=self.channel_dim,
            counted=self.counted,
            expected_channels=expected_channels,
            channels_note=channels_note,
            weight=weight,
        )

    def start(
        self,
        x,
        *,
        expected_channels,
        channels_note,
        others: int = -1,
        state: int = -1,
        tensor_optional: bool = False,
    ) -> Callable[[], list[list[int]]]:
        """Start this call's exchange (``x`` with no local problem; ``others``, ``state``: a
        root's digests) and return at once; the function returned waits for the records,
        raises :class:`InputMismatchError` on every rank if they disagree and returns them
        otherwise. Eager only."""
        started = time.perf_counter()
        call = self._next_call()
        like = x if isinstance(x, Tensor) else None
        # Records are host integers: this exchange never waits for a device.
        values = _encode(like, self.site_id, call, 0, others, state)
        wait = start_all_gather_records(values, self.record_group)
        launch = time.perf_counter() - started

        def settle() -> list[list[int]]:
            begun = time.perf_counter()
            try:
                return judge_records(
                    wait().tolist(), layer=self.site, channel_dim=self.channel_dim,
                    counted=self.counted,
                    expected_channels=expected_channels, channels_note=channels_note,
                    tensor_optional=tensor_optional,
                )  # fmt: skip
            finally:
                seconds = launch + time.perf_counter() - begun
                record("input_check", self.world_size, 0, kind="check", seconds=seconds)

        return settle

    def _next_call(self) -> int:
        """This call's number: the model's step and the call within it under a root check,
        else how many times the site was called."""
        if self.clock is None:
            self.calls += 1
            return self.calls
        if self._step != self.clock.step:
            self._step, self.calls = self.clock.step, 0
        self.calls += 1
        return self.clock.step * _CALLS_PER_STEP + self.calls

    def raise_together(self, ok: bool, message: str) -> None:
        """Raise :class:`InputMismatchError` with ``message`` on every rank unless ``ok`` holds
        on every rank (one tiny all-reduce; nothing when checks are off or on one rank)."""
        if self.exchanges() and not all_ranks_agree(ok, self.record_group):
            raise InputMismatchError(f"{self.site}: {message}")


def check_same_call(site: str, config: tuple, process_group) -> None:
    """Raise :class:`InputMismatchError` on every rank unless every rank of the group reaches
    this collective with the same ``config`` (e.g. the names and shapes of the tensors it is
    about to move): the check for collectives over state rather than an input."""
    guard = InputGuard(site, (site, config), process_group)
    nothing = [None] * guard.world_size
    guard(None, problem=None, expected_channels=nothing, channels_note=nothing)


_DTYPE_CODES = {dtype: code for code, dtype in enumerate(WIRE_DTYPES, start=1)}
_CALLS_PER_STEP = 1 << 20  # calls of one site within one step of its model, at most
_SIGNATURES_KEPT = 64  # input signatures a site under a root check remembers, the newest
_WHOLE = _RECORD_DIMS  # a channel dim no record has: every dim is compared


@outside_graphs
def _check_now(root: RootCheck, module, tensors: list[Tensor]) -> None:
    """``root``'s exchange for a forward of ``module``, completed at once, outside any
    compiled graph."""
    x, record = root._record(module, tensors)
    root._agree(root.guard.start(x, **record)())


class RootCheck:
    """The check a parallelized model makes once per forward, at its root (a forward
    pre-hook ``parallelize`` registers).

    As the model starts, the ranks exchange a record of its input (the first tensor among
    the arguments: every dim, dtype, device type, whether a backward is recorded) and of its
    step (how many forwards the model has begun): any difference raises on every rank before
    any data moves, so a rank that fails alone early in the model (a float64 batch reaching
    a replicated conv on one rank only) never leaves the others waiting. The model's layers
    carry the step in their own records (``InputGuard.clock``), so ranks out of step never
    pair one batch with another: with ``MPGROUPS_CHECKS=detail``, a rank that failed alone
    inside a step (its own error, after this check) meets the others' next root check at a
    layer's check, both raise, and every later step raises on every rank, since their steps
    differ from then on: the job must restart (``torchrun --max-restarts`` resumes from its
    last checkpoint). Deep copies share it (an EMA copy runs in step on every rank as the
    model does).

    The exchange runs while the model does: the hook starts it and returns, and it settles
    before this process's next collective or record exchange (the model's data never moves
    before the ranks agree), or at the end of the forward (:meth:`finish`, an always-called
    forward hook), whichever comes first. A rank that fails alone before that point (torch's
    own error in a replicated stem conv) raises its own error with the mismatch added as a
    note; the other ranks raise :class:`InputMismatchError`. Under ``torch.compile`` and with
    ``MPGROUPS_CHECKS=detail`` the exchange completes in the hook.
    """

    def __init__(
        self,
        site: str,
        process_group,
        layers: Sequence[InputGuard] = (),
        split: BlockGrid | None = None,
    ) -> None:
        # An input check like a layer's, of every dim (no channel count; ``split``: how
        # the ranks tile the dims they hold balanced blocks of, a split model's rows),
        # counting the steps; its fingerprint covers the layers' too, so ranks whose models
        # differ never agree.
        layer_ids = tuple(guard.site_id for guard in layers)
        self.split = split
        self.guard = InputGuard(
            f"{site} (the parallelized model's input)", ("root", site, layer_ids, split),
            process_group, channel_dim=_WHOLE if split is None else split.checked_dims,
            counted="rows",
        )  # fmt: skip
        # What every rank agreed on at the last root check besides its own input: the
        # total of the split dim (a split model), or nothing.
        self._context: tuple = ()
        for guard in layers:
            guard.clock = self
        # Whether the running forward's input was checked here: only then may its layers
        # skip their own checks (not in a submodule called alone, not with checks off here).
        self.checked = False
        self._in_flight: Callable[[], None] | None = None
        self._handled_before: BaseException | None = None
        # Per root module (a deep copy is another): its parameters, for the state digest.
        self._params: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    @property
    def step(self) -> int:
        """How many forwards the model has begun (with checks on)."""
        return self.guard.calls

    def __copy__(self) -> RootCheck:
        return self

    def __deepcopy__(self, memo) -> RootCheck:
        return self

    def __reduce_ex__(self, protocol):
        raise TypeError(NOT_PICKLABLE)

    def __call__(self, module, args, kwargs=None) -> None:
        guard = self.guard
        self.checked = False
        if not guard.exchanges():
            return
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)]
        # The layers' inputs follow from the model's only when it sees one: a batch object
        # torch's pytree cannot look into leaves every layer checking each call.
        self.checked = bool(tensors)
        if torch.compiler.is_compiling() or checks_mode() == "detail":
            _check_now(self, module, tensors)
            return
        self._settle()  # one left by a forward that ended early (not expected)
        self._handled_before = sys.exc_info()[1]
        x, record = self._record(module, tensors)
        self._in_flight = guard.start(x, **record)
        settle_first(self._settle)

    def _record(self, module, tensors: list[Tensor]) -> tuple:
        """``(x, what guard.start takes besides)`` for a forward of ``module`` whose
        arguments hold ``tensors``."""
        world = self.guard.world_size
        if self.split is None:
            expected, note = [-1] * world, [""] * world  # no channel count: every dim
        else:
            expected, note = self.split.expected, self.split.note
        return tensors[0] if tensors else None, dict(
            expected_channels=expected,
            channels_note=note,
            others=fingerprint(*((tuple(t.shape), t.dtype, t.device.type, t.requires_grad)
                                 for t in tensors[1:])),
            state=self._state(module),
            tensor_optional=True,  # a model may take no tensor (a batch object)
        )  # fmt: skip

    def _state(self, root: nn.Module) -> int:
        """A digest of ``root``'s parameters' dtypes, ``requires_grad`` and device kinds, and
        of its train/eval mode: what makes a rank's layers see other inputs than the others'
        from the same batch (a ``.double()`` or a freeze on one rank only)."""
        params = self._params.get(root)
        if params is None:
            params = self._params[root] = list(root.parameters())
        codes = bytes(
            _DTYPE_CODES.get(p.dtype, 0) * 4 + p.requires_grad * 2 + p.is_cuda for p in params
        )
        return zlib.crc32(codes + bytes([root.training])) & 0x7FFFFFFF

    def _settle(self) -> None:
        in_flight, self._in_flight = self._in_flight, None
        if in_flight is not None:
            self._agree(in_flight())

    def _agree(self, records: list[list[int]]) -> None:
        if self.split is not None:
            totals = self.split.totals(channel_counts(records, self.split.checked_dims))
            self._context = (totals, 0)

    def agreed_context(self) -> tuple:
        """What every rank knows alike at this point of the forward besides its own input:
        for a split model, the root's total and a digest of what the layers before learned
        (``note``); settles the root's exchange first. Empty for other models."""
        if self.split is not None:
            self._settle()
        return self._context

    def note(self, *learned: int) -> None:
        """Fold what a layer learned, the same on every rank (its input's total rows), into
        the context of the layers after it: a layer whose block keeps its shape while the
        totals before it changed (another path through the model) then exchanges again."""
        if self._context:
            total, path = self._context
            self._context = (total, fingerprint(path, *learned))

    def finish(self, module, args, output) -> None:
        """Settle the exchange at the end of the forward, if no collective did before. On a
        forward that raised (an exception being handled other than the one, if any, handled
        where the forward began), a mismatch becomes a note on that exception: torch
        re-raises it whatever its always-called hooks raise."""
        self.checked = False
        if self._in_flight is None:
            return
        handled = sys.exc_info()[1]
        raised = handled if handled is not self._handled_before else None
        self._handled_before = None
        try:
            settle_pending()
            self._settle()
        except InputMismatchError as mismatch:
            if raised is None:
                raise
            raised.add_note(f"mpgroups: {mismatch}")
