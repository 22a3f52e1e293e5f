"""One simulated decode instance: the server's co-run loop and policy on a simulated clock."""

from __future__ import annotations

import numpy as np
import pytest

from sglang_harli.bench.instance import Instance, InstanceConfig
from sglang_harli.bench.machine import Machine
from sglang_harli.bench.trace import TraceRequest
from sglang_harli.config import Mode

from .helpers import profile, tiny_job, unit_truth_s

S = 0.015  # the objective: about twice a loaded decode iteration of the helpers' machine


@pytest.fixture(scope="module")
def job():
    return tiny_job()


def poisson(rate_per_s: float, duration_s: float, seed: int = 0) -> list[TraceRequest]:
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1 / rate_per_s, int(rate_per_s * duration_s * 2))
    times = np.cumsum(gaps)
    return [TraceRequest(float(t), 100, 40) for t in times[times < duration_s]]


QUANTUM = 0.1


def run(mode, job, arrivals, until_s=0.0, spread=True, budget_s=S, seed=0, idle_gap_s=None):
    config = InstanceConfig(
        mode=mode, objective_s=S, margin=0.05, budget_s=budget_s, idle_quantum_s=QUANTUM, seed=seed
    )
    p = profile(spread=spread, job=job, idle_gap_s=idle_gap_s)
    return Instance(config, Machine.from_profile(p, job.model), job, p).run(arrivals, until_s)


def idle_rate(job) -> float:
    """Target tokens per second of a job trained back to back on the deterministic machine:
    ``checkpoint_every`` steps (the checkpoint's units included) over their summed medians."""
    machine = Machine.from_profile(profile(spread=False, job=job), job.model)
    steps = job.steps(0)
    seconds = tokens = 0.0
    for _ in range(job.checkpoint_every):
        units, targets = next(steps)
        seconds += sum(machine.unit_s(kind, cost) for kind, cost in units)
        tokens += targets
    return tokens / seconds


@pytest.mark.parametrize("mode", [Mode.IDLE_ONLY, Mode.TIME_SLICED, Mode.HARLI])
def test_with_no_load_every_mode_trains_at_the_idle_rate(job, mode):
    result = run(mode, job, [], until_s=600.0, spread=False)
    assert result.simulated_s == pytest.approx(600.0, abs=0.2)
    assert result.idle_s == pytest.approx(result.simulated_s)
    assert result.decode_iterations == 0
    assert result.finetune_tokens / result.simulated_s == pytest.approx(idle_rate(job), rel=0.01)


def test_the_schedulers_time_between_idle_quanta_is_time_not_trained(job):
    gap = 0.05
    result = run(Mode.HARLI, job, [], until_s=600.0, spread=False, idle_gap_s=gap)
    ratio = result.finetune_tokens / result.simulated_s / idle_rate(job)
    # a quantum trains QUANTUM plus the overrun of its last unit, then waits gap
    units, _ = next(job.steps(0))
    longest_s = max(unit_truth_s(cost) for _, cost in units)
    assert QUANTUM / (QUANTUM + gap) <= ratio <= (QUANTUM + longest_s) / (QUANTUM + longest_s + gap)


def test_the_first_step_trained_before_the_trace_is_not_counted(job):
    result = run(Mode.HARLI, job, [], until_s=0.0, spread=False)
    assert (result.simulated_s, result.finetune_tokens, result.finetune_steps) == (0.0, 0, 0)


def test_off_trains_nothing_and_waits_for_requests(job):
    arrivals = [TraceRequest(10.0, 50, 5)]
    result = run(Mode.OFF, job, arrivals, until_s=60.0)
    assert result.finetune_tokens == 0 and result.simulated_s == 60.0
    assert (result.requests, result.requests_completed, result.decode_iterations) == (1, 1, 4)


def test_under_load_harli_keeps_the_objective_and_time_sliced_with_a_slice_of_s_misses(job):
    arrivals = poisson(4.0, 120.0)
    harli = run(Mode.HARLI, job, arrivals)
    sliced = run(Mode.TIME_SLICED, job, arrivals, budget_s=S)
    idle_only = run(Mode.IDLE_ONLY, job, arrivals)

    for r in (harli, sliced, idle_only):
        assert r.requests == r.requests_completed == len(arrivals)
        assert r.iterations > 1000
    assert harli.within_slo / harli.iterations >= 0.95
    assert sliced.within_slo / sliced.iterations <= 0.05  # every slice alone takes S
    assert idle_only.within_slo / idle_only.iterations >= 0.99  # decode alone fits S
    # harli harvests what idle-only leaves beside decode; time-sliced takes more, late
    assert idle_only.finetune_tokens < harli.finetune_tokens < sliced.finetune_tokens
    assert harli.finetune_s > 0 and harli.finetune_s <= harli.slack_s


def test_a_request_gets_its_first_token_after_its_prefill_and_one_token_per_decode(job):
    result = run(Mode.IDLE_ONLY, job, [TraceRequest(0.0, 100, 10)], spread=False)
    # one prefill (the first token), then nine decode iterations
    assert result.decode_iterations == 9
    assert result.gaps.total == 9 and result.gaps_within == 9
    assert result.ttft.total == 1
    assert result.requests_within == 1
