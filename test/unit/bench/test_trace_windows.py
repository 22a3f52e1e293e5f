"""The arrivals each simulated instance sees: the replay's window, offsets, wrapping around."""

from __future__ import annotations

import dataclasses

import pytest

from sglang_harli.bench.simulate import instance_arrivals, trace_period_s
from sglang_harli.bench.trace import TraceScaling, load_trace, trace_duration_s

LENGTH = trace_period_s("conv")  # one pass of the recorded trace, unscaled (about an hour)


def test_a_pass_of_the_trace_lasts_its_span_and_one_mean_gap():
    everything = load_trace(TraceScaling(duration_s=1e12))
    span = trace_duration_s("conv")
    assert everything[-1].arrival_s == span < LENGTH
    assert LENGTH - span == pytest.approx(span / (len(everything) - 1))


def test_a_window_inside_the_trace_is_the_replays_window():
    scaling = TraceScaling(rate_scale=0.5, duration_s=60.0, start_s=30.0)
    assert instance_arrivals(scaling, scaling.start_s) == load_trace(scaling)


def test_an_offset_starts_that_far_into_the_trace():
    scaling = TraceScaling(rate_scale=2.0, duration_s=30.0)
    offset = LENGTH / 4
    arrivals = instance_arrivals(scaling, offset)
    assert arrivals == load_trace(dataclasses.replace(scaling, start_s=offset))
    assert arrivals != load_trace(scaling)


def test_a_window_longer_than_the_trace_wraps_around_to_its_start():
    rate = 100.0  # the hour of trace lasts LENGTH / 100 s scaled
    period = LENGTH / rate
    scaling = TraceScaling(rate_scale=rate, duration_s=2.5 * period)
    arrivals = instance_arrivals(scaling, 0.0)
    once = load_trace(dataclasses.replace(scaling, duration_s=period))

    assert [a.arrival_s for a in arrivals] == sorted(a.arrival_s for a in arrivals)
    assert arrivals[-1].arrival_s < scaling.duration_s
    # each pass is the same requests, shifted by one period: same lengths, same gaps
    second = [a for a in arrivals if period <= a.arrival_s < 2 * period]
    assert [(a.context_tokens, a.output_tokens) for a in second] == [
        (a.context_tokens, a.output_tokens) for a in once
    ]
    assert [a.arrival_s - period for a in second] == pytest.approx([a.arrival_s for a in once])
    # two and a half passes
    assert len(arrivals) == pytest.approx(2.5 * len(once), rel=0.05)


def test_a_late_offset_wraps_to_the_traces_start():
    scaling = TraceScaling(rate_scale=1.0, duration_s=120.0)
    offset = LENGTH - 60.0  # the last minute of the trace, then its first minute
    arrivals = instance_arrivals(scaling, offset)
    tail = load_trace(dataclasses.replace(scaling, start_s=offset))
    head = load_trace(dataclasses.replace(scaling, duration_s=60.0))

    assert arrivals[: len(tail)] == tail
    wrapped = arrivals[len(tail) :]
    assert [(a.context_tokens, a.output_tokens) for a in wrapped] == [
        (a.context_tokens, a.output_tokens) for a in head
    ]
    shift = LENGTH - offset
    assert [a.arrival_s - shift for a in wrapped] == pytest.approx([a.arrival_s for a in head])
