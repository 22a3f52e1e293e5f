"""One simulated decode instance: SGLang-like continuous batching with the server's own co-run
loop (``corun/controller.py``) and policy (``corun/policy.py``) on a simulated clock.

The scheduler loop, as SGLang's (CPU, no overlap) runs it:

- requests that arrived wait; when any wait, the next batch is a prefill of all of them (up to
  ``max_prefill_tokens``), whose end is each one's first token; the decode batch waits for it;
- otherwise the running requests decode one token each: ``CoRun.before_decode`` plans, the
  forward runs, ``CoRun.after_decode`` runs the planned finetune units (the server's admission
  decides each one, on the clock), then SGLang's tail; the tokens reach the clients there;
- with nothing to run, the job trains in idle quanta (``CoRun.idle``) until a request is there;
  a request arriving inside a quantum waits for its end. Mode ``off`` has no co-run loop and no
  job: the clock jumps to the next arrival.

Durations come from :class:`~.machine.Machine` (medians with the profile's spread; the
scheduler's own time between idle quanta). The policy starts from the profile (as a server given
``--harli-profile``) or learns online (as one without), and learns online either way from what
the simulated clock measures, exactly as on a server; the job's first step is trained before
the trace starts (as a replay's server has), so the predictor knows every kind of unit.

Bookkeeping is O(1) per decode iteration (the batch's context sum and maximum are kept, not
recomputed; a request's gaps are checked against the objective through a shared miss counter),
and long idle gaps train whole quanta in bulk (the predictor shown only their latest units of
each kind) except for their last quanta, so that hours of traffic simulate in seconds.
"""

from __future__ import annotations

import collections
import dataclasses
import heapq
import math
from collections.abc import Callable, Sequence

import numpy as np

from sglang_harli.bench.job_shape import JobShape, Unit
from sglang_harli.bench.machine import Draws, Machine
from sglang_harli.bench.trace import TraceRequest
from sglang_harli.config import Mode
from sglang_harli.corun.controller import CoRun
from sglang_harli.corun.objective import Objective
from sglang_harli.corun.policy import make_policy
from sglang_harli.corun.predictor import Predictor
from sglang_harli.corun.stats import DecodeStats

# Idle gaps longer than this many quanta train in bulk up to the last LEARN_QUANTA quanta,
# which run through the co-run loop (the predictor learns the units' durations from them, as a
# server does before the next request)
BULK_QUANTA = 4
LEARN_QUANTA = 2
BULK_OBSERVED = 8  # of each kind of unit a bulk idle period ran, the last ones are learned from


@dataclasses.dataclass(frozen=True)
class InstanceConfig:
    """One simulated server's settings (the ``--harli-*`` flags that matter here)."""

    mode: Mode
    objective_s: float
    margin: float
    budget_s: float  # time-sliced: the slice
    idle_quantum_s: float
    start_from_profile: bool = False  # the server was given --harli-profile
    max_prefill_tokens: int = 16384  # SGLang's default
    seed: int = 0
    # decode and prefill durations relative to the profile's (measured on a harli server):
    # plain SGLang (off) runs without the LoRA serving Harli mode turns on, and faster
    sglang_speed: float = 1.0


class Histogram:
    """Log-spaced counts of durations (1 us .. 1000 s, 1.2% wide bins): percentiles of
    millions of gaps without keeping them."""

    LO, PER_DECADE, DECADES = 1e-6, 200, 9

    def __init__(self) -> None:
        self.counts = [0] * (self.PER_DECADE * self.DECADES + 1)
        self.total = 0

    def add(self, seconds: float, weight: int = 1) -> None:
        if seconds <= self.LO:
            i = 0
        else:
            i = min(int(math.log10(seconds / self.LO) * self.PER_DECADE), len(self.counts) - 1)
        self.counts[i] += weight
        self.total += weight

    def merge(self, other: Histogram) -> None:
        self.counts = [a + b for a, b in zip(self.counts, other.counts, strict=True)]
        self.total += other.total

    def quantile(self, q: float) -> float | None:
        """The ``q`` quantile (nearest rank; the bin's geometric middle), None if empty."""
        if not self.total:
            return None
        rank = min(int(q * self.total), self.total - 1)
        seen = 0
        for i, count in enumerate(self.counts):
            seen += count
            if seen > rank:
                return self.LO * 10 ** ((i + 0.5) / self.PER_DECADE)
        return None


@dataclasses.dataclass
class InstanceResult:
    """What one instance (or, merged, a fleet) did; counters add up across instances."""

    simulated_s: float = 0.0
    iterations: int = 0  # decode iterations the co-run loop measured (as the server's status)
    within_slo: int = 0
    misses_with_finetune: int = 0
    decode_iterations: int = 0  # all of them, measured or not
    gaps: Histogram = dataclasses.field(default_factory=Histogram)  # every gap a client saw
    gaps_within: int = 0
    ttft: Histogram = dataclasses.field(default_factory=Histogram)
    requests: int = 0
    requests_completed: int = 0
    requests_within: int = 0  # completed requests whose every gap met the objective
    finetune_tokens: int = 0
    finetune_steps: int = 0
    finetune_s: float = 0.0  # finetune time inside measured iterations
    slack_s: float = 0.0
    idle_s: float = 0.0  # time in idle passes (quanta, or nothing to do)

    def merge(self, other: InstanceResult) -> None:
        for field in dataclasses.fields(self):
            mine = getattr(self, field.name)
            if isinstance(mine, Histogram):
                mine.merge(getattr(other, field.name))
            else:
                setattr(self, field.name, mine + getattr(other, field.name))


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class _SimUnit:
    """One unit of a simulated job: running it moves the clock by its drawn duration."""

    __slots__ = ("kind", "cost", "job", "median", "draw")

    def __init__(self, kind: str, cost: float, job: SimJob, median: float, draw: Draws):
        self.kind, self.cost, self.job, self.median, self.draw = kind, cost, job, median, draw

    def run(self) -> None:
        self.job.clock.now += self.median * self.draw()
        self.job._advance(self.kind)


class SimJob:
    """A job runner on the simulated clock (``controller.Runner``): its units, one at a time,
    each admitted by the caller before it starts, each lasting a draw of the machine."""

    def __init__(self, shape: JobShape, machine: Machine, clock: _Clock, seed: int):
        self.clock = clock
        self.tokens_trained = 0
        self.steps_done = 0
        self._machine = machine
        self._rng = np.random.default_rng([seed, 1])
        self._steps = shape.steps(seed)
        self._pending: collections.deque[tuple[tuple[Unit, ...], int]] = collections.deque()
        self._draws: dict[str, Draws] = {}
        self._kinds: dict[str, int] = {}  # kind -> index, for the bulk draws
        # per step (by identity: JobShape.steps hands out one tuple per distinct step):
        # [(kind, cost, median, draw)], and the same as arrays (medians, kind indices, costs)
        self._compiled: dict[int, list[tuple[str, float, float, Draws]]] = {}
        self._arrays: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self._raw: tuple[Unit, ...] = ()
        self._units: list[tuple[str, float, float, Draws]] = []
        self._targets = 0
        self._pos = 0
        self._next_step()

    def _next_step(self) -> None:
        self._raw, self._targets = self._pending.popleft() if self._pending else next(self._steps)
        self._units = self._compile(self._raw)
        self._pos = 0

    def _compile(self, raw: tuple[Unit, ...]) -> list[tuple[str, float, float, Draws]]:
        compiled = self._compiled.get(id(raw))
        if compiled is None:
            compiled = []
            for kind, cost in raw:
                if kind not in self._draws:
                    self._draws[kind] = self._machine.unit_draws(kind, self._rng)
                    self._kinds[kind] = len(self._kinds)
                compiled.append((kind, cost, self._machine.unit_s(kind, cost), self._draws[kind]))
            self._compiled[id(raw)] = compiled
            self._arrays[id(raw)] = (
                np.array([median for _, _, median, _ in compiled]),
                np.array([self._kinds[kind] for kind, _, _, _ in compiled]),
                np.array([cost for _, cost, _, _ in compiled]),
            )
        return compiled

    def _advance(self, kind: str) -> None:
        self._pos += 1
        if kind == "optimizer":  # the step is done: its tokens count (checkpoint units follow)
            self.tokens_trained += self._targets
            self.steps_done += 1
        if self._pos == len(self._units):
            self._next_step()

    # --- a source of units, as ``jobs.runner.JobRunner`` (``corun.controller.Runner``); the
    # job never ends, never pauses, and its units only move the simulated clock

    done = False
    in_flight = 0

    def signal(self) -> str:
        return "run"

    def next_unit(self) -> _SimUnit:
        kind, cost, median, draw = self._units[self._pos]
        return _SimUnit(kind, cost, self, median, draw)

    def issue(self, unit: _SimUnit) -> None:
        pass

    def complete(self, unit, result, error, dropped: bool = False) -> None:
        pass

    def stop(self, signal: str) -> None:
        raise AssertionError("a simulated job is never stopped")

    def fail(self, exc: BaseException) -> None:
        raise exc

    def train_quanta(
        self, until_s: float, quantum_s: float, gap: Callable[[], float], observe: Callable
    ) -> None:
        """Idle quanta back to back until one ends at or after ``until_s``: what ``CoRun.idle``
        would run, in bulk. A quantum runs units while less than ``quantum_s`` is spent (the
        last one overruns it), then the scheduler's own ``gap()`` seconds pass. ``observe(kind,
        cost, seconds)`` is told the last ``BULK_OBSERVED`` units of each kind, in order (a
        server's predictor sees them all; the latest are what its estimates follow)."""
        clock, more = self.clock, 2.0
        while clock.now < until_s:
            # the open step's remaining units, then whole steps: enough for the time left (and
            # a quantum more), twice over as draws may be short of the medians
            step_s = float(self._arrays[id(self._raw)][0].sum())
            n = min(int(more * (until_s - clock.now + quantum_s) / step_s) + 2, 4096)
            steps = [(self._raw, self._targets)]
            while len(steps) < n:
                steps.append(self._pending.popleft() if self._pending else next(self._steps))
            for raw, _ in steps:
                self._compile(raw)
            durations, credit, kinds, costs = self._bulk_units(
                [raw for raw, _ in steps], [t for _, t in steps]
            )
            ends = np.cumsum(durations)
            done, base = 0, 0.0  # units run, and the training time they took
            while clock.now < until_s:
                last = int(np.searchsorted(ends, base + quantum_s, side="left"))
                if last >= len(ends):  # the quantum needs more units than drawn: draw again
                    break
                clock.now += float(ends[last]) - base + gap()
                base, done = float(ends[last]), last + 1
            more = more if done else 2 * more  # not one quantum in them: draw more
            self._tell(kinds[:done], costs[:done], durations[:done], observe)
            self._skip(steps, done, credit)

    def _bulk_units(
        self, steps: list[tuple[Unit, ...]], targets: list[int]
    ) -> tuple[np.ndarray, ...]:
        """Of the units of ``steps`` from the open step's position on: drawn durations, the
        target tokens each completes (a step's, at its optimizer unit), kind indices, costs."""
        arrays = [self._arrays[id(raw)] for raw in steps]
        medians = np.concatenate([m for m, _, _ in arrays])[self._pos :]
        kinds = np.concatenate([k for _, k, _ in arrays])[self._pos :]
        costs = np.concatenate([c for _, _, c in arrays])[self._pos :]
        ratios = np.empty(len(medians))
        for kind, index in self._kinds.items():
            mask = kinds == index
            count = int(mask.sum())
            if count:
                ratios[mask] = self._draws[kind].spread.draw(self._rng, count)
        optimizer = self._kinds.get("optimizer", -1)
        per_unit = np.concatenate(
            [np.where(k == optimizer, t, 0) for (_, k, _), t in zip(arrays, targets, strict=True)]
        )[self._pos :]
        return medians * ratios, per_unit, kinds, costs

    def _tell(self, kinds, costs, durations, observe: Callable) -> None:
        """``observe`` the last ``BULK_OBSERVED`` units of each kind of these, in order."""
        names = {index: kind for kind, index in self._kinds.items()}
        latest = np.sort(
            np.concatenate([np.flatnonzero(kinds == i)[-BULK_OBSERVED:] for i in names])
        )
        for i in latest.tolist():
            observe(names[int(kinds[i])], float(costs[i]), float(durations[i]))

    def _skip(self, steps: list[tuple[tuple[Unit, ...], int]], done: int, credit) -> None:
        """The job after the first ``done`` of the units ``_bulk_units`` drew for ``steps``."""
        self.tokens_trained += int(credit[:done].sum())
        self.steps_done += int(np.count_nonzero(credit[:done]))
        position = self._pos + done  # into the concatenated units of steps
        for index, (raw, targets) in enumerate(steps):
            if position < len(raw):
                self._pending.extendleft(reversed(steps[index + 1 :]))
                self._raw, self._targets = raw, targets
                self._units, self._pos = self._compile(raw), position
                return
            position -= len(raw)
        self._next_step()


class Instance:
    """One decode instance of one mode over one arrival sequence (see the module docstring)."""

    def __init__(self, config: InstanceConfig, machine: Machine, job: JobShape | None, profile):
        self.config, self.machine = config, machine
        self.clock = _Clock()
        rng = np.random.default_rng([config.seed, 0])
        self._decode_draw = Draws(machine.decode_spread, rng)
        gap_draw = Draws(machine.idle_gap_spread, np.random.default_rng([config.seed, 2]))
        self._prefill_draw = Draws(machine.prefill_spread, np.random.default_rng([config.seed, 3]))
        self._idle_gap = lambda: machine.idle_gap_s * gap_draw()
        self.corun: CoRun | None = None
        self.job: SimJob | None = None
        if config.mode != Mode.OFF:
            predictor = (
                Predictor.from_profile(profile) if config.start_from_profile else Predictor()
            )
            policy = make_policy(
                config.mode,
                objective_s=config.objective_s,
                margin=config.margin,
                budget_s=config.budget_s,
                idle_quantum_s=config.idle_quantum_s,
                predictor=predictor,
            )
            # a fleet of instances: the objective's diagnosis is not logged once per instance
            quiet = Objective(policy.objective_s, log=False)
            self.corun = CoRun(policy, clock=self.clock, objective=quiet)
            if job is not None:
                self.job = SimJob(job, machine, self.clock, config.seed)
        self.result = InstanceResult()
        # the running batch: per request (first decode iteration, context then, tokens left)
        self._running: dict[
            int, tuple[int, int]
        ] = {}  # id -> (context at join - k at join, last k)
        self._finish: list[tuple[int, int]] = []  # heap of (last decode iteration, id)
        self._fresh: list[tuple[int, float]] = []  # (id, first token time): no decode gap yet
        self._first_ok: dict[int, tuple[bool, int]] = {}  # id -> (first gap met S, misses then)
        self._k = 0  # decode iterations so far
        self._seq_sum = 0
        self._max_offset: int | None = None  # max over running of (context - k)
        self._shared_misses = 0  # iterations whose gap (shared by all older requests) missed S
        self._last_emit = 0.0
        self._next_id = 0

    # --- the loop ----------------------------------------------------------------------------

    def run(self, arrivals: Sequence[TraceRequest], until_s: float = 0.0) -> InstanceResult:
        """Serve ``arrivals`` (sorted by arrival) until the last one is done and the clock has
        reached ``until_s`` (idle, training if a job runs, in between)."""
        waiting: collections.deque[TraceRequest] = collections.deque()
        i, n = 0, len(arrivals)
        clock = self.clock
        trained_before = self._warm_up()
        while True:
            while i < n and arrivals[i].arrival_s <= clock.now:
                waiting.append(arrivals[i])
                i += 1
            if waiting:
                self._prefill(waiting)
            elif self._running:
                self._decode()
            elif i < n:
                self._idle(arrivals[i].arrival_s)
            elif clock.now < until_s:
                self._idle(until_s)
            else:
                break
        r = self.result
        r.simulated_s = clock.now
        r.requests = n
        if self.corun is not None:
            s = self.corun.stats
            r.iterations, r.within_slo = s.iterations, s.within_slo
            r.misses_with_finetune = s.misses_with_finetune
            r.finetune_tokens = s.finetune_tokens - trained_before[0]
            r.finetune_s, r.slack_s = s.finetune_s, s.slack_s
        if self.job is not None:
            r.finetune_steps = self.job.steps_done - trained_before[1]
        return r

    def _warm_up(self) -> tuple[int, int]:
        """The job's first step, in idle quanta before the trace starts, as a server has trained
        it (a replay waits for it; a fleet's servers run long before any window): the predictor
        then knows every kind of unit. Returns the tokens and steps it trained; the clock is
        set back to 0."""
        corun, job = self.corun, self.job
        if corun is None or job is None:
            return 0, 0
        corun.interrupt()
        while job.steps_done < 1:
            corun.idle(job)
            self.clock.now += self._idle_gap()
        self.clock.now = 0.0
        corun.interrupt()
        return corun.stats.finetune_tokens, job.steps_done

    def _prefill(self, waiting: collections.deque[TraceRequest]) -> None:
        if self.corun is not None:
            self.corun.interrupt()
        batch = [waiting.popleft()]
        tokens = batch[0].context_tokens
        while waiting and tokens + waiting[0].context_tokens <= self.config.max_prefill_tokens:
            tokens += waiting[0].context_tokens
            batch.append(waiting.popleft())
        lengths = [r.context_tokens for r in batch]
        scale = self.config.sglang_speed
        self.clock.now += self.machine.prefill_s(lengths) * self._prefill_draw() * scale
        now = self.clock.now
        for request in batch:
            self.result.ttft.add(now - request.arrival_s)
            left = request.output_tokens - 1  # the prefill gave the first token
            if left <= 0:
                self.result.requests_completed += 1
                self.result.requests_within += 1  # no gap at all
                continue
            rid = self._next_id
            self._next_id += 1
            context = request.context_tokens + 1
            offset = context - self._k  # context at decode iteration k is offset + k
            self._running[rid] = (offset, self._k + left)
            heapq.heappush(self._finish, (self._k + left, rid))
            self._fresh.append((rid, now))
            self._seq_sum += context
            if self._max_offset is None or offset > self._max_offset:
                self._max_offset = offset

    def _decode(self) -> None:
        clock, corun, job = self.clock, self.corun, self.job
        batch = len(self._running)
        stats = DecodeStats(batch, self._seq_sum, self._max_offset + self._k)
        plan = corun.before_decode(stats) if corun is not None else None
        total = self.machine.decode_s(stats) * self._decode_draw() * self.config.sglang_speed
        tail = min(self.machine.tail_s, total)
        clock.now += total - tail
        if corun is not None:
            corun.after_decode(job if plan.runs_finetune else None)
        clock.now += tail
        now = clock.now
        self._k += 1
        self._seq_sum += batch
        r = self.result
        r.decode_iterations += 1
        # the gap every request that decoded last time sees: since the last tokens went out
        objective = self.config.objective_s
        older = batch - len(self._fresh)
        if older:
            gap = now - self._last_emit
            r.gaps.add(gap, older)
            if gap <= objective:
                r.gaps_within += older
            else:
                self._shared_misses += 1
        for rid, first in self._fresh:  # their first decode gap: since the prefill's token
            gap = now - first
            r.gaps.add(gap)
            r.gaps_within += gap <= objective
            self._first_ok[rid] = (gap <= objective, self._shared_misses)
        self._fresh.clear()
        self._last_emit = now
        self._retire()

    def _retire(self) -> None:
        """Requests whose last token this iteration was leave the batch."""
        left = False
        while self._finish and self._finish[0][0] <= self._k:
            _, rid = heapq.heappop(self._finish)
            offset, _ = self._running.pop(rid)
            self._seq_sum -= offset + self._k
            first_ok, misses = self._first_ok.pop(rid)
            self.result.requests_completed += 1
            self.result.requests_within += first_ok and misses == self._shared_misses
            left = True
        if left:
            offsets = [offset for offset, _ in self._running.values()]
            self._max_offset = max(offsets) if offsets else None

    def _idle(self, until_s: float) -> None:
        """Nothing to run before ``until_s``: idle quanta of the job, each followed by the
        scheduler's own time between quanta; a long wait in bulk but for its last quanta."""
        clock, corun, job = self.clock, self.corun, self.job
        began = clock.now
        if corun is None or job is None:  # nothing to train: SGLang sleeps until a request
            clock.now = max(clock.now, until_s)
        else:
            corun.interrupt()
            quantum = self.config.idle_quantum_s
            if until_s - clock.now > BULK_QUANTA * quantum:
                before = job.tokens_trained
                job.train_quanta(
                    until_s - LEARN_QUANTA * quantum,
                    quantum,
                    self._idle_gap,
                    corun.policy.predictor.observe_unit,
                )
                corun.stats.finetune_tokens += job.tokens_trained - before
            while clock.now < until_s:
                corun.idle(job)
                clock.now += self._idle_gap()
        self.result.idle_s += clock.now - began
