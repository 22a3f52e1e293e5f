"""The co-run loop (CoRun) driven like the scheduler drives it, on a fake clock and runner."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterable, Iterator

import pytest

from sglang_harli.corun.controller import QUANTILE_LEVELS, CoRun
from sglang_harli.corun.executor import Share, ThreadExecutor
from sglang_harli.corun.policy import HarliPolicy, IdleOnlyPolicy, NaivePolicy, TimeSlicedPolicy
from sglang_harli.corun.predictor import Predictor
from sglang_harli.corun.stats import DecodeStats

from .helpers import (
    TRUE_UNITS,
    fitted_predictor,
    flat_predictor,
    linear,
    random_shapes,
    unit_seconds,
)

S = 0.010
A, B, C, D, E = (DecodeStats(b, 100 * b, 100) for b in (1, 2, 3, 4, 5))


class Clock:
    """Fake time: stands still until the test (or the fake runner) advances it."""

    def __init__(self, start: float = 0.0):
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class ListClock:
    """Fake time read from a list, one value per call (the last one repeats)."""

    def __init__(self, ticks: Iterable[float]):
        self.ticks = list(ticks)

    def __call__(self) -> float:
        return self.ticks.pop(0) if len(self.ticks) > 1 else self.ticks[0]


class FakeUnit:
    def __init__(self, runner: FakeRunner, kind: str, cost: float, seconds: float):
        self.runner, self.kind, self.cost, self.seconds = runner, kind, cost, seconds

    def run(self) -> None:
        runner = self.runner
        runner.clock.advance(self.seconds)
        runner.tokens_trained += runner.tokens_per_unit
        runner.next = next(runner.units, None)


class FakeRunner:
    """A source of units (``jobs.runner.JobRunner``'s contract) whose units advance the fake
    clock by their durations; done when they run out. ``asked`` records the admission
    questions the loop put to its policy (``spent_s``, kind, cost), when :func:`asking` wraps
    it."""

    def __init__(self, clock: Clock, units: Iterable[tuple[str, float, float]], tokens=10):
        self.clock = clock
        self.units: Iterator[tuple[str, float, float]] = iter(units)
        self.next = next(self.units, None)
        self.tokens_per_unit = tokens
        self.tokens_trained = 0
        self.issued = 0
        self.in_flight = 0
        self.asked: list[tuple[float, str, float]] = []

    @property
    def done(self) -> bool:
        return self.next is None

    def signal(self) -> str:
        return "run"

    def next_unit(self) -> FakeUnit | None:
        return None if self.next is None else FakeUnit(self, *self.next)

    def issue(self, unit) -> None:
        self.issued += 1

    def complete(self, unit, result, error, dropped=False) -> None:
        if error is not None:
            raise error

    def stop(self, signal) -> None:
        raise AssertionError(signal)

    def fail(self, exc) -> None:
        raise exc


def asking(corun: CoRun, runner: FakeRunner) -> FakeRunner:
    """Record in ``runner.asked`` every admission the loop asks of ``corun``'s policy."""
    admit = corun.policy.admit

    def recorded(plan, spent_s, kind, cost, elapsed_s=None):
        runner.asked.append((spent_s, kind, cost))
        return admit(plan, spent_s, kind, cost, elapsed_s)

    corun.policy.admit = recorded
    return runner


def forever(kind: str = "forward", cost: float = 1e6, seconds: float = 0.003):
    while True:
        yield kind, cost, seconds


def sliced(clock: Clock, budget_s: float = 0.004) -> CoRun:
    return CoRun(TimeSlicedPolicy(S, 0.005, Predictor(), budget_s), clock=clock)


# --- what an iteration is ----------------------------------------------------------------------


def test_an_iteration_runs_from_one_before_decode_to_the_next():
    """Decode (5 ms) plus the finetune run after it (two 3 ms units in a 4 ms slice) = 11 ms."""
    clock = Clock()
    corun = sliced(clock)
    runner = asking(corun, FakeRunner(clock, forever()))

    corun.before_decode(A)
    clock.advance(0.005)
    assert corun.after_decode(runner) is True
    assert corun.stats.iterations == 0  # not measured until the next decode starts
    clock.advance(0.0005)  # SGLang's loop before the next run_batch
    corun.before_decode(B)

    assert corun.stats.iterations == 1
    assert corun.stats.last_iteration_ms == pytest.approx(11.5)
    assert corun.stats.finetune_s == pytest.approx(0.006)
    assert [(round(spent, 6), kind) for spent, kind, _ in runner.asked] == [
        (0.0, "forward"),
        (0.003, "forward"),
        (0.006, "forward"),  # refused: the slice is spent
    ]
    assert corun.samples()["decode"][0]["seconds"] == pytest.approx(0.0055)  # without finetune


@pytest.mark.parametrize("between", ["interrupt", "idle"])
def test_a_prefill_or_idle_pass_drops_the_open_iteration(between):
    """An interval with a prefill (interrupt) or an idle pass in it is not measured."""
    clock = Clock()
    corun, runner = sliced(clock), FakeRunner(clock, forever())

    corun.before_decode(A)
    clock.advance(0.005)
    corun.after_decode(runner)
    if between == "interrupt":
        corun.interrupt()
    else:
        assert corun.idle(runner) is True
    clock.advance(0.050)  # the prefill / idle work
    corun.before_decode(B)
    clock.advance(0.002)
    corun.before_decode(C)

    assert corun.stats.iterations == 1  # only B -> C
    assert corun.stats.last_iteration_ms == pytest.approx(2.0)
    assert list(corun.stats.measured_ms.values) == [pytest.approx(2.0)]


def test_idle_trains_a_quantum_and_learns_unit_durations():
    """No decode: units run while less than idle_quantum_s is spent; their durations are learned
    (the predictor knows the kind afterwards) and their tokens counted."""
    clock = Clock()
    corun, runner = sliced(clock), FakeRunner(clock, forever(seconds=0.002))
    assert corun.policy.predictor.unit("forward", 1e6) is None

    assert corun.idle(runner) is True
    assert clock() == pytest.approx(0.006)  # 0, 2, 4 ms < 5 ms quantum: three units
    assert corun.policy.predictor.unit("forward", 1e6) == pytest.approx(0.002)
    assert corun.stats.finetune_tokens == 30
    assert corun.stats.iterations == 0


def test_the_schedulers_time_between_idle_quanta_is_measured_for_profiles():
    """Between two idle passes (each: an interrupt, then a quantum) the scheduler's own time is
    an idle gap; a prefill or a decode in between is not."""
    clock = Clock()
    corun, runner = sliced(clock), FakeRunner(clock, forever(seconds=0.002))

    def idle_pass():
        corun.interrupt()
        corun.idle(runner)

    idle_pass()
    clock.advance(0.020)  # SGLang's loop, lending...
    idle_pass()
    clock.advance(0.030)
    idle_pass()
    clock.advance(0.040)
    corun.interrupt()  # a prefill
    idle_pass()
    clock.advance(0.050)
    corun.before_decode(A)
    clock.advance(0.004)
    idle_pass()

    gap = corun.samples()["idle_gap"]
    assert gap["n"] == 2
    assert gap["quantiles"][0] == pytest.approx(0.020)
    assert gap["quantiles"][-1] == pytest.approx(0.030)
    never_idle = CoRun(IdleOnlyPolicy(S, 0.005, Predictor()))
    assert never_idle.samples()["idle_gap"] == {"seconds": None, "quantiles": None, "n": 0}


def test_prefills_of_requests_that_find_the_server_idle_are_measured_for_profiles():
    """From the first interrupt after an idle quantum or a decode (the prefill's run_batch) to
    the next decode, with the requests and prompt tokens the batch gained (seq lens less the
    first token, and the token the older requests decoded)."""
    clock = Clock()
    corun, runner = sliced(clock), FakeRunner(clock, forever(seconds=0.002))
    corun.interrupt()  # the scheduler's idle pass
    corun.idle(runner)
    clock.advance(0.001)
    corun.interrupt()  # a prefill of two 100-token prompts
    clock.advance(0.300)
    corun.before_decode(DecodeStats(2, 2 * 101, 101))
    clock.advance(0.005)
    corun.interrupt()  # a prefill joining the running batch
    clock.advance(0.200)
    corun.before_decode(DecodeStats(3, 2 * 102 + 51, 102))
    clock.advance(0.005)
    corun.before_decode(DecodeStats(2, 2 * 103, 103))  # one left: no prefill
    clock.advance(0.005)
    corun.interrupt()  # one left and one joined: not measured
    clock.advance(0.100)
    corun.before_decode(DecodeStats(2, 104 + 31, 104))

    assert corun.samples()["prefill"] == [
        {"batch_size": 2, "tokens": 200, "seconds": pytest.approx(0.300)},
        {"batch_size": 1, "tokens": 50, "seconds": pytest.approx(0.200)},
    ]


def test_after_decode_reports_when_the_runner_is_done():
    clock = Clock()
    corun = sliced(clock, budget_s=1.0)
    corun.before_decode(A)
    assert corun.after_decode(FakeRunner(clock, [("forward", 1e6, 0.001)])) is False
    assert corun.after_decode(None) is False  # no runner: nothing to run


def test_no_finetune_runs_when_the_plan_gives_none():
    clock = Clock()
    corun = CoRun(IdleOnlyPolicy(S, 0.005, fitted_predictor()), clock=clock)
    runner = FakeRunner(clock, forever())

    corun.before_decode(A)
    assert corun.after_decode(runner) is True
    assert runner.issued == 0
    assert corun.stats.planned_finetune == 0


# --- the counters ----------------------------------------------------------------------------


def scripted() -> tuple[CoRun, FakeRunner]:
    """Five decodes with a 10 ms objective and a 4 ms slice of 3 ms units:
    A: 5 ms decode + 6 ms finetune (a miss), B: 4 ms (no runner), C: interrupted by a prefill,
    D: 3 ms, E: still open."""
    clock = Clock()
    corun, runner = sliced(clock), FakeRunner(clock, forever())
    corun.before_decode(A)
    clock.advance(0.005)
    corun.after_decode(runner)
    corun.before_decode(B)
    clock.advance(0.004)
    corun.after_decode(None)
    corun.before_decode(C)
    corun.interrupt()
    clock.advance(0.020)
    corun.before_decode(D)
    clock.advance(0.003)
    corun.before_decode(E)
    return corun, runner


def test_stats_counters_on_a_scripted_sequence():
    corun, _ = scripted()
    report = corun.to_dict()

    assert report["iterations"] == 3  # A, B, D
    assert report["within_slo"] == 2  # B, D
    assert report["slo_attainment"] == pytest.approx(2 / 3)
    assert report["finetune_s"] == pytest.approx(0.006)
    assert report["slack_s"] == pytest.approx(0.005 + 0.006 + 0.007)  # S - decode, each
    assert report["slack_used"] == pytest.approx(0.006 / 0.018)
    assert report["finetune_tokens"] == 20
    assert report["planned_finetune"] == 5  # every before_decode of the time-sliced mode
    assert report["iteration_ms"]["last"] == pytest.approx(3.0)
    assert list(corun.stats.measured_ms.values) == pytest.approx([11.0, 4.0, 3.0])
    assert report["last_plan"] == {
        "budget_ms": 4.0,
        "predicted_decode_ms": None,
        "reason": "fixed slice",
    }


def test_samples_give_decode_shapes_and_unit_medians():
    corun, _ = scripted()
    samples = corun.samples()

    assert [(r["batch_size"], r["seq_lens_sum"], r["seq_len_max"]) for r in samples["decode"]] == [
        (1, 100, 100),
        (2, 200, 100),
        (4, 400, 100),
    ]
    assert [r["seconds"] for r in samples["decode"]] == pytest.approx([0.005, 0.004, 0.003])
    assert samples["units"] == [
        {
            "kind": "forward",
            "cost": 1e6,
            "seconds": pytest.approx(0.003),
            "quantiles": pytest.approx([0.003] * len(QUANTILE_LEVELS)),
            "n": 2,
        }
    ]
    assert len(samples["corun"]) == 1
    assert samples["corun"][0]["batch_size"] == 1
    assert samples["corun"][0]["units"] == [("forward", 1e6), ("forward", 1e6)]
    assert samples["corun"][0]["seconds"] == pytest.approx(0.011)


def test_decode_sample_medians_per_shape():
    clock = Clock()
    corun = CoRun(IdleOnlyPolicy(S, 0.005, Predictor()), clock=clock)
    for seconds in (0.004, 0.009, 0.005, 0.005, 0.001):
        corun.before_decode(A)
        clock.advance(seconds)
    corun.before_decode(B)

    samples = corun.samples()
    (row,) = [r for r in samples["decode"] if r["batch_size"] == 1]
    assert (row["seconds"], row["n"]) == (pytest.approx(0.005), 5)
    # the spread, nearest-rank at each level: what the fleet simulation draws from
    assert samples["quantile_levels"] == list(QUANTILE_LEVELS)
    spread = dict(zip(QUANTILE_LEVELS, row["quantiles"], strict=True))
    assert spread[0.0] == pytest.approx(0.001)
    assert spread[0.25] == pytest.approx(0.004)
    assert spread[0.5] == pytest.approx(0.005)
    assert spread[1.0] == pytest.approx(0.009)


def test_policy_overhead_gets_one_sample_per_before_decode():
    """Each before_decode adds the time spent planning to policy_us (here 2 us, then 3 us);
    the iteration itself is measured from where each before_decode began."""
    clock = ListClock([1.0, 1.000002, 1.010, 1.010003])
    corun = CoRun(IdleOnlyPolicy(S, 0.005, Predictor()), clock=clock)

    corun.before_decode(A)
    assert list(corun.stats.policy_us.values) == [pytest.approx(2.0)]
    corun.before_decode(B)

    assert list(corun.stats.policy_us.values) == [pytest.approx(2.0), pytest.approx(3.0)]
    assert corun.stats.last_iteration_ms == pytest.approx(10.0)
    assert corun.to_dict()["policy_us"]["p99"] == pytest.approx(3.0)


# --- the QoS policy in the loop --------------------------------------------------------------


def harli_loop(iterations: int, seed: int = 0, slower: float = 1.0):
    """The scheduler's loop with a pre-fitted predictor: decode (at most 4.4 ms) takes what stage
    1 predicts, every unit (0.05-3.3 ms as profiled) ``slower`` times what its rate predicts.
    Returns the loop and, per measured iteration, the finetune milliseconds in it."""
    rng = random.Random(seed)
    kinds = sorted(TRUE_UNITS)

    def units():
        while True:
            kind, cost = rng.choice(kinds), rng.uniform(1e5, 1.5e6)
            yield kind, cost, slower * unit_seconds(kind, cost)

    clock = Clock()
    corun = CoRun(HarliPolicy(S, 0.005, fitted_predictor(), margin=0.1), clock=clock)
    runner = FakeRunner(clock, units())
    shapes = random_shapes(seed + 1, iterations, max_batch=4, max_len=512)
    for stats in shapes:
        corun.before_decode(stats)
        clock.advance(linear(stats))
        corun.after_decode(runner)
    measured = list(corun.stats.measured_ms.values)
    finetune_ms = [t - linear(s) * 1e3 for t, s in zip(measured, shapes, strict=False)]
    return corun, finetune_ms


def test_harli_never_pushes_an_iteration_over_the_objective_when_units_take_as_predicted():
    corun, finetune_ms = harli_loop(300)
    report = corun.to_dict()

    assert report["iterations"] == 299
    assert report["within_slo"] == 299
    assert max(corun.stats.measured_ms.values) <= S * 1e3 * (1 - 0.1) + 1e-9
    assert report["finetune_s"] > 0.5 * report["slack_s"]  # and it did use the slack
    assert sum(ms > 0 for ms in finetune_ms) > 250  # in nearly every iteration
    assert report["planned_finetune"] == 300
    assert report["prediction_error"]["mean"] < 1e-6  # stage 2 as planned = as measured
    assert report["policy"]["misses"] == 0


def test_harli_backs_off_and_recovers_when_units_take_longer_than_predicted():
    """Units 2x slower than the profile: the first slow units correct the rates (and their
    spread) online, so at most a few early iterations overrun; the last 100 iterations keep
    the objective while finetune still runs in most of them."""
    corun, finetune_ms = harli_loop(400, seed=2, slower=2.0)
    report = corun.to_dict()

    assert report["policy"]["misses"] <= 3
    assert max(list(corun.stats.measured_ms.values)[-100:]) <= S * 1e3
    assert sum(ms > 0 for ms in finetune_ms[-100:]) > 80


def test_a_probe_unit_leaves_the_iteration_without_a_stage2_prediction():
    """A kind the predictor never saw runs as a probe; that iteration has no prediction (its
    error is not recorded), the next one does once the kind is learned."""
    clock = Clock()
    predictor = fitted_predictor()
    corun = CoRun(HarliPolicy(0.050, 0.005, predictor, margin=0.0), clock=clock)
    runner = FakeRunner(clock, [("validation", 1e6, 0.004)] + [("forward", 1e6, 0.0012)] * 3)

    corun.before_decode(A)
    clock.advance(linear(A))
    corun.after_decode(runner)
    corun.before_decode(A)
    assert len(corun.stats.prediction_error.values) == 0
    assert predictor.unit("validation", 1e6) == pytest.approx(0.004)

    clock.advance(linear(A))
    corun.after_decode(runner)
    corun.before_decode(A)
    assert len(corun.stats.prediction_error.values) == 1


# --- a share beside decode: units on a concurrent worker ---------------------------------------


class SleepUnit:
    def __init__(self, runner: SleepRunner, seconds: float, kind: str = "forward"):
        self.runner, self.kind, self.cost, self.seconds = runner, kind, 1e6, seconds

    def run(self):
        self.runner.threads.add(threading.current_thread().name)
        time.sleep(self.seconds)
        return self


class SleepRunner:
    """A source of units that sleep (real time: they run on the worker), issued ahead freely."""

    def __init__(self, seconds: float = 0.004, kind: str = "forward"):
        self.seconds, self.kind, self.tokens_trained, self.done = seconds, kind, 0, False
        self.issued: list = []
        self.completed: list = []
        self.threads: set[str] = set()

    @property
    def in_flight(self) -> int:
        return len(self.issued) - len(self.completed)

    def signal(self) -> str:
        return "run"

    def next_unit(self):
        return SleepUnit(self, self.seconds, self.kind)

    def issue(self, unit) -> None:
        self.issued.append(unit)

    def complete(self, unit, result, error, dropped=False) -> None:
        assert unit is self.issued[len(self.completed)]  # in issue order
        self.completed.append(unit)
        self.tokens_trained += 10


def test_a_share_plan_runs_units_beside_the_decode_and_teaches_stage_2():
    worker = ThreadExecutor(max_inflight=2)
    predictor = fitted_predictor()
    policy = HarliPolicy(1.0, 0.005, predictor, 0.05, shares=(1.0,))
    corun, runner = CoRun(policy, worker=worker), SleepRunner()
    try:
        for _ in range(20):
            corun.before_decode(A)
            assert corun.beside_decode(runner)
            assert worker.inflight == 2  # submitted before the decode, at the planned share
            time.sleep(0.005)  # the decode, while the worker runs them
            assert corun.after_decode(runner)
        corun.before_decode(A)  # closes the last iteration
    finally:
        worker.close()
    assert runner.threads == {"harli-finetune"} and len(runner.completed) >= 10
    stats = corun.stats
    assert stats.corun_units == len(runner.completed) and stats.finetune_tokens > 0
    assert stats.finetune_s > 0  # the units' time beside decode is the slack they used
    # iterations with units in flight taught stage 2 (at share 1.0), not stage 1
    assert predictor.interference.factor_at(1.0) is not None
    assert corun.to_dict()["executor"]["kind"] == "cpu-concurrent"


def test_after_a_switch_to_slices_the_workers_units_come_back_before_any_runs_inline():
    worker = ThreadExecutor(max_inflight=2)
    policy = NaivePolicy(1.0, 0.005, fitted_predictor())
    corun, runner = CoRun(policy, worker=worker), SleepRunner(seconds=0.05)
    try:
        corun.before_decode(A)
        corun.beside_decode(runner)
        assert worker.inflight == 2
        corun.set_policy(TimeSlicedPolicy(1.0, 0.005, fitted_predictor(), 0.01))
        corun.before_decode(A)
        assert corun.after_decode(runner)  # the worker is busy: nothing runs here yet
        assert threading.current_thread().name not in runner.threads
        assert len(runner.issued) == 2
        deadline = time.monotonic() + 5
        while worker.inflight and time.monotonic() < deadline:
            corun.before_decode(A)
            corun.after_decode(runner)
            time.sleep(0.01)
        corun.before_decode(A)
        corun.after_decode(runner)  # now the slice runs its units here
    finally:
        worker.close()
    assert threading.current_thread().name in runner.threads
    assert len(runner.completed) == len(runner.issued) > 2


def test_the_worker_holds_about_one_iteration_of_work_by_the_units_measured_durations():
    """Units are queued by their time, not by count: one at a time until the worker has measured
    their kind, then about the objective's worth (a decode iteration at most), so the worker does
    not starve between hooks and a new plan takes effect within about one iteration."""
    worker = ThreadExecutor(max_inflight=64)
    objective_s, unit_s, decode_s = 0.05, 0.004, 0.02
    policy = HarliPolicy(objective_s, 0.005, flat_predictor(decode_s), 0.05, shares=(1.0,))
    corun, runner = CoRun(policy, worker=worker), SleepRunner(seconds=unit_s, kind="sleep")
    try:
        corun.before_decode(A)
        corun.beside_decode(runner)
        assert worker.inflight == 1  # its kind never ran on the worker: the whole horizon
        corun.drain(runner, 5)
        queued = []
        for _ in range(6):
            corun.before_decode(A)
            corun.beside_decode(runner)
            queued.append(worker.inflight)
            time.sleep(decode_s)
            corun.after_decode(runner)
        corun.drain(runner, 5)
    finally:
        worker.close()
    # about objective / unit = 12 units (a sleep lasts a little longer than asked), never 64
    assert max(queued) <= objective_s / unit_s + 1
    assert min(queued) >= 0.5 * objective_s / unit_s, queued


def test_idle_quanta_give_the_worker_the_whole_device_and_decode_gives_it_back():
    """With nothing decoding, the worker's units may use decode's cores too (an idle share);
    beside a decode they run on the planned share of the spare ones again."""
    applied: list[Share] = []
    worker = ThreadExecutor(max_inflight=64, apply_share=applied.append)
    policy = HarliPolicy(0.05, 0.02, flat_predictor(0.01), 0.05, shares=(1.0,))
    corun, runner = CoRun(policy, worker=worker), SleepRunner(seconds=0.002, kind="sleep")
    try:
        assert corun.idle(runner)
        corun.drain(runner, 5)
        assert applied == [Share(1.0, idle=True)]
        corun.before_decode(A)
        corun.beside_decode(runner)
        corun.drain(runner, 5)
    finally:
        worker.close()
    assert applied == [Share(1.0, idle=True), Share(1.0)]
    assert len(runner.completed) >= 2
