"""Where finetune work units run: the co-run loop submits them, an executor runs them.

The co-run loop (``corun/controller.py``) decides; the executor only does. Before a decode
iteration the loop plans a *share* of the device for finetune (cores on a CPU, SMs on a GPU)
and submits units with it; :meth:`Executor.poll` hands completed units back, with what they
measured, at a later hook (it never blocks). Backends (:data:`EXECUTORS`):

- ``inline``: a unit runs at once, on the caller's thread (the scheduler's, after the decode):
  temporal sharing, the behaviour before executors existed, and what TP > 1 runs;
- ``cpu-concurrent``: one worker thread in the scheduler process runs units *beside* decode,
  with its own intra-op threads (the share's cores) and, where the OS allows, its own cores
  (``srt/scheduler.py`` gives it its setup and share callbacks; ``docs/corun.md``: why a thread
  and not a process);
- ``cuda``: units launched on a finetune stream over an SM partition, completed by events; its
  interface is :class:`Executor`, filled in by the GPU issue (``docs/corun.md``).

Rules every backend keeps:

- at most ``max_inflight`` units are submitted and not yet handed back, so a new plan takes
  effect within about one iteration: :meth:`Executor.submit` refuses more;
- completions come back in submission order (a work unit's order is the trainer's);
- :meth:`Executor.last_fence` is what the KV lender waits on before lent slots go back to
  decode: every unit submitted so far has finished with the memory it was given;
- :meth:`Executor.drain` blocks until nothing is in flight; only off the decode path (a job's
  end, a cancel, a flush); :meth:`Executor.discard_queued` drops what has not started yet.

This module imports no torch: a backend touches the device only through the callbacks it is
given, so it is tested with timed fake units on plain threads.
"""

from __future__ import annotations

import abc
import collections
import dataclasses
import threading
import time
from collections.abc import Callable
from typing import Any, ClassVar, Protocol

from sglang_harli.config import ExecutorKind


class Unit(Protocol):
    """What an executor runs: a kind and a cost the predictor knows, and the work."""

    kind: str
    cost: float

    def run(self) -> Any: ...


@dataclasses.dataclass(frozen=True)
class Share:
    """The part of the device a unit may use: ``fraction`` of what finetune may get beside
    decode (the cores decode leaves on a CPU, the SMs on a GPU). 0 is nothing: no unit is
    submitted. ``idle``: no decode runs (an idle quantum), so the unit may also use decode's
    part, the whole device."""

    fraction: float
    idle: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.fraction <= 1.0:
            raise ValueError(f"a share is a fraction in [0, 1], not {self.fraction}")

    def workers(self, available: int) -> int:
        """Cores (or SMs) of ``available`` this share grants: at least one when not 0."""
        if self.fraction == 0:
            return 0
        return max(1, min(available, round(self.fraction * available)))


@dataclasses.dataclass(frozen=True)
class Ticket:
    seq: int  # submission order, from 1
    kind: str
    cost: float
    share: Share
    submitted: float  # on the executor's clock


@dataclasses.dataclass(frozen=True)
class Completion:
    """A unit handed back: what it returned or raised, and when it ran (the executor's clock)."""

    ticket: Ticket
    unit: Any
    started: float
    ended: float
    result: Any = None
    error: BaseException | None = None
    discarded: bool = False  # dropped before it started (:meth:`Executor.discard_queued`)

    @property
    def seconds(self) -> float:
        return self.ended - self.started


class ExecutorFull(RuntimeError):
    """``submit`` with ``max_inflight`` units already in flight: poll first."""


class Fence(abc.ABC):
    """Done once the units submitted before it have finished."""

    @abc.abstractmethod
    def done(self) -> bool: ...

    @abc.abstractmethod
    def wait(self, timeout: float | None = None) -> bool:
        """Block until done (True) or ``timeout`` seconds passed (False)."""


class _Done(Fence):
    def done(self) -> bool:
        return True

    def wait(self, timeout: float | None = None) -> bool:
        return True


DONE = _Done()


class Executor(abc.ABC):
    """The interface the co-run loop drives (see the module docstring)."""

    kind: ClassVar[ExecutorKind]
    concurrent: ClassVar[bool]  # units run beside decode (else after it, on the caller)

    def __init__(self, max_inflight: int = 2, clock: Callable[[], float] = time.perf_counter):
        if max_inflight < 1:
            raise ValueError(f"max_inflight must be >= 1, not {max_inflight}")
        self.max_inflight, self.clock = max_inflight, clock
        self.submitted = 0  # units ever submitted
        self.busy_s = 0.0  # time units ran, summed over those handed back

    @property
    @abc.abstractmethod
    def inflight(self) -> int:
        """Units submitted and not yet handed back by :meth:`poll`."""

    def in_flight_units(self) -> list[tuple[str, float]]:
        """(kind, share) of each unit submitted and not yet finished."""
        return []

    def can_submit(self) -> bool:
        return self.inflight < self.max_inflight

    @abc.abstractmethod
    def submit(self, unit: Unit, share: Share) -> Ticket: ...

    @abc.abstractmethod
    def poll(self) -> list[Completion]:
        """Units finished since the last poll, in submission order; never blocks."""

    @abc.abstractmethod
    def last_fence(self) -> Fence: ...

    @abc.abstractmethod
    def drain(self, timeout: float | None = None) -> list[Completion]:
        """Wait for every unit in flight; off the decode path only."""

    def discard_queued(self) -> int:
        """Drop the units that have not started (handed back as discarded); returns how many."""
        return 0

    def close(self) -> None:  # noqa: B027 - a backend without threads has nothing to stop
        """Stop the backend's threads (units in flight are drained first)."""

    def _ticket(self, unit: Unit, share: Share) -> Ticket:
        if not self.can_submit():
            raise ExecutorFull(f"{self.inflight} units in flight (at most {self.max_inflight})")
        self.submitted += 1
        return Ticket(self.submitted, unit.kind, unit.cost, share, self.clock())

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": str(self.kind),
            "max_inflight": self.max_inflight,
            "inflight": self.inflight,
            "submitted": self.submitted,
            "busy_s": round(self.busy_s, 6),
        }


class InlineExecutor(Executor):
    """Units run at once on the caller's thread; ``poll`` hands them back."""

    kind = ExecutorKind.INLINE
    concurrent = False

    def __init__(self, max_inflight: int = 1, clock: Callable[[], float] = time.perf_counter):
        super().__init__(max_inflight, clock)
        self._done: collections.deque[Completion] = collections.deque()

    @property
    def inflight(self) -> int:
        return len(self._done)

    def submit(self, unit: Unit, share: Share) -> Ticket:
        ticket = self._ticket(unit, share)
        self._done.append(_execute(unit, ticket, self.clock))
        return ticket

    def poll(self) -> list[Completion]:
        done, self._done = list(self._done), collections.deque()
        self.busy_s += sum(c.seconds for c in done)
        return done

    def last_fence(self) -> Fence:
        return DONE

    def drain(self, timeout: float | None = None) -> list[Completion]:
        return self.poll()


class _TicketFence(Fence):
    def __init__(self, executor: ThreadExecutor, seq: int):
        self.executor, self.seq = executor, seq

    def done(self) -> bool:
        return self.executor._finished_seq >= self.seq

    def wait(self, timeout: float | None = None) -> bool:
        with self.executor._cond:
            return self.executor._cond.wait_for(self.done, timeout)


class ThreadExecutor(Executor):
    """``cpu-concurrent``: one worker thread runs the units, in order, beside the caller.

    ``setup`` runs once on the worker (its intra-op threads, its core affinity); ``apply_share``
    runs on the worker before a unit whose share differs from the previous unit's, so a plan
    takes effect at the next unit submitted after it.
    """

    kind = ExecutorKind.CPU_CONCURRENT
    concurrent = True

    def __init__(
        self,
        max_inflight: int = 2,
        clock: Callable[[], float] = time.perf_counter,
        *,
        setup: Callable[[], None] | None = None,
        apply_share: Callable[[Share], None] | None = None,
        name: str = "harli-finetune",
    ):
        super().__init__(max_inflight, clock)
        self.setup, self.apply_share = setup, apply_share
        self._cond = threading.Condition()
        self._queue: collections.deque[tuple[Unit, Ticket]] = collections.deque()
        self._done: dict[int, Completion] = {}  # by seq: handed back in submission order
        self._next_out = 1  # the seq poll hands back next
        self._inflight = 0  # submitted, not yet polled
        self._finished_seq = 0  # every unit up to this one finished (or was discarded)
        self._running: Ticket | None = None  # the unit the worker runs now
        self._closed = False
        self._share: Share | None = None
        self.setup_error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    @property
    def inflight(self) -> int:
        return self._inflight

    def submit(self, unit: Unit, share: Share) -> Ticket:
        with self._cond:
            if self._closed:
                raise RuntimeError("executor closed")
            ticket = self._ticket(unit, share)
            self._inflight += 1
            self._queue.append((unit, ticket))
            self._cond.notify_all()
        return ticket

    def poll(self) -> list[Completion]:
        done = []
        with self._cond:
            # in submission order: a unit dropped from the queue waits behind the running one
            while self._next_out in self._done:
                done.append(self._done.pop(self._next_out))
                self._next_out += 1
            self._inflight -= len(done)
        self.busy_s += sum(c.seconds for c in done if not c.discarded)
        return done

    def in_flight_units(self) -> list[tuple[str, float]]:
        with self._cond:
            tickets = [t for _, t in self._queue]
            if self._running is not None:
                tickets.insert(0, self._running)
        return [(t.kind, t.share.fraction) for t in tickets]

    def last_fence(self) -> Fence:
        return _TicketFence(self, self.submitted)

    def drain(self, timeout: float | None = None) -> list[Completion]:
        self.last_fence().wait(timeout)
        return self.poll()

    def discard_queued(self) -> int:
        with self._cond:
            dropped = list(self._queue)
            self._queue.clear()
            now = self.clock()
            for unit, ticket in dropped:
                self._done[ticket.seq] = Completion(ticket, unit, now, now, discarded=True)
            if dropped and self._running is None:  # else the running unit's end says so
                self._finished_seq = dropped[-1][1].seq
            self._cond.notify_all()
        return len(dropped)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=60)

    def _work(self) -> None:
        if self.setup is not None:
            try:
                self.setup()
            except Exception as exc:  # noqa: BLE001 - the units still run, on defaults
                self.setup_error = exc
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._queue or self._closed)
                if not self._queue:
                    return  # closed, and nothing left
                unit, ticket = self._queue.popleft()
                self._running = ticket
            if ticket.share != self._share and self.apply_share is not None:
                try:
                    self.apply_share(ticket.share)
                except Exception:  # noqa: BLE001 - a share not applied: the unit runs anyway
                    pass
                self._share = ticket.share
            completion = _execute(unit, ticket, self.clock)
            with self._cond:
                self._done[ticket.seq] = completion
                self._running = None
                # units discarded behind it were handed back already: the fence covers them
                last = self._queue[0][1].seq - 1 if self._queue else self.submitted
                self._finished_seq = max(ticket.seq, last)
                self._cond.notify_all()


def _execute(unit: Unit, ticket: Ticket, clock: Callable[[], float]) -> Completion:
    started = clock()
    try:
        result = unit.run()
    except BaseException as exc:  # noqa: BLE001 - handed back to the loop, which decides
        return Completion(ticket, unit, started, clock(), error=exc)
    return Completion(ticket, unit, started, clock(), result=result)


def make_executor(kind: ExecutorKind, **kwargs: Any) -> Executor:
    """A backend by name (:data:`EXECUTORS`); ``cuda`` is the GPU issue's to fill in."""
    cls = EXECUTORS.get(kind)
    if cls is None:
        raise ValueError(f"the {kind} executor is not built yet")
    return cls(**kwargs)


EXECUTORS: dict[ExecutorKind, type[Executor]] = {
    ExecutorKind.INLINE: InlineExecutor,
    ExecutorKind.CPU_CONCURRENT: ThreadExecutor,
}
