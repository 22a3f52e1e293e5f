"""The co-run loop's bookkeeping: plan before each decode iteration, run the planned finetune
after it, measure the iteration, feed the measurement back. No SGLang here: the scheduler calls
:meth:`CoRun.before_decode` from ``run_batch``, :meth:`CoRun.after_decode` once the decode is
launched, :meth:`CoRun.interrupt` for any other batch, :meth:`CoRun.idle` on idle passes.

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

from .objective import Objective
from .policy import CoRunPolicy, Iteration, Plan
from .stats import CoRunStats, DecodeStats, Window, quantiles

SAMPLE_KEYS = 256  # distinct decode shapes kept for profiles (the most recent)
SHAPE_TOKENS = 32  # decode shapes are told apart by batch size and context in 32-token steps
# the spread of each profile row (its window of recent samples): what the fleet simulation
# (bench/simulate.py) draws durations from, so its iterations miss as real ones do
QUANTILE_LEVELS = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 1.0)


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
    """What the loop drives: ``jobs.runner.JobRunner``."""

    tokens_trained: int

    def run_planned(self, admit: Callable, observe: Callable | None = None) -> bool: ...


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


class CoRun:
    def __init__(
        self,
        policy: CoRunPolicy,
        clock: Callable[[], float] = time.perf_counter,
        objective: Objective | None = None,
    ):
        """``objective``: the objective in force (default: the policy's, a fixed number); the
        policy's ``objective_s`` and the stats' follow it (:meth:`_objective_changed`)."""
        self.policy, self.clock = policy, clock
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

    # --- the scheduler's calls ---------------------------------------------------------------

    def before_decode(self, stats: DecodeStats) -> Plan:
        """Close the previous iteration (measured now), then plan this one."""
        began = self.clock()
        if self._prefill_began is not None:
            self._record_prefill(stats, began - self._prefill_began)
        self._idle_end = self._prefill_began = None
        if self._open is not None:
            self._close(began)
        self._track_objective(stats)
        plan = self.policy.plan(stats)
        self._open = _Open(began, stats, plan, predicted_s=plan.predicted_decode_s)
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

        still_running = self._train(runner, admit, observe)
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
        still_running = self._train(
            runner, lambda spent_s, kind, cost: spent_s < quantum, self._observe_unit
        )
        self._idle_end, self._interrupts, self._prefill_began = self.clock(), 0, None
        return still_running

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
            "objective": self.objective.to_dict(),
            "policy": self.policy.to_dict(),
            "predictor": self.policy.predictor.to_dict(),
            "recent_misses": list(self.misses),
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

    def _train(self, runner: Runner, admit: Callable, observe: Callable) -> bool:
        before = runner.tokens_trained
        still_running = runner.run_planned(admit, observe)
        self.stats.finetune_tokens += runner.tokens_trained - before
        return still_running

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
        iteration = Iteration(it.stats, it.plan, total, it.finetune_s, tuple(it.units), tail)
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
            total, iteration.decode_s, it.finetune_s, it.predicted_s, ran_units=bool(it.units)
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
