"""The co-run policy: before every decode iteration, how much finetune work runs beside it.

One interface, one implementation per ``--harli-mode``, so benchmarks compare like with like:

- ``harli``: the QoS policy. From the batch, the predictor and the objective ``S`` it plans the
  most finetune the objective allows: on a CPU a time slice, ``S * (1 - margin) - predicted
  decode``, into which a unit is started only if its predicted duration still fits (never one
  predicted not to); on a GPU the largest SM share of the device's ladder whose predicted
  co-run latency fits. Nothing when nothing fits. After a measured miss it backs off at once
  (the slack it plans with is halved) and recovers gradually (a step back per iteration on time);
  and it holds back more of ``S`` while misses with finetune in them are above 1% of the
  iterations planned finetune, less while below (``hold``).
- ``time-sliced``: a fixed budget after each decode iteration, whatever it costs decode.
- ``idle-only``: nothing beside decode.
- ``naive`` / ``static``: every SM / a fixed share, no prediction (GPU baselines).

Every mode trains in quanta when no decode runs (:attr:`CoRunPolicy.idle_quantum_s`). The SLO
check (``measured <= S``) exists once, here: :meth:`CoRunPolicy.within`. ``S`` is
:attr:`CoRunPolicy.objective_s`, a plain attribute the controller changes at runtime (an auto
objective, ``POST /harli/mode``; ``corun/objective.py``): every check reads it when it runs.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from sglang_harli.config import Mode

from .predictor import Predictor
from .stats import DecodeStats

# A unit kind never measured here runs beside decode only as a probe: the first unit of a slice
# whose budget is at least this fraction of the objective (else it waits for an idle quantum,
# where its duration is learned at no risk).
PROBE_FRACTION = 0.5
# A share never measured beside decode is tried only where decode could be this much slower and
# still meet the target (its first iterations then measure the real slowdown).
PROBE_SLOWDOWN = 1.5
# a decode this much slower than predicted marks the machine as slow right now (below it, the
# difference is ordinary noise that the margin absorbs)
SLOW_DECODE = 1.25
MIN_BACKOFF = 1 / 64
# The attainment controller: the fraction of S held back beyond --harli-slo-margin grows by
# HOLD_UP at each miss of an iteration that ran finetune and shrinks by HOLD_DOWN at each
# iteration on time that was planned some, so it settles where such misses are MISS_TARGET of
# those iterations (a stochastic-approximation quantile tracker), whatever the machine's noise.
MISS_TARGET = 0.01
HOLD_UP = 0.05
HOLD_DOWN = HOLD_UP * MISS_TARGET / (1 - MISS_TARGET)
MAX_HOLD = 0.5
RECOVERY_STEP = 0.05  # back to the full slack 20 on-time iterations after a miss


@dataclasses.dataclass(frozen=True)
class Plan:
    """What finetune may do beside one decode iteration."""

    budget_s: float  # CPU: finetune time this iteration may use (0: none)
    predicted_decode_s: float | None = None  # stage 1, None while the predictor learns
    # CPU: the last moment (seconds after the iteration began) a planned unit may end, so that
    # SGLang's work after it still ends by the target; None: only budget_s applies
    deadline_s: float | None = None
    num_sms: int | None = None  # GPU: the finetune SM share (None: not a spatial plan)
    max_inflight: int = 0  # GPU: finetune units queued at once
    reason: str = ""
    # spatial: the fraction of finetune's part of the device (cores beside decode's on a CPU,
    # SMs on a GPU) its units run on beside this decode, through a concurrent executor
    share: float = 0.0

    @property
    def runs_finetune(self) -> bool:
        return self.budget_s > 0 or bool(self.num_sms) or self.share > 0


@dataclasses.dataclass(frozen=True)
class Iteration:
    """One measured decode iteration: from its ``run_batch`` to the next decode ``run_batch``."""

    stats: DecodeStats
    plan: Plan
    total_s: float  # what its requests saw as their time per output token
    finetune_s: float  # of which finetune units ran
    units: tuple[tuple[str, float], ...] = ()  # (kind, cost) of the units run in it
    tail_s: float | None = None  # SGLang's work after the slice, where it was measured
    # spatial: the share and the kinds of the units in flight beside it (None: nothing was)
    beside: tuple[float, frozenset[str]] | None = None

    @property
    def decode_s(self) -> float:
        """The iteration without its finetune: decode, and SGLang's loop around it."""
        return max(self.total_s - self.finetune_s, 0.0)


class CoRunPolicy:
    """The interface every mode implements; the base plans nothing beside decode.

    ``spatial``: its plans are shares (units submitted to a concurrent executor before the
    decode and run beside it), not time slices after it."""

    mode: Mode = Mode.IDLE_ONLY
    spatial: bool = False

    def __init__(self, objective_s: float, idle_quantum_s: float, predictor: Predictor):
        self.objective_s, self.idle_quantum_s, self.predictor = (
            objective_s,
            idle_quantum_s,
            predictor,
        )

    def plan(self, stats: DecodeStats, kinds: frozenset[str] | None = None) -> Plan:
        return Plan(0.0, self.predictor.decode(stats), reason="idle-only")

    def admit(
        self, plan: Plan, spent_s: float, kind: str, cost: float, elapsed_s: float | None = None
    ) -> bool:
        """Whether the next unit (``kind``, ``cost``) may start, ``spent_s`` into the slice
        (0 before its first unit) and ``elapsed_s`` after the iteration began (decode included,
        when the caller measured it)."""
        return False

    def feedback(self, iteration: Iteration) -> None:
        """A measured iteration: the predictor learns from it (every mode, so its status and
        the benchmarks can report prediction error for the baselines too). Stage 1 learns only
        from iterations with nothing in flight beside them; stage 2 from the others."""
        if iteration.beside:
            self.predictor.observe_corun(iteration.stats, iteration.total_s, iteration.beside)
        else:
            self.predictor.observe_decode(iteration.stats, iteration.decode_s, iteration.tail_s)

    def within(self, seconds: float) -> bool:
        return seconds <= self.objective_s

    def to_dict(self) -> dict:
        return {}


class IdleOnlyPolicy(CoRunPolicy):
    mode = Mode.IDLE_ONLY


class TimeSlicedPolicy(CoRunPolicy):
    """A fixed slice after each decode iteration: units run until it is spent (at least one)."""

    mode = Mode.TIME_SLICED

    def __init__(self, objective_s, idle_quantum_s, predictor, budget_s: float):
        super().__init__(objective_s, idle_quantum_s, predictor)
        self.budget_s = budget_s

    def plan(self, stats: DecodeStats, kinds: frozenset[str] | None = None) -> Plan:
        return Plan(self.budget_s, self.predictor.decode(stats), reason="fixed slice")

    def admit(self, plan, spent_s, kind, cost, elapsed_s=None) -> bool:
        return spent_s < plan.budget_s


class HarliPolicy(CoRunPolicy):
    """The QoS policy (see the module docstring)."""

    mode = Mode.HARLI

    def __init__(
        self,
        objective_s,
        idle_quantum_s,
        predictor,
        margin: float,
        shares: Sequence[float] = (),
    ):
        super().__init__(objective_s, idle_quantum_s, predictor)
        self.margin = margin
        # spatial with a concurrent executor: the shares it may plan (empty: time slices)
        self.shares = tuple(shares)
        self.spatial = bool(self.shares)
        self.hold = 0.0  # the attainment controller's extra fraction of S held back
        self.backoff = 1.0  # the fraction of the predicted slack planned with
        self.misses = 0

    @property
    def target_s(self) -> float:
        return self.objective_s * (1.0 - self.margin - self.hold)

    def plan(self, stats: DecodeStats, kinds: frozenset[str] | None = None) -> Plan:
        if self.spatial:
            return self.plan_spatial(stats, kinds)
        decode_s = self.predictor.decode(stats)
        if decode_s is None:
            return Plan(0.0, None, reason="learning: no prediction yet")
        if not math.isfinite(self.objective_s):  # auto, before its first measurement
            return Plan(0.0, decode_s, reason="learning: no objective yet")
        slack = (self.target_s - decode_s) * self.backoff
        if slack <= 0:
            return Plan(0.0, decode_s, reason="paused: no slack")
        # On a CPU the decode has run when units are admitted: they are checked against the
        # time actually elapsed, so a slow decode leaves less room and a fast one more; only
        # SGLang's work after the slice (the tail) is still predicted.
        deadline = decode_s - self.predictor.tail_bound_s + slack
        reason = "backing off" if self.backoff < 1 else "slack"
        return Plan(slack, decode_s, deadline_s=deadline, reason=reason)

    def admit(self, plan, spent_s, kind, cost, elapsed_s=None) -> bool:
        seconds = self.predictor.unit_bound(kind, cost)
        if seconds is None:  # never measured: only as a probe, first in a large slice
            return spent_s == 0.0 and plan.budget_s >= PROBE_FRACTION * self.objective_s
        if elapsed_s is None or plan.deadline_s is None:
            return spent_s + seconds <= plan.budget_s
        # A decode that ran slower than predicted says the machine is slow right now (another
        # process, the GIL, a cold cache): the units after it will be as slow.
        forward_s = elapsed_s - spent_s
        predicted_forward = (plan.predicted_decode_s or 0.0) - self.predictor.tail_s
        if predicted_forward > 0 and forward_s > SLOW_DECODE * predicted_forward:
            seconds *= forward_s / predicted_forward
        return elapsed_s + seconds <= plan.deadline_s

    def feedback(self, iteration: Iteration) -> None:
        super().feedback(iteration)
        if not self.within(iteration.total_s):
            self.misses += 1
            self.backoff = max(self.backoff / 2, MIN_BACKOFF)
            if iteration.units or iteration.beside:  # a miss finetune may have caused
                self.hold = min(self.hold + HOLD_UP, MAX_HOLD)
        else:
            self.backoff = min(self.backoff + RECOVERY_STEP, 1.0)
            if iteration.plan.runs_finetune:
                self.hold = max(self.hold - HOLD_DOWN, 0.0)

    def plan_spatial(self, stats: DecodeStats, kinds: frozenset[str] | None = None) -> Plan:
        """The largest share of :attr:`shares` whose predicted decode beside finetune units of
        ``kinds`` (those in flight and the next; None: the worst kind measured) still meets the
        target (stage 2, the interference table); none when none does. A share never measured
        here (for those kinds) is tried only where decode could be ``PROBE_SLOWDOWN`` times
        slower and still meet it, and its first iterations teach the table."""
        decode_s = self.predictor.decode(stats)
        if decode_s is None:
            return Plan(0.0, None, reason="learning: no prediction yet")
        target = decode_s + (self.target_s - decode_s) * self.backoff
        if target <= decode_s:
            return Plan(0.0, decode_s, reason="paused: no slack")
        interference = self.predictor.interference
        for share in sorted(self.shares, reverse=True):
            if kinds:
                factor = interference.factor(kinds, share)
            else:
                factor = interference.factor_at(share)
            if factor is None:
                if decode_s * PROBE_SLOWDOWN <= target:
                    return Plan(0.0, decode_s, reason="probing a share", share=share)
                continue
            if decode_s * factor <= target:
                return Plan(0.0, decode_s, reason="share fits", share=share)
        return Plan(0.0, decode_s, reason="paused: no share fits")

    def plan_share(
        self, stats: DecodeStats, ladder: Sequence[int], total_sms: int, kinds: Sequence[str]
    ) -> Plan:
        """GPU: the largest SM count of ``ladder`` whose predicted co-run latency (decode beside
        finetune kernels of ``kinds``) fits the target; none if even the smallest does not."""
        decode_s = self.predictor.decode(stats)
        if decode_s is None or not kinds:
            return Plan(0.0, decode_s, reason="learning: no prediction yet" if kinds else "idle")
        target = decode_s + (self.target_s - decode_s) * self.backoff
        for num_sms in sorted(ladder, reverse=True):
            predicted = self.predictor.corun_gpu(stats, kinds, num_sms / total_sms)
            if predicted is not None and predicted <= target:
                return Plan(0.0, decode_s, num_sms=num_sms, max_inflight=2, reason="fits")
        return Plan(0.0, decode_s, reason="paused: no share fits")

    def to_dict(self) -> dict:
        return {
            "target_ms": self.target_s * 1e3 if math.isfinite(self.target_s) else None,
            "hold": self.hold,
            "backoff": self.backoff,
            "misses": self.misses,
        }


class StaticPolicy(CoRunPolicy):
    """A fixed share beside every decode iteration, whatever it costs decode (a baseline)."""

    mode = Mode.STATIC
    spatial = True

    def __init__(self, objective_s, idle_quantum_s, predictor, share: float):
        super().__init__(objective_s, idle_quantum_s, predictor)
        self.share = share

    def plan(self, stats: DecodeStats, kinds: frozenset[str] | None = None) -> Plan:
        return Plan(0.0, self.predictor.decode(stats), reason="fixed share", share=self.share)

    def to_dict(self) -> dict:
        return {"share": self.share}


class NaivePolicy(StaticPolicy):
    """Every resource finetune may have, beside every decode iteration, no prediction."""

    mode = Mode.NAIVE

    def __init__(self, objective_s, idle_quantum_s, predictor):
        super().__init__(objective_s, idle_quantum_s, predictor, 1.0)

    def plan(self, stats: DecodeStats, kinds: frozenset[str] | None = None) -> Plan:
        return Plan(0.0, None, reason="every resource", share=1.0)


def make_policy(
    mode: Mode,
    *,
    objective_s: float,
    margin: float,
    budget_s: float,
    idle_quantum_s: float,
    predictor: Predictor,
    shares: Sequence[float] = (),
    static_share: float = 1.0,
    spatial: bool = True,
) -> CoRunPolicy:
    """The policy of a (resolved) mode (``corun/modes.py`` says where each runs). ``shares``:
    the shares the server's concurrent executor offers (empty: none, units run inline);
    ``spatial``: whether harli plans shares (its executor is the concurrent one) or slices."""
    if mode == Mode.HARLI:
        return HarliPolicy(
            objective_s, idle_quantum_s, predictor, margin, shares if spatial else ()
        )
    if mode == Mode.TIME_SLICED:
        return TimeSlicedPolicy(objective_s, idle_quantum_s, predictor, budget_s)
    if mode == Mode.IDLE_ONLY:
        return IdleOnlyPolicy(objective_s, idle_quantum_s, predictor)
    if mode in (Mode.NAIVE, Mode.STATIC) and not shares:
        raise ValueError(f"--harli-mode {mode} runs beside decode: it needs a concurrent executor")
    if mode == Mode.NAIVE:
        return NaivePolicy(objective_s, idle_quantum_s, predictor)
    if mode == Mode.STATIC:
        return StaticPolicy(objective_s, idle_quantum_s, predictor, static_share)
    raise ValueError(f"no policy executes --harli-mode {mode} here")
