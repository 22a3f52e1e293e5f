"""Production request traces, scaled to the machine they are replayed or simulated on.

The Azure LLM inference traces of 2023 (``traces/``, CC-BY 4.0, see its README) give each
request's arrival time, prompt length and output length; the prompt text is not part of them.
A trace is replayed from a start offset for a duration, with its arrival rate multiplied by
``rate_scale`` (the inter-arrival gaps divided by it) and its lengths capped, so that a
one-hour trace of a large deployment becomes a few minutes of load a small instance can serve.
Scaling keeps the trace's burstiness: the same requests arrive in the same order with the same
relative gaps.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import math
from datetime import datetime
from functools import cache
from pathlib import Path

TRACES_DIR = Path(__file__).parent / "traces"
TRACES = {
    "conv": "AzureLLMInferenceTrace_conv.csv",  # conversation service
    "code": "AzureLLMInferenceTrace_code.csv",  # code completion service
}


@dataclasses.dataclass(frozen=True)
class TraceRequest:
    arrival_s: float  # since the start of the replay
    context_tokens: int
    output_tokens: int


@dataclasses.dataclass(frozen=True)
class TraceScaling:
    """How a trace is cut and scaled (recorded in every report, so a figure can be redone)."""

    trace: str = "conv"
    rate_scale: float = 1.0  # arrival rate multiplier: gaps are divided by it
    duration_s: float = 60.0  # of the replay, after scaling
    start_s: float = 0.0  # offset into the original trace
    max_context_tokens: int = 512
    max_output_tokens: int = 128

    def __post_init__(self) -> None:
        if self.trace not in TRACES:
            raise ValueError(f"unknown trace {self.trace!r}: one of {', '.join(TRACES)}")
        # NaN passes every comparison below and an infinite duration never ends a replay
        for name in ("rate_scale", "duration_s", "start_s"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number, got {getattr(self, name)}")
        for name in ("rate_scale", "duration_s", "max_context_tokens", "max_output_tokens"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive")
        if self.start_s < 0:
            raise ValueError("start_s must be >= 0")


@cache
def _load(trace: str) -> tuple[TraceRequest, ...]:
    """The whole trace as recorded: arrivals in seconds since its first request."""
    with open(TRACES_DIR / TRACES[trace], newline="") as f:
        rows = list(csv.DictReader(f))
    # timestamps have 7 fractional digits; datetime takes 6
    times = [datetime.fromisoformat(row["TIMESTAMP"][:26]) for row in rows]
    t0 = times[0]
    return tuple(
        TraceRequest(
            (t - t0).total_seconds(), int(row["ContextTokens"]), int(row["GeneratedTokens"])
        )
        for t, row in zip(times, rows, strict=True)
    )


def load_trace(scaling: TraceScaling) -> list[TraceRequest]:
    """The requests of ``scaling``'s window, arrivals relative to its start, lengths capped."""
    out = []
    for r in _load(scaling.trace):
        if r.arrival_s < scaling.start_s:
            continue
        arrival = (r.arrival_s - scaling.start_s) / scaling.rate_scale
        if arrival >= scaling.duration_s:
            break
        out.append(
            TraceRequest(
                arrival,
                max(1, min(r.context_tokens, scaling.max_context_tokens)),
                max(1, min(r.output_tokens, scaling.max_output_tokens)),
            )
        )
    return out


def rate_scale_for(scaling: TraceScaling, offered_rps: float) -> float:
    """The rate scale at which ``scaling``'s window (its start, its duration) offers
    ``offered_rps`` on average: it holds the trace's next ``N = round(offered_rps x duration)``
    requests (at least one), and the scale puts the window's end halfway between the N-th
    arrival and the one after it, so the count does not hang on a rounding error. Arrivals
    that share a timestamp stay together (the window then holds a few more). The window keeps
    its own stretch of the trace, bursts and lulls alike: ``N / duration`` is its mean rate."""
    if not (math.isfinite(offered_rps) and offered_rps > 0):
        raise ValueError(f"the offered rate must be a positive number, got {offered_rps}")
    arrivals = [r.arrival_s for r in _load(scaling.trace) if r.arrival_s >= scaling.start_s]
    n = max(1, round(offered_rps * scaling.duration_s))
    while n < len(arrivals) and arrivals[n] == arrivals[n - 1]:
        n += 1
    if n >= len(arrivals):
        raise ValueError(
            f"the {scaling.trace} trace has {len(arrivals)} requests after start_s "
            f"{scaling.start_s:g}; {offered_rps:.3g} requests/s for {scaling.duration_s:g} s "
            "needs more: shorten the duration or start earlier"
        )
    end = (arrivals[n - 1] + arrivals[n]) / 2
    return (end - scaling.start_s) / scaling.duration_s


def mean_lengths(scaling: TraceScaling, count: int = 200) -> tuple[float, float]:
    """The mean capped context and output lengths of the trace's first ``count`` requests from
    ``scaling.start_s`` on: the shape of a request before the rate scale (which decides which
    requests a window holds) is known."""
    requests = [r for r in _load(scaling.trace) if r.arrival_s >= scaling.start_s][:count]
    if not requests:
        raise ValueError(f"no request of the {scaling.trace} trace after {scaling.start_s:g} s")
    contexts = [max(1, min(r.context_tokens, scaling.max_context_tokens)) for r in requests]
    outputs = [max(1, min(r.output_tokens, scaling.max_output_tokens)) for r in requests]
    return sum(contexts) / len(contexts), sum(outputs) / len(outputs)


def trace_duration_s(trace: str) -> float:
    """How long the recorded trace lasts, unscaled."""
    return _load(trace)[-1].arrival_s


def add_trace_arguments(
    parser: argparse.ArgumentParser, rate_scale_help: str | None = None
) -> None:
    """TraceScaling's fields as flags (the replay's and the simulation's)."""
    defaults = TraceScaling()
    parser.add_argument("--trace", default=defaults.trace, help="conv or code (Azure 2023)")
    parser.add_argument(
        "--rate-scale",
        type=float,
        default=defaults.rate_scale,
        help=rate_scale_help or "arrival rate multiplier: the trace's gaps are divided by it",
    )
    parser.add_argument("--duration-s", type=float, default=defaults.duration_s)
    parser.add_argument("--start-s", type=float, default=defaults.start_s)
    parser.add_argument("--max-context-tokens", type=int, default=defaults.max_context_tokens)
    parser.add_argument("--max-output-tokens", type=int, default=defaults.max_output_tokens)


def scaling_of(args: argparse.Namespace) -> TraceScaling:
    """The TraceScaling the flags of :func:`add_trace_arguments` give."""
    return TraceScaling(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TraceScaling)})
