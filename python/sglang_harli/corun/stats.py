"""What the scheduler hooks observe, and what the hooks themselves cost.

Kept apart from SGLang so the co-run policy can be tested on plain numbers: ``srt/scheduler.py``
turns SGLang's batches into :class:`DecodeStats` and reports through :class:`HookStats`.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager


@dataclasses.dataclass(frozen=True)
class DecodeStats:
    """One decode iteration as the latency predictor sees it."""

    batch_size: int
    seq_lens_sum: int
    seq_len_max: int


@dataclasses.dataclass
class HookTimer:
    """Calls of one hook and the time spent in our code inside it (not SGLang's)."""

    calls: int = 0
    total_ns: int = 0
    max_ns: int = 0

    def add(self, elapsed_ns: int) -> None:
        self.calls += 1
        self.total_ns += elapsed_ns
        self.max_ns = max(self.max_ns, elapsed_ns)

    def to_dict(self) -> dict[str, float | int]:
        return {
            "calls": self.calls,
            "total_us": self.total_ns / 1e3,
            "mean_us": self.total_ns / 1e3 / self.calls if self.calls else 0.0,
            "max_us": self.max_ns / 1e3,
        }


@dataclasses.dataclass
class HookStats:
    """Counters the Harli scheduler exposes on ``GET /harli/status``."""

    decode_iterations: int = 0
    decode_tokens: int = 0
    last_decode: DecodeStats | None = None
    hooks: dict[str, HookTimer] = dataclasses.field(default_factory=dict)
    # Time handed to finetune work on purpose: reported, but not counted as hook overhead.
    work: dict[str, HookTimer] = dataclasses.field(default_factory=dict)

    @contextmanager
    def timed(self, name: str, overhead: bool = True) -> Iterator[None]:
        start = time.perf_counter_ns()
        try:
            yield
        finally:
            timers = self.hooks if overhead else self.work
            timers.setdefault(name, HookTimer()).add(time.perf_counter_ns() - start)

    def record_decode(self, stats: DecodeStats) -> None:
        self.decode_iterations += 1
        self.decode_tokens += stats.batch_size
        self.last_decode = stats

    def to_dict(self) -> dict:
        return {
            "decode_iterations": self.decode_iterations,
            "decode_tokens": self.decode_tokens,
            "last_decode": dataclasses.asdict(self.last_decode) if self.last_decode else None,
            "hook_overhead_us": sum(t.total_ns for t in self.hooks.values()) / 1e3,
            "hooks": {name: t.to_dict() for name, t in sorted(self.hooks.items())},
            "finetune": {name: t.to_dict() for name, t in sorted(self.work.items())},
        }


@dataclasses.dataclass
class Window:
    """The last ``size`` samples of one number, for medians and tails."""

    size: int = 2048
    values: collections.deque = dataclasses.field(default_factory=collections.deque)

    def add(self, value: float) -> None:
        self.values.append(value)
        if len(self.values) > self.size:
            self.values.popleft()

    def quantile(self, q: float) -> float | None:
        return quantile(self.values, q) if self.values else None


def quantile(values: Iterable[float], q: float) -> float:
    """The nearest-rank ``q`` quantile of ``values`` (not empty)."""
    return quantiles(values, (q,))[0]


def quantiles(values: Iterable[float], levels: Iterable[float]) -> list[float]:
    """The nearest-rank quantiles of ``values`` (not empty) at each of ``levels``, one sort."""
    ordered = sorted(values)
    return [ordered[min(int(q * len(ordered)), len(ordered) - 1)] for q in levels]


@dataclasses.dataclass
class CoRunStats:
    """Per measured decode iteration: the objective kept or missed, the prediction against the
    measurement, the slack and what finetune used of it, and the policy's own cost.

    Totals are counters (a client takes differences between two reads); the windows give the
    recent median and P99. Each iteration is judged against the objective in force when it was
    measured (``objective_s``, changed at runtime by the controller); an auto objective that
    has nothing measured yet (``inf``) judges none: those iterations count as ``unjudged``.
    """

    objective_s: float
    iterations: int = 0
    unjudged: int = 0  # measured while there was no objective yet (auto, stage 1 learning)
    within_slo: int = 0
    # misses of iterations that ran finetune units: what fine-tuning may have caused (the
    # others are decode's own: a slow machine, a long batch)
    misses_with_finetune: int = 0
    finetune_s: float = 0.0  # finetune time inside measured iterations
    slack_s: float = 0.0  # sum over iterations of max(0, S - decode without finetune)
    finetune_tokens: int = 0  # target tokens of finished optimizer steps
    planned_finetune: int = 0  # iterations whose plan gave finetune time
    corun_units: int = 0  # units a concurrent executor ran beside decode (or idle)
    corun_unit_s: float = 0.0  # and their time, on the worker
    last_plan: dict | None = None
    last_iteration_ms: float | None = None
    measured_ms: Window = dataclasses.field(default_factory=Window)
    prediction_error: Window = dataclasses.field(default_factory=Window)  # |pred - meas| / meas
    policy_us: Window = dataclasses.field(default_factory=Window)

    def record(
        self,
        total_s: float,
        decode_s: float,
        finetune_s: float,
        predicted_s: float | None,
        ran_units: bool = False,
    ) -> None:
        self.last_iteration_ms = total_s * 1e3
        self.measured_ms.add(total_s * 1e3)
        if not math.isfinite(self.objective_s):
            self.unjudged += 1
            return
        self.iterations += 1
        within = total_s <= self.objective_s
        self.within_slo += within
        self.misses_with_finetune += ran_units and not within
        self.finetune_s += finetune_s
        self.slack_s += max(self.objective_s - decode_s, 0.0)
        if predicted_s is not None and total_s > 0:
            self.prediction_error.add(abs(predicted_s - total_s) / total_s)

    def to_dict(self) -> dict:
        def ms(window: Window, q: float) -> float | None:
            value = window.quantile(q)
            return None if value is None else round(value, 4)

        return {
            "objective_ms": self.objective_s * 1e3 if math.isfinite(self.objective_s) else None,
            "iterations": self.iterations,
            "unjudged": self.unjudged,
            "within_slo": self.within_slo,
            "misses_with_finetune": self.misses_with_finetune,
            "slo_attainment": self.within_slo / self.iterations if self.iterations else None,
            "finetune_s": self.finetune_s,
            "slack_s": self.slack_s,
            "slack_used": self.finetune_s / self.slack_s if self.slack_s else None,
            "finetune_tokens": self.finetune_tokens,
            "planned_finetune": self.planned_finetune,
            "corun_units": self.corun_units,
            "corun_unit_s": round(self.corun_unit_s, 6),
            "last_plan": self.last_plan,
            "iteration_ms": {
                "last": self.last_iteration_ms,
                "p50": ms(self.measured_ms, 0.5),
                "p99": ms(self.measured_ms, 0.99),
            },
            "prediction_error": {
                "p50": ms(self.prediction_error, 0.5),
                "mean": (sum(self.prediction_error.values) / len(self.prediction_error.values))
                if self.prediction_error.values
                else None,
            },
            "policy_us": {"p50": ms(self.policy_us, 0.5), "p99": ms(self.policy_us, 0.99)},
        }
