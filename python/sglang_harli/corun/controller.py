"""The co-run loop: plan before each decode iteration, run the planned finetune beside or
after it, measure the iteration, feed the measurement back. No SGLang here: the scheduler calls
:meth:`CoRun.before_decode` from ``run_batch``, :meth:`CoRun.beside_decode` just before the
decode runs, :meth:`CoRun.after_decode` once it has, :meth:`CoRun.interrupt` for any other
batch, :meth:`CoRun.idle` on idle passes.

Where units run is the executor's business (``corun/executor.py``); what runs and when is this
loop's. With the ``inline`` executor a plan is a time slice: units run after the decode while
the policy admits them (``JobRunner.run_planned``). With a concurrent one a plan is a share:
:meth:`CoRun.beside_decode` hands back what finished (:meth:`JobRunner.complete`, on this
thread), then keeps about one iteration's worth of the runner's units submitted at that share
(their measured durations on the worker), so they run beside the decode and through the gap
after it, and a new plan takes effect within about one iteration. Nothing here
waits for a unit on the decode path: results are taken when they are there.

A decode iteration is measured from its ``run_batch`` to the next decode ``run_batch``: that
interval is the time per output token its requests see (SGLang's loop around the forward
included). An interval with a prefill or an idle pass in it is not a decode iteration's latency
and is not measured (the prefill is SGLang's scheduling choice, not finetune's).
"""

from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Callable
from typing import Any, Protocol

from .executor import Executor, InlineExecutor, Share
from .objective import Objective
from .policy import CoRunPolicy, Iteration, Plan
from .ranks import RankSync, Verdict
from .stats import CoRunStats, DecodeStats, Window, quantiles

FULL = Share(1.0)  # inline units have the device to themselves
IDLE = Share(1.0, idle=True)  # no decode runs: the worker's units may take the whole device

SAMPLE_KEYS = 256  # distinct decode shapes kept for profiles (the most recent)
SHAPE_TOKENS = 32  # decode shapes are told apart by batch size and context in 32-token steps
# the spread of each profile row (its window of recent samples): what the fleet simulation
# (bench/simulate.py) draws durations from, so its iterations miss as real ones do
QUANTILE_LEVELS = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 1.0)
UNIT_EWMA = 0.2  # the weight of a worker unit's latest duration in its kind's estimate
TIMELINE = 128  # decodes and concurrent units kept with their times, for status


@dataclasses.dataclass
class _Shape:
    """The iterations of one decode shape: their mean context, their latencies."""

    n: int = 0
    seq_lens_sum: int = 0
    seq_len_max: int = 0
    seconds: Window = dataclasses.field(default_factory=lambda: Window(64))

    def add(self, stats: DecodeStats, seconds: float) -> None:
        self.n += 1
        self.seq_lens_sum += stats.seq_lens_sum
        self.seq_len_max += stats.seq_len_max
        self.seconds.add(seconds)


class Runner(Protocol):
    """What the loop drives: a source of work units (``jobs.runner.JobRunner``; the fleet
    simulation's ``bench.instance.SimRunner``). ``signal()`` is one of "run", "pause",
    "cancel", "drop" (``jobs.runner.JobSignal``)."""

    tokens_trained: int
    done: bool
    in_flight: int

    def signal(self) -> str: ...

    def next_unit(self) -> Any: ...

    def issue(self, unit: Any) -> None: ...

    def complete(
        self, unit: Any, result: Any, error: BaseException | None, dropped: bool = False
    ) -> None: ...

    def stop(self, signal: str) -> None: ...

    def fail(self, exc: BaseException) -> None: ...


# a runner's signal -> the verdict every rank acts on
_SIGNALS = {
    "run": Verdict.RUN,
    "pause": Verdict.PAUSE,
    "cancel": Verdict.CANCEL,
    "drop": Verdict.DROP,
}


@dataclasses.dataclass
class _Open:
    start: float
    stats: DecodeStats
    plan: Plan
    finetune_s: float = 0.0
    units: list[tuple[str, float]] = dataclasses.field(default_factory=list)
    # stage 2 as planned: the decode prediction plus each admitted unit's predicted duration
    predicted_s: float | None = None
    forward_s: float | None = None  # from run_batch to the decode's return (then the slice)
    beside: set[str] = dataclasses.field(default_factory=set)  # kinds in flight beside it
    share: float = 0.0  # the share they ran at (the largest, if it changed)


class CoRun:
    def __init__(
        self,
        policy: CoRunPolicy,
        clock: Callable[[], float] = time.perf_counter,
        worker: Executor | None = None,
        ranks: RankSync | None = None,
        objective: Objective | None = None,
    ):
        """``worker``: the concurrent executor share plans run on (None: units run inline);
        ``ranks``: TP > 1, rank 0's verdict before each unit is every rank's
        (``corun/ranks.py``); ``objective``: the objective in force (default: the policy's, a
        fixed number); the policy's ``objective_s`` and the stats' follow it
        (:meth:`_objective_changed`)."""
        self.policy, self.clock = policy, clock
        # units run here, after the decode, for a policy that plans time slices; on the
        # concurrent ``worker`` (when the server has one) for a policy that plans shares
        self.inline = InlineExecutor(clock=clock)
        self.worker = worker
        self.ranks = ranks
        self._beside_seqs: set[int] = set()  # worker units submitted beside a decode iteration
        self._queued: dict[int, float] = {}  # worker units in flight: their predicted seconds
        self._worker_unit_s: dict[tuple[str, float], float] = {}  # (kind, cost): recent mean
        self.objective = objective or Objective(policy.objective_s)
        self.stats = CoRunStats(self.objective.seconds)
        self.policy.objective_s = self.objective.seconds
        self._open: _Open | None = None
        # measured samples for `python -m sglang_harli.profile`: solo decode per batch shape,
        # unit durations per (kind, cost), and whole co-run iterations
        self.decode_samples: collections.OrderedDict[tuple[int, int, int], _Shape] = (
            collections.OrderedDict()
        )
        self.unit_samples: dict[tuple[str, float], Window] = {}
        self.corun_samples: collections.deque = collections.deque(maxlen=SAMPLE_KEYS)
        # idle: the scheduler's own time from the end of one finetune quantum to the start of
        # the next (SGLang's loop, lending, status requests), time the job does not train
        self.idle_gaps = Window(SAMPLE_KEYS)
        self._idle_end: float | None = None  # when the last quantum ended, if idle since
        self._interrupts = 0  # since then: the scheduler's idle pass makes one, a prefill more
        # prefills: from the first interrupt after a quantum or a decode to the next decode
        # (the prefill and SGLang's loop around it), with the requests and prompt tokens the
        # batch gained (all of its after idle; measured when they can be told apart)
        self.prefill_samples: collections.deque = collections.deque(maxlen=SAMPLE_KEYS)
        self._prefill_began: float | None = None
        self._prefill_after: DecodeStats | None = None  # the decode before it (None: idle)
        self.misses: collections.deque = collections.deque(maxlen=16)  # the latest, for status
        # the latest decodes (run_batch to its return) and units a concurrent executor ran, as
        # (start, end) on this loop's clock: what shows that units ran beside decode
        self.recent_decodes: collections.deque = collections.deque(maxlen=TIMELINE)
        self.recent_units: collections.deque = collections.deque(maxlen=TIMELINE)

    # --- the scheduler's calls ---------------------------------------------------------------

    def before_decode(self, stats: DecodeStats, runner: Runner | None = None) -> Plan:
        """Close the previous iteration (measured now), then plan this one; ``runner``: the job's
        (a share is planned for the kinds of its units that would run beside the decode)."""
        began = self.clock()
        if self._prefill_began is not None:
            self._record_prefill(stats, began - self._prefill_began)
        self._idle_end = self._prefill_began = None
        if self._open is not None:
            self._close(began)
        self._track_objective(stats)
        plan = self.policy.plan(stats, self._upcoming_kinds(runner))
        self._open = _Open(began, stats, plan, predicted_s=plan.predicted_decode_s)
        self._note_beside()
        self.stats.last_plan = {
            "budget_ms": round(plan.budget_s * 1e3, 4),
            "predicted_decode_ms": None
            if plan.predicted_decode_s is None
            else round(plan.predicted_decode_s * 1e3, 4),
            "reason": plan.reason,
        }
        self.stats.planned_finetune += plan.runs_finetune
        self.stats.policy_us.add((self.clock() - began) * 1e6)
        return plan

    def after_decode(self, runner: Runner | None, runs: bool | None = None) -> bool:
        """The decode has run: run the open iteration's planned finetune (when it plans any and
        a job trains); False once the runner is done. ``runs``: whether finetune runs now, when
        another decided it (at TP > 1, rank 0 for every rank); None: this plan's say."""
        it = self._open
        if it is None:
            return runner is not None
        began = self.clock()
        it.forward_s = began - it.start
        self.recent_decodes.append((round(it.start, 6), round(began, 6)))
        if self.spatial or self.worker_busy:
            self._note_beside()
            if runner is None:
                return False
            return self._collect(runner)
        if runner is None or not (it.plan.runs_finetune if runs is None else runs):
            return runner is not None

        def admit(spent_s: float, kind: str, cost: float) -> bool:
            if not it.plan.runs_finetune:  # entered on another's word (TP): none of its units
                return False
            elapsed = self.clock() - it.start
            if not self.policy.admit(it.plan, spent_s, kind, cost, elapsed):
                return False
            unit_s = self.policy.predictor.unit(kind, cost)
            if it.predicted_s is not None:
                it.predicted_s = None if unit_s is None else it.predicted_s + unit_s
            return True

        def observe(kind: str, cost: float, seconds: float) -> None:
            it.units.append((kind, cost))
            self._observe_unit(kind, cost, seconds)

        still_running = self.train(runner, admit, observe)
        it.finetune_s += self.clock() - began
        return still_running

    def interrupt(self) -> None:
        """A prefill or an idle pass: the open iteration is not a decode-to-decode interval."""
        if self._prefill_began is None and (
            self._open is not None or (self._idle_end is not None and self._interrupts == 0)
        ):  # the first after a decode or a quantum: a prefill's, or an idle pass's (idle resets)
            self._prefill_began = self.clock()
            self._prefill_after = None if self._open is None else self._open.stats
        self._open = None
        self._interrupts += 1

    def idle(self, runner: Runner) -> bool:
        """No decode: a quantum of finetune on the whole device (unit durations still learned)."""
        self._open = None
        began = self.clock()
        if self._idle_end is not None and self._interrupts <= 1:  # nothing ran in between
            self.idle_gaps.add(began - self._idle_end)
        quantum = self.policy.idle_quantum_s
        if self.spatial:
            still_running = self._idle_beside(runner, quantum)
        elif self.worker_busy:  # switched to a slice policy: the worker's units first
            still_running = self._collect(runner)
        else:
            still_running = self.train(
                runner,
                lambda spent_s, kind, cost: spent_s == 0 or spent_s < quantum,  # one at least
                self._observe_unit,
            )
        self._idle_end, self._interrupts, self._prefill_began = self.clock(), 0, None
        return still_running

    def beside_decode(self, runner: Runner | None) -> bool:
        """Concurrent executor, just before the decode runs: what finished is handed back, and
        units are submitted at this iteration's planned share (none when it plans none). False
        once the runner is done."""
        it = self._open
        if runner is None:
            return False
        if not self._collect(runner):
            return False
        if it is not None and it.plan.share > 0:
            # about one iteration of work: the worker stays busy through the gap after the
            # decode, and the next plan (share or none) takes effect within one iteration
            self._submit(runner, Share(it.plan.share), self._iteration_s(it), beside=True)
            self._note_beside()
        return not runner.done

    @property
    def executor(self) -> Executor:
        """Where the policy's units run: the worker for shares, else this thread."""
        if self.policy.spatial and self.worker is not None:
            return self.worker
        return self.inline

    @property
    def spatial(self) -> bool:
        return self.executor.concurrent

    def last_fence(self):
        """What a lent slot waits for before it goes back to decode: every unit submitted."""
        return (self.worker or self.inline).last_fence()

    def drain(self, runner: Runner | None, timeout: float | None = None) -> bool:
        """Off the decode path (a flush, a job's end, a switch): wait for every unit in flight
        and hand it back. False once the runner is done."""
        for completion in (self.worker or self.inline).drain(timeout):
            self._complete(runner, completion)
        return runner is not None and not runner.done

    # --- runtime control (POST /harli/mode) ---------------------------------------------------

    def set_policy(self, policy: CoRunPolicy) -> None:
        """Plan with ``policy`` from the next decode iteration on (the scheduler calls this
        between iterations). It keeps the objective in force; the open iteration, planned by
        the previous policy, is not measured."""
        policy.objective_s = self.objective.seconds
        self.policy = policy
        self._open = None

    def set_objective(self, seconds: float | None, source: str = "request") -> None:
        """A new objective (``None``: auto), in force from the next decode iteration, and
        judged at once against stage 1's estimate of the last decode."""
        self.objective.reset(seconds, source)
        self._open = None  # planned and to be judged under the previous objective
        self._objective_changed()
        if self.objective.last_stats is not None:
            self._track_objective(self.objective.last_stats)

    def _track_objective(self, stats: DecodeStats) -> None:
        """Stage 1's solo decode at this batch: an auto objective follows it, and the
        diagnosis says whether the mode can plan anything under the objective."""
        margin = getattr(self.policy, "margin", 0.0)
        if self.objective.observe(stats, self.policy.predictor.decode(stats), margin):
            self._objective_changed()

    def _objective_changed(self) -> None:
        """The objective is one number everywhere it is checked: the policy's and the stats'."""
        self.policy.objective_s = self.stats.objective_s = self.objective.seconds

    # --- reporting ---------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.stats.to_dict(),
            "executor": self.executor.to_dict(),
            "worker": None if self.worker is None else self.worker.to_dict(),
            "objective": self.objective.to_dict(),
            "policy": self.policy.to_dict(),
            "predictor": self.policy.predictor.to_dict(),
            "recent_misses": list(self.misses),
            "timeline": {
                "decodes": list(self.recent_decodes),
                "units": list(self.recent_units),
            },
        }

    def samples(self) -> dict[str, Any]:
        """What a profile is made of (medians of what was measured, and their spread as
        quantiles at ``quantile_levels``), for the profile tool."""
        predictor = self.policy.predictor
        return {
            "quantile_levels": list(QUANTILE_LEVELS),
            "decode": [
                {
                    "batch_size": batch_size,
                    "seq_lens_sum": round(shape.seq_lens_sum / shape.n),
                    "seq_len_max": round(shape.seq_len_max / shape.n),
                    "seconds": shape.seconds.quantile(0.5),
                    "quantiles": quantiles(shape.seconds.values, QUANTILE_LEVELS),
                    "n": shape.n,
                }
                for (batch_size, _, _), shape in self.decode_samples.items()
            ],
            "units": [
                {
                    "kind": kind,
                    "cost": cost,
                    "seconds": w.quantile(0.5),
                    "quantiles": quantiles(w.values, QUANTILE_LEVELS),
                    "n": len(w.values),
                }
                for (kind, cost), w in self.unit_samples.items()
            ],
            "corun": list(self.corun_samples),
            # SGLang's work after a decode's forward (part of each decode row's seconds)
            "tail": {"seconds": predictor.tail_s, "spread_s": predictor.tail_spread_s},
            # between idle quanta: the scheduler's time the job does not train
            "idle_gap": {
                "seconds": self.idle_gaps.quantile(0.5),
                "quantiles": quantiles(self.idle_gaps.values, QUANTILE_LEVELS)
                if self.idle_gaps.values
                else None,
                "n": len(self.idle_gaps.values),
            },
            "prefill": list(self.prefill_samples),
        }

    # --- internals ---------------------------------------------------------------------------

    def train(self, runner: Runner, admit: Callable, observe: Callable) -> bool:
        """Units one after another on this thread (the inline executor) while ``admit(spent_s,
        kind, cost)`` lets the next start (``spent_s`` exactly 0 before the first); at TP > 1
        rank 0's verdict before each unit is every rank's. False once the runner is done."""
        before = runner.tokens_trained
        try:
            return self._run_inline(runner, admit, observe)
        except Exception as exc:  # noqa: BLE001 - ranks that diverged: the job fails, not serving
            runner.fail(exc)
            return False
        finally:
            self.stats.finetune_tokens += runner.tokens_trained - before

    def _run_inline(self, runner: Runner, admit: Callable, observe: Callable) -> bool:
        start, ran = self.clock(), False
        while not runner.done:
            unit = runner.next_unit()
            verdict = self._verdict(runner, unit, admit, self.clock() - start if ran else 0.0)
            if self.ranks is not None:
                verdict = self.ranks.unit(verdict, None if unit is None else unit.kind)
            if verdict in (Verdict.DROP, Verdict.CANCEL):
                runner.stop(verdict.name.lower())
                return False
            if verdict != Verdict.RUN:
                # paused (decode goes on, the writes wait for the store), nothing to do before
                # the next slice, or the slice is spent
                return True
            ran = True
            runner.issue(unit)
            self.inline.submit(unit, FULL)
            (done,) = self.inline.poll()
            runner.complete(unit, done.result, done.error)
            if done.error is not None:  # waiting for memory (decode goes on), or ended
                return not runner.done
            observe(unit.kind, unit.cost, done.seconds)
        return False

    def _verdict(self, runner: Runner, unit: Any, admit: Callable, spent_s: float) -> Verdict:
        """This rank's say on the next unit; a TP follower only says whether it has one."""
        if self.ranks is not None and not self.ranks.leader:
            return Verdict.WAIT if unit is None else Verdict.RUN
        signal = _SIGNALS[runner.signal()]
        if signal != Verdict.RUN:
            return signal
        if unit is None:
            return Verdict.WAIT
        return Verdict.RUN if admit(spent_s, unit.kind, unit.cost) else Verdict.STOP

    def agree(self, runner: Runner | None, agent: Any) -> tuple[Runner | None, bool]:
        """TP > 1, at a hook that may train, on every rank: (the runner this rank holds now,
        whether the ranks agree on it: then its units run, rank 0 deciding each). Rank 0 ends a
        cancelled or lost job here while the followers still build theirs (no unit has run, so
        none waits for it)."""
        held, agreed = self.ranks.agree_runner(runner, agent)
        if self.ranks.leader and held is not None and not agreed:
            signal = held.signal()
            if signal in ("cancel", "drop"):
                held.stop(signal)
                return None, False
        return held, agreed

    @property
    def worker_busy(self) -> bool:
        """Units of a share plan still in flight after a switch to a time-slice policy: they
        come back before any unit runs here (a runner's units run in order)."""
        return self.worker is not None and self.worker.inflight > 0

    def _upcoming_kinds(self, runner: Runner | None) -> frozenset[str] | None:
        """A share plan's units: those in flight and the runner's next (None: not known)."""
        if runner is None or not self.policy.spatial or self.worker is None:
            return None
        kinds = {kind for kind, _ in self.worker.in_flight_units()}
        unit = runner.next_unit()
        if unit is not None:
            kinds.add(unit.kind)
        return frozenset(kinds) or None

    def _note_beside(self) -> None:
        """Units in flight now run beside the open iteration: it measures stage 2, not 1."""
        it, executor = self._open, self.worker
        if it is None or executor is None or not executor.inflight:
            return
        inflight = executor.in_flight_units()
        it.beside.update(kind for kind, _ in inflight)
        it.share = max([it.share, *(share for _, share in inflight)])

    def _collect(self, runner: Runner) -> bool:
        """Hand back what the executor finished; act on the job's signals (a cancelled or lost
        job ends once nothing of it is in flight, its queued units dropped). False once the
        runner is done."""
        executor = self.worker if self.worker_busy else self.executor
        for completion in executor.poll():
            self._complete(runner, completion)
        if runner.done:
            return False
        signal = runner.signal()
        if signal in ("drop", "cancel"):
            executor.discard_queued()
            if runner.in_flight:
                return True
            runner.stop(signal)
            return False
        return True

    def _complete(self, runner: Runner | None, completion) -> None:
        beside = completion.ticket.seq in self._beside_seqs
        self._beside_seqs.discard(completion.ticket.seq)
        self._queued.pop(completion.ticket.seq, None)
        if runner is None:
            return
        before = runner.tokens_trained
        error = completion.error
        runner.complete(completion.unit, completion.result, error, completion.discarded)
        self.stats.finetune_tokens += runner.tokens_trained - before
        if error is None and not completion.discarded:
            unit = completion.unit
            self.stats.corun_units += 1
            self.stats.corun_unit_s += completion.seconds
            if beside:  # the slack it used, as inline units' time after a decode is
                self.stats.finetune_s += completion.seconds
            self.recent_units.append((round(completion.started, 6), round(completion.ended, 6)))
            self.unit_samples.setdefault((unit.kind, unit.cost), Window(64)).add(completion.seconds)
            key = (unit.kind, unit.cost)
            last = self._worker_unit_s.get(key)
            self._worker_unit_s[key] = (
                completion.seconds
                if last is None
                else last + UNIT_EWMA * (completion.seconds - last)
            )

    def _submit(self, runner: Runner, share: Share, horizon_s: float, beside: bool = False) -> int:
        """Keep about ``horizon_s`` of the runner's next units queued at ``share``: enough that
        the worker does not starve until the next hook submits again, few enough that a new
        plan takes effect within about that long (``max_inflight`` bounds the count too).
        ``beside``: planned beside a decode iteration (their time is the slack finetune used),
        not in an idle quantum."""
        if runner.signal() != "run":
            return 0  # paused (the store does not answer), or ending: _collect acts on it
        submitted = 0
        while self.executor.can_submit() and self._queued_s() < horizon_s:
            unit = runner.next_unit()
            if unit is None:
                break
            runner.issue(unit)
            ticket = self.executor.submit(unit, share)
            # a unit never measured here counts as the whole horizon: one at a time until it is
            self._queued[ticket.seq] = self._unit_estimate(unit.kind, unit.cost) or horizon_s
            if beside:
                self._beside_seqs.add(ticket.seq)
            submitted += 1
        return submitted

    def _queued_s(self) -> float:
        """The predicted time of the units in flight (the running one counted whole)."""
        return sum(self._queued.values())

    def _unit_estimate(self, kind: str, cost: float) -> float | None:
        """A unit's seconds on the worker: what units of its kind and cost took there lately,
        else the predictor's (inline) estimate."""
        seconds = self._worker_unit_s.get((kind, cost))
        return seconds if seconds is not None else self.policy.predictor.unit(kind, cost)

    def _iteration_s(self, it: _Open) -> float:
        """How long this iteration is expected to last, hook to hook: the objective when there
        is one (iterations that keep it last at most that long), else the predicted decode."""
        if self.objective.known:
            return self.objective.seconds
        return it.plan.predicted_decode_s or 0.0

    def _idle_beside(self, runner: Runner, quantum_s: float) -> bool:
        """Idle with a concurrent executor: finetune takes the whole device (:data:`IDLE`:
        decode's cores too, nothing decodes), and this thread waits for the worker (a quantum
        at most) rather than spin on SGLang's idle loop: a request that arrives meanwhile waits
        that long at most, as inline."""
        if not self._collect(runner):
            return False
        deadline = self.clock() + quantum_s
        while self.clock() < deadline:
            self._submit(runner, IDLE, deadline - self.clock())
            if not self.executor.inflight:
                break  # nothing to run now (a checkpoint's write, a memory wait)
            self.executor.last_fence().wait(max(deadline - self.clock(), 0.0))
            if not self._collect(runner):
                return False
        return not runner.done

    def _record_prefill(self, stats: DecodeStats, seconds: float) -> None:
        """A prefill measured up to the decode of ``stats``: its requests are those the batch
        gained and its prompt tokens theirs (each sequence also holds its first token, and the
        older ones the token they decoded before it). Not measured when requests also left the
        batch and none seems to have joined."""
        before = self._prefill_after
        if before is None:
            requests, tokens = stats.batch_size, stats.seq_lens_sum - stats.batch_size
        else:
            requests = stats.batch_size - before.batch_size
            tokens = stats.seq_lens_sum - before.seq_lens_sum - before.batch_size - requests
        if requests > 0 and tokens > 0:
            self.prefill_samples.append(
                {"batch_size": requests, "tokens": tokens, "seconds": seconds}
            )

    def _observe_unit(self, kind: str, cost: float, seconds: float) -> None:
        self.policy.predictor.observe_unit(kind, cost, seconds)
        self.unit_samples.setdefault((kind, cost), Window(64)).add(seconds)

    def _close(self, now: float) -> None:
        it, self._open = self._open, None
        total = now - it.start
        tail = None if it.forward_s is None else max(total - it.finetune_s - it.forward_s, 0.0)
        beside = (it.share, frozenset(it.beside)) if it.beside else None
        iteration = Iteration(
            it.stats, it.plan, total, it.finetune_s, tuple(it.units), tail, beside=beside
        )
        self.policy.feedback(iteration)
        if not self.policy.within(total):
            self.misses.append(
                {
                    "ms": round(total * 1e3, 3),
                    "forward_ms": None if it.forward_s is None else round(it.forward_s * 1e3, 3),
                    "finetune_ms": round(it.finetune_s * 1e3, 3),
                    "tail_ms": None if tail is None else round(tail * 1e3, 3),
                    "planned_ms": None
                    if it.predicted_s is None
                    else round(it.predicted_s * 1e3, 3),
                    "units": [kind for kind, _ in it.units],
                }
            )
        self.stats.record(
            total,
            iteration.decode_s,
            it.finetune_s,
            it.predicted_s,
            ran_units=bool(it.units) or bool(it.beside),
        )
        stats = it.stats
        key = (
            stats.batch_size,
            stats.seq_lens_sum // SHAPE_TOKENS,
            stats.seq_len_max // SHAPE_TOKENS,
        )
        shape = self.decode_samples.pop(key, None) or _Shape()
        shape.add(stats, iteration.decode_s)
        self.decode_samples[key] = shape  # most recent last
        if len(self.decode_samples) > SAMPLE_KEYS:
            self.decode_samples.popitem(last=False)
        if it.units:
            self.corun_samples.append(
                {
                    "batch_size": stats.batch_size,
                    "seq_lens_sum": stats.seq_lens_sum,
                    "seq_len_max": stats.seq_len_max,
                    "units": it.units,
                    "seconds": total,
                }
            )
