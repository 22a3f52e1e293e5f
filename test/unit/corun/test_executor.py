"""The executors with timed fake units: what the co-run loop relies on (``corun/executor.py``)."""

from __future__ import annotations

import threading
import time

import pytest

from sglang_harli.config import ExecutorKind
from sglang_harli.corun.executor import (
    ExecutorFull,
    InlineExecutor,
    Share,
    ThreadExecutor,
    make_executor,
)


class Sleep:
    """A unit that takes ``seconds`` and records where and with which share it ran."""

    def __init__(self, seconds: float, log: list, name: str = "", kind: str = "forward"):
        self.seconds, self.log, self.name, self.kind, self.cost = seconds, log, name, kind, 1.0

    def run(self):
        self.log.append(("start", self.name, threading.current_thread().name))
        time.sleep(self.seconds)
        self.log.append(("end", self.name))
        return self.name


class Gate:
    """A unit that runs until released."""

    kind, cost = "backward", 2.0

    def __init__(self):
        self.started, self.release = threading.Event(), threading.Event()

    def run(self):
        self.started.set()
        assert self.release.wait(10)
        return "gate"


def wait_done(executor, n: int, timeout_s: float = 10.0) -> list:
    done, deadline = [], time.monotonic() + timeout_s
    while len(done) < n and time.monotonic() < deadline:
        done += executor.poll()
        time.sleep(0.001)
    return done


@pytest.fixture
def worker():
    shares: list = []
    executor = ThreadExecutor(max_inflight=3, apply_share=shares.append)
    executor.shares_applied = shares
    yield executor
    executor.close()


def test_inline_runs_at_submit_on_the_callers_thread():
    log: list = []
    executor = InlineExecutor()
    executor.submit(Sleep(0.01, log, "a"), Share(1.0))
    assert log == [("start", "a", threading.current_thread().name), ("end", "a")]
    with pytest.raises(ExecutorFull):  # one in flight until polled
        executor.submit(Sleep(0, log), Share(1.0))
    (done,) = executor.poll()
    assert done.result == "a" and done.seconds >= 0.01 and executor.last_fence().done()


def test_the_worker_runs_units_beside_the_caller_without_blocking_it(worker):
    log: list = []
    began = time.perf_counter()
    worker.submit(Sleep(0.2, log, "a"), Share(1.0))
    assert time.perf_counter() - began < 0.05  # submit does not wait for the unit
    assert worker.poll() == []  # poll never blocks: nothing finished yet
    (done,) = wait_done(worker, 1)
    assert done.result == "a" and done.seconds >= 0.2
    assert log[0][2] == "harli-finetune"  # on the worker, not here


def test_at_most_max_inflight_units(worker):
    gates = [Gate() for _ in range(3)]
    for gate in gates:
        worker.submit(gate, Share(1.0))
    assert worker.inflight == 3 and not worker.can_submit()
    with pytest.raises(ExecutorFull):
        worker.submit(Gate(), Share(1.0))
    for gate in gates:
        gate.release.set()
    assert len(wait_done(worker, 3)) == 3
    assert worker.inflight == 0 and worker.can_submit()


def test_completions_come_back_in_submission_order(worker):
    log: list = []
    for i, seconds in enumerate((0.03, 0.0, 0.01)):
        worker.submit(Sleep(seconds, log, str(i)), Share(1.0))
    done = wait_done(worker, 3)
    assert [c.result for c in done] == ["0", "1", "2"]
    assert [c.ticket.seq for c in done] == [1, 2, 3]
    assert all(a.ended <= b.started for a, b in zip(done, done[1:], strict=False))


def test_a_new_share_takes_effect_at_the_next_unit_submitted(worker):
    log: list = []
    gate = Gate()
    worker.submit(gate, Share(1.0))
    assert gate.started.wait(5)
    worker.submit(Sleep(0, log, "half"), Share(0.5))  # planned while the first still runs
    assert worker.shares_applied == [Share(1.0)]  # the running unit keeps its share
    assert worker.poll() == []  # nothing done yet: poll returns at once
    gate.release.set()
    wait_done(worker, 2)
    assert worker.shares_applied == [Share(1.0), Share(0.5)]
    worker.submit(Sleep(0, log, "same"), Share(0.5))
    wait_done(worker, 1)
    assert worker.shares_applied == [Share(1.0), Share(0.5)]  # applied only when it changes


def test_cancel_with_units_in_flight_drops_the_queued_and_lets_the_running_finish(worker):
    log: list = []
    gate = Gate()
    worker.submit(gate, Share(1.0))
    assert gate.started.wait(5)
    worker.submit(Sleep(0, log, "queued 1"), Share(1.0))
    worker.submit(Sleep(0, log, "queued 2"), Share(1.0))
    assert worker.discard_queued() == 2
    fence = worker.last_fence()
    assert not fence.done()  # the running unit still holds what it was given
    gate.release.set()
    assert fence.wait(5)
    done = wait_done(worker, 3)
    # in submission order: the dropped ones come back behind the one that ran
    assert [(c.result, c.discarded) for c in done] == [("gate", False), (None, True), (None, True)]
    assert log == []  # the dropped units never ran


def test_pause_drains_the_units_in_flight(worker):
    log: list = []
    for i in range(3):
        worker.submit(Sleep(0.02, log, str(i)), Share(1.0))
    done = worker.drain(timeout=5)
    assert [c.result for c in done] == ["0", "1", "2"] and worker.inflight == 0
    assert worker.last_fence().done()


def test_the_fence_holds_a_revoked_lease_until_the_units_using_it_finish(worker):
    """What the KV lender does before a lent slot goes back to decode: wait on the fence. A
    lease revoked while units that write into it are queued is freed only after they ran."""
    lent = bytearray(8)  # stands for lent KV slots
    freed_at: list = []

    class Write:
        kind, cost = "forward", 1.0

        def __init__(self, i):
            self.i = i

        def run(self):
            time.sleep(0.02)
            lent[self.i] = 1  # the unit writes its activations into the lease
            return time.perf_counter()

    for i in range(3):
        worker.submit(Write(i), Share(1.0))
    fence = worker.last_fence()  # the lender's give-back, while the units are queued
    assert fence.wait(5)
    freed_at.append(time.perf_counter())
    done = wait_done(worker, 3)
    assert all(c.result <= freed_at[0] for c in done)  # every write before the give-back
    assert lent[:3] == bytearray([1, 1, 1])


def test_a_unit_that_raises_is_handed_back_with_its_error(worker):
    class Boom:
        kind, cost = "forward", 1.0

        def run(self):
            raise MemoryError("no room")

    worker.submit(Boom(), Share(1.0))
    (done,) = wait_done(worker, 1)
    assert isinstance(done.error, MemoryError) and done.result is None


def test_registry_and_shares():
    assert isinstance(make_executor(ExecutorKind.INLINE), InlineExecutor)
    with pytest.raises(ValueError, match="not built yet"):
        make_executor(ExecutorKind.CUDA)
    assert Share(0.5).workers(4) == 2 and Share(0.1).workers(4) == 1 and Share(0).workers(4) == 0
    with pytest.raises(ValueError):
        Share(1.5)
