"""Count what the collectives move: a context manager used by tests and benchmarks."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

__all__ = ["CommCounter", "CommRecord"]

# Process-wide, not a context variable: on CUDA the autograd engine runs backward (and so the
# backward collectives) on its own threads, which must be counted too.
_active: list[CommCounter] = []
_lock = threading.Lock()


@dataclass(frozen=True)
class CommRecord:
    """One collective as this rank issued it.

    ``nbytes`` follows the nccl-tests "size" convention: the whole gathered tensor for an
    all-gather, the whole input for a reduce-scatter, the tensor for an all-reduce or a
    broadcast, and all shards for a scatter or a gather. Padding of uneven shards counts
    as sent. ``kind`` is ``"data"`` for activations, gradients and weights, ``"meta"`` for
    metadata (input-check records, shapes, flags, barriers), ``"check"`` for a whole input
    check (exchange included).
    ``seconds`` is the wall time of the call on this rank (for a synchronous backend such as
    gloo, the time the collective took; 0 where not timed).
    """

    op: str
    group_size: int
    nbytes: int
    kind: str = "data"
    seconds: float = 0.0


class CommCounter:
    """Record every collective that mpgroups issues on this rank while the context is open.

    Example::

        with CommCounter() as comm:
            y = layer(x)
            y.backward(grad)
        comm.count("all_gather")  # collectives of that op
        comm.bytes()  # data bytes, metadata excluded

    Collectives inside a ``torch.compile``'d graph are not recorded: a count taken while
    tracing would be the trace's, once, not each run's (and timing them would break the
    graph). The input checks run outside the graph and are recorded.
    """

    def __init__(self) -> None:
        self.records: list[CommRecord] = []

    def __enter__(self) -> CommCounter:
        with _lock:
            _active.append(self)
        return self

    def __exit__(self, *exc) -> None:
        with _lock:
            _active.remove(self)

    def _select(self, op: str | None, kind: str | None) -> list[CommRecord]:
        return [
            r
            for r in self.records
            if (op is None or r.op == op) and (kind is None or r.kind == kind)
        ]

    def count(self, op: str | None = None, kind: str | None = "data") -> int:
        """Number of collectives, of one ``op`` or all; ``kind=None`` counts every kind."""
        return len(self._select(op, kind))

    def seconds(self, op: str | None = None, kind: str | None = "data") -> float:
        """Wall time spent in the collectives (see :class:`CommRecord`)."""
        return sum(r.seconds for r in self._select(op, kind))

    def bytes(self, op: str | None = None, kind: str | None = "data") -> int:
        """Bytes moved, of one ``op`` or all (see :class:`CommRecord` for the convention)."""
        return sum(r.nbytes for r in self._select(op, kind))

    def ops(self, kind: str | None = "data") -> Counter:
        """``Counter`` of op names."""
        return Counter(r.op for r in self._select(None, kind))

    def __repr__(self) -> str:
        meta = self.count(kind="meta")
        return f"CommCounter(data={self.count()} ops/{self.bytes()} B, meta={meta} ops)"


def record(op: str, group_size: int, nbytes: int, kind: str = "data", seconds: float = 0.0) -> None:
    """Add one collective to every open :class:`CommCounter`."""
    if _active and not torch.compiler.is_compiling():
        rec = CommRecord(op, group_size, nbytes, kind, seconds)
        with _lock:
            for counter in _active:
                counter.records.append(rec)


@contextmanager
def counted(op: str, group_size: int, nbytes: int, kind: str = "data") -> Iterator[None]:
    """Record the collective run inside the block, with its wall time."""
    if not _active or torch.compiler.is_compiling():
        yield
        return
    start = time.perf_counter()
    yield
    record(op, group_size, nbytes, kind, time.perf_counter() - start)
