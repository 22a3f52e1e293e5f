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


def trace_duration_s(trace: str) -> float:
    """How long the recorded trace lasts, unscaled."""
    return _load(trace)[-1].arrival_s


def add_trace_arguments(parser: argparse.ArgumentParser) -> None:
    """TraceScaling's fields as flags (the replay's and the simulation's)."""
    defaults = TraceScaling()
    parser.add_argument("--trace", default=defaults.trace, help="conv or code (Azure 2023)")
    parser.add_argument("--rate-scale", type=float, default=defaults.rate_scale)
    parser.add_argument("--duration-s", type=float, default=defaults.duration_s)
    parser.add_argument("--start-s", type=float, default=defaults.start_s)
    parser.add_argument("--max-context-tokens", type=int, default=defaults.max_context_tokens)
    parser.add_argument("--max-output-tokens", type=int, default=defaults.max_output_tokens)


def scaling_of(args: argparse.Namespace) -> TraceScaling:
    """The TraceScaling the flags of :func:`add_trace_arguments` give."""
    return TraceScaling(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TraceScaling)})
