"""The simulated machine: medians and spreads drawn from a latency profile."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from sglang_harli.bench.machine import Machine, Spread
from sglang_harli.corun.controller import QUANTILE_LEVELS
from sglang_harli.corun.predictor import Predictor
from sglang_harli.corun.stats import DecodeStats

from .helpers import RATIOS, decode_truth_s, profile, tiny_job, unit_truth_s

RECORDED = Path(__file__).parents[2] / "data" / "cpu_profile.json"  # medians only


@pytest.fixture(scope="module")
def job():
    return tiny_job()


def test_medians_are_the_profiles(job):
    machine = Machine.from_profile(profile(), job.model)
    for stats in (DecodeStats(1, 40, 40), DecodeStats(6, 900, 200)):
        assert machine.decode_s(stats) == pytest.approx(decode_truth_s(stats), rel=1e-6)
    for kind, cost in [("forward", 3e7), ("backward", 9e7), ("optimizer", 8e5)]:
        assert machine.unit_s(kind, cost) == pytest.approx(unit_truth_s(cost), rel=1e-6)
    assert machine.tail_s == 5e-4


def test_draws_follow_the_rows_quantiles(job):
    machine = Machine.from_profile(profile(), job.model)
    assert machine.spread_source == "profile quantiles"
    rng = np.random.default_rng(0)
    for spread in (machine.decode_spread, machine.unit_spreads["backward"]):
        ratios = spread.draw(rng, 200_000)
        assert ratios.min() >= RATIOS[0] and ratios.max() <= RATIOS[-1]
        for level, ratio in zip(QUANTILE_LEVELS, RATIOS, strict=True):
            assert np.mean(ratios <= ratio) == pytest.approx(level, abs=0.005)


def test_rows_weigh_by_their_samples():
    rows = [
        {"seconds": 1.0, "quantiles": [1.0, 1.0], "n": 3},
        {"seconds": 1.0, "quantiles": [2.0, 2.0], "n": 1},
    ]
    ratios = Spread.of_rows(rows, [0.0, 1.0]).draw(np.random.default_rng(0), 40_000)
    assert np.mean(ratios == 2.0) == pytest.approx(0.25, abs=0.01)


def test_a_profile_without_spread_draws_its_medians(job):
    machine = Machine.from_profile(profile(spread=False), job.model)
    assert machine.spread_source.startswith("none")
    draws = machine.unit_draws("forward", np.random.default_rng(0))
    assert {draws() for _ in range(100)} == {1.0}


def test_a_recorded_profile_of_medians_takes_its_spread_from_corun_iterations(job):
    recorded = json.loads(RECORDED.read_text())
    machine = Machine.from_profile(recorded, job.model)
    assert "co-run iterations" in machine.spread_source
    truth = Predictor.from_profile(recorded)
    stats = DecodeStats(2, 120, 60)
    assert machine.decode_s(stats) == pytest.approx(truth.decode(stats))
    ratios = machine.decode_spread.draw(np.random.default_rng(0), 10_000)
    assert np.median(ratios) == pytest.approx(1.0, abs=0.02)
    assert ratios.max() > ratios.min()


def test_a_prefill_costs_more_with_more_prompt_tokens(job):
    machine = Machine.from_profile(profile(), job.model)
    one = machine.prefill_s([100])
    assert machine.decode_s(DecodeStats(0, 0, 0)) < one < machine.prefill_s([400])
    assert machine.prefill_s([100, 100]) > one


def test_a_unit_kind_the_profile_lacks_is_refused(job):
    bare = profile()
    bare["units"] = [u for u in bare["units"] if u["kind"] != "head"]
    with pytest.raises(ValueError, match="no 'head' units"):
        Machine.from_profile(bare, job.model).unit_s("head", 1e6)


def test_the_schedulers_time_between_idle_quanta_comes_from_the_profile(job):
    machine = Machine.from_profile(profile(idle_gap_s=0.02), job.model)
    assert machine.idle_gap_s == 0.02
    ratios = machine.idle_gap_spread.draw(np.random.default_rng(0), 10_000)
    assert ratios.min() >= RATIOS[0] and ratios.max() <= RATIOS[-1]
    assert Machine.from_profile(profile(), job.model).idle_gap_s == 0.0  # not measured: none


def test_prefills_are_fitted_on_the_measured_ones_when_the_profile_has_enough(job):
    def truth(requests, tokens):  # 20 ms, 5 ms a request, 0.1 ms a prompt token
        return 0.020 + 0.005 * requests + 1e-4 * tokens

    shapes = [(1, 90), (1, 500), (2, 300), (1, 250), (3, 900), (1, 40), (2, 700), (1, 510)]
    measured = profile()
    measured["prefill"] = [
        {"batch_size": b, "tokens": t, "seconds": truth(b, t) * (1.02 if i % 2 else 0.98)}
        for i, (b, t) in enumerate(shapes)
    ]
    machine = Machine.from_profile(measured, job.model)
    assert machine.prefill_s([512]) == pytest.approx(truth(1, 512), rel=0.03)
    assert machine.prefill_s([100, 300]) == pytest.approx(truth(2, 400), rel=0.03)
    ratios = machine.prefill_spread.draw(np.random.default_rng(0), 1000)
    assert 0.95 < ratios.min() <= ratios.max() < 1.05

    measured["prefill"] = measured["prefill"][:3]  # too few: from the forward units
    fallback = Machine.from_profile(measured, job.model)
    assert fallback.prefill_coef is None
    assert fallback.prefill_s([512]) != pytest.approx(truth(1, 512), rel=0.03)
