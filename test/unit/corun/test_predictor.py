"""The two-stage latency predictor on synthetic surfaces whose truth is known (helpers.py)."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from sglang_harli.corun.predictor import (
    DEFAULT_ALPHA,
    MIN_SAMPLES,
    PROFILE_FORMAT,
    REFIT_EVERY,
    Interference,
    Predictor,
    ProfileKey,
    Stage1,
    UnitRate,
    features,
    iterations_to_heal,
    load_profile,
    nnls,
)
from sglang_harli.corun.stats import DecodeStats

from .helpers import (
    KEY,
    TRUE_COEF,
    TRUE_UNITS,
    UNIT_COSTS,
    fitted_predictor,
    flat_predictor,
    grid,
    linear,
    mape,
    noisy,
    piecewise,
    profile,
    random_shapes,
    samples,
    unit_seconds,
)

HELD_OUT = random_shapes(seed=99, n=300)
DENSE_GRID = grid(batches=range(1, 33))  # every batch size, as a profiler sweeps them


def relative_errors(predict, truth, shapes=HELD_OUT) -> list[float]:
    return [abs(predict(s) - truth(s)) / truth(s) for s in shapes]


# --- stage 1: fits ---------------------------------------------------------------------------


def test_stage1_fit_recovers_a_linear_surface_within_1_percent():
    """Noiseless grid: held-out shapes (unequal request lengths) are predicted within 1%."""
    stage1 = Stage1()
    stage1.fit(samples(grid()))

    assert mape(stage1.predict, samples(HELD_OUT)) < 0.01
    assert stage1.coef[-1] == pytest.approx(TRUE_COEF, rel=1e-6, abs=1e-12)


def test_from_profile_predicts_held_out_shapes_within_1_percent():
    """The same surface loaded as a profile: Predictor.decode matches the truth."""
    predictor = Predictor.from_profile(profile(grid()))

    assert mape(predictor.decode, samples(HELD_OUT)) < 0.01
    assert "profile of tiny on cpu" in predictor.source
    assert predictor.to_dict()["ready"] is True


@pytest.mark.parametrize("seed", range(3))
def test_stage1_fit_within_5_percent_with_2_percent_noise(seed):
    """2% multiplicative noise on both the profile and the held-out measurements."""
    stage1 = Stage1()
    stage1.fit(samples(DENSE_GRID, sigma=0.02, seed=seed))

    assert mape(stage1.predict, samples(HELD_OUT, sigma=0.02, seed=1000 + seed)) < 0.05
    assert mape(stage1.predict, samples(HELD_OUT)) < 0.02  # and close to the truth itself


def test_piecewise_surface_is_fitted_per_batch_size_regime():
    """A regime change above batch 8: with buckets=(8,) each regime gets its own coefficients."""
    stage1 = Stage1(buckets=(8,))
    stage1.fit(samples(grid(), piecewise))

    assert mape(stage1.predict, samples(HELD_OUT, piecewise)) < 0.01
    assert stage1.regime(DecodeStats(8, 800, 100)) == 0
    assert stage1.regime(DecodeStats(9, 900, 100)) == 1
    assert stage1.coef[0] == pytest.approx([2e-3, 1e-4, 1e-6, 0.0], rel=1e-6, abs=1e-12)
    assert stage1.coef[1] == pytest.approx([3e-3, 5e-5, 1e-6, 0.0], rel=1e-6, abs=1e-12)

    one_regime = Stage1()
    one_regime.fit(samples(grid(), piecewise))
    assert mape(one_regime.predict, samples(HELD_OUT, piecewise)) > 0.01  # the buckets matter


def test_profile_buckets_are_used_by_from_profile():
    """A profile that names its buckets is fitted piecewise."""
    predictor = Predictor.from_profile(profile(grid(), piecewise, buckets=(8,)))

    assert predictor.stage1.buckets == (8,)
    assert mape(predictor.decode, samples(HELD_OUT, piecewise)) < 0.01


@pytest.mark.parametrize("seed", range(3))
def test_piecewise_fit_within_5_percent_with_2_percent_noise(seed):
    stage1 = Stage1(buckets=(8,))
    stage1.fit(samples(DENSE_GRID, piecewise, sigma=0.02, seed=seed))

    assert mape(stage1.predict, samples(HELD_OUT, piecewise, sigma=0.02, seed=1000 + seed)) < 0.05


def test_nnls_clamps_a_negative_slope_to_zero():
    """A falling trend would need a negative cost: the fit keeps it at 0 and refits the rest."""
    coef = nnls([[1.0, 0.0], [1.0, 1.0], [1.0, 2.0]], [2.0, 1.0, 0.0])

    assert coef == pytest.approx([1.0, 0.0], abs=1e-12)


def test_noisy_fit_never_gives_a_negative_coefficient_where_least_squares_would():
    """Truth has 0 per longest sequence; with noise plain least squares goes negative there."""
    rows = samples(grid(), sigma=0.02, seed=3)
    a = np.array([features(s) for s, _ in rows])
    y = np.array([t for _, t in rows])
    unconstrained = np.linalg.lstsq(a, y, rcond=None)[0]
    assert unconstrained[3] < 0  # the case this test is about

    stage1 = Stage1(buckets=(8,))
    stage1.fit(rows)
    for coef in stage1.coef.values():
        assert min(coef) >= 0.0
    assert mape(stage1.predict, samples(HELD_OUT)) < 0.05
    assert all(stage1.predict(s) > 0 for s in HELD_OUT)


# --- online correction -----------------------------------------------------------------------


def test_iterations_to_heal_values():
    """Measured/predicted = k: the residual reaches 5% after ceil(log(.05/|1/k-1|)/log(.75))."""
    assert DEFAULT_ALPHA == 0.25
    assert iterations_to_heal(2.0) == 9  # truth twice the profile: 0.5 * 0.75**9 < 0.05
    assert iterations_to_heal(0.5) == 11  # truth half the profile: 1.0 * 0.75**11 < 0.05
    assert iterations_to_heal(1.03) == 0
    assert iterations_to_heal(2.0, alpha=0.5) < iterations_to_heal(2.0)


@pytest.mark.parametrize(("truth_over_profile", "heals_after"), [(2.0, 9), (0.5, 11)])
def test_a_profile_wrong_by_2x_heals_online(truth_over_profile, heals_after):
    """The profile is off by 2x (either way): after iterations_to_heal(k) measured iterations
    every prediction is within 5%; after 3 it is not, nor one iteration before."""
    assert iterations_to_heal(truth_over_profile) == heals_after

    def truth(s):
        return truth_over_profile * linear(s)

    predictor = Predictor.from_profile(profile(grid(), linear))
    observed = iter(random_shapes(seed=7, n=heals_after))

    def observe(n):
        for _ in range(n):
            s = next(observed)
            predictor.observe_decode(s, truth(s))

    assert min(relative_errors(predictor.decode, truth)) > 0.3  # wrong at the start
    observe(3)
    assert max(relative_errors(predictor.decode, truth)) > 0.05
    observe(heals_after - 1 - 3)
    assert max(relative_errors(predictor.decode, truth)) > 0.05
    observe(1)
    assert max(relative_errors(predictor.decode, truth)) < 0.05
    assert predictor.stage1.coef[-1] == pytest.approx(TRUE_COEF, rel=1e-6, abs=1e-12)  # form kept


def test_residuals_are_per_regime():
    """Iterations of small batches correct small batches only."""
    predictor = Predictor.from_profile(profile(grid(), piecewise, buckets=(8,)))
    small, large = DecodeStats(4, 4000, 1000), DecodeStats(16, 16000, 1000)
    for _ in range(20):
        predictor.observe_decode(small, 2 * piecewise(small))

    assert predictor.decode(small) == pytest.approx(2 * piecewise(small), rel=0.01)
    assert predictor.decode(large) == pytest.approx(piecewise(large), rel=1e-6)


# --- learning without a profile --------------------------------------------------------------


def test_without_a_profile_nothing_is_predicted_until_min_samples():
    """Predictor() answers None for MIN_SAMPLES - 1 iterations, then predicts within 5%."""
    predictor = Predictor()
    shapes = random_shapes(seed=1, n=MIN_SAMPLES)
    for s in shapes[:-1]:
        predictor.observe_decode(s, linear(s))
        assert predictor.decode(s) is None
    assert predictor.to_dict()["ready"] is False

    predictor.observe_decode(shapes[-1], linear(shapes[-1]))
    assert predictor.to_dict()["ready"] is True
    assert max(relative_errors(predictor.decode, linear)) < 0.05


def test_learning_with_noise_predicts_within_5_percent():
    rng = random.Random(5)
    predictor = Predictor()
    for s in random_shapes(seed=2, n=200):
        predictor.observe_decode(s, noisy(linear(s), rng, 0.02))

    assert mape(predictor.decode, samples(HELD_OUT)) < 0.05


def test_learning_refits_every_refit_every_iterations():
    """Once fitted, the coefficients change only every REFIT_EVERY iterations, and the refits
    follow a surface that changed its form (per-token cost doubled), not just its scale."""
    predictor = Predictor()
    shapes = iter(random_shapes(seed=3, n=MIN_SAMPLES + 10 * REFIT_EVERY))
    for _ in range(MIN_SAMPLES):
        s = next(shapes)
        predictor.observe_decode(s, linear(s))
    first_fit = predictor.to_dict()["stage1_coefficients"]

    def changed(s):
        return linear(s, [2e-3, 1e-4, 2e-6, 0.0])

    for _ in range(REFIT_EVERY - 1):
        s = next(shapes)
        predictor.observe_decode(s, changed(s))
    assert predictor.to_dict()["stage1_coefficients"] == first_fit
    assert predictor.to_dict()["stage1_residuals"] != {}  # corrected online meanwhile

    s = next(shapes)
    predictor.observe_decode(s, changed(s))
    refit = predictor.to_dict()["stage1_coefficients"]
    assert refit != first_fit
    assert refit["-1"][2] > first_fit["-1"][2]  # per-token cost moved towards the new truth
    assert predictor.to_dict()["stage1_residuals"] == {}  # the refit absorbed them

    for _ in range(7 * REFIT_EVERY):  # seven more refits; the last one just happened
        s = next(shapes)
        predictor.observe_decode(s, changed(s))
    assert predictor.to_dict()["stage1_residuals"] == {}
    assert mape(predictor.decode, samples(HELD_OUT, changed)) < 0.05  # the fit alone


def test_a_profile_predictor_keeps_its_form():
    """A profile's coefficients are corrected by residuals, never refitted online."""
    predictor = Predictor.from_profile(profile(grid()))
    before = predictor.to_dict()["stage1_coefficients"]
    for s in random_shapes(seed=4, n=3 * REFIT_EVERY):
        predictor.observe_decode(s, linear(s, [2e-3, 1e-4, 2e-6, 0.0]))

    assert predictor.to_dict()["stage1_coefficients"] == before


# --- stage 2 on a CPU: unit durations --------------------------------------------------------


def test_unit_of_one_size_learns_its_duration():
    """A kind always run at one cost: its measured duration, scaled by cost for other sizes."""
    predictor = Predictor()
    for seconds in (1.1e-3, 1.2e-3, 1.3e-3):
        predictor.observe_unit("forward", 1e6, seconds)

    assert predictor.unit("forward", 1e6) == pytest.approx(1.2e-3, rel=0.1)
    assert predictor.unit("forward", 2e6) == pytest.approx(2.4e-3, rel=0.1)
    assert predictor.unit("backward", 1e6) is None


def test_unit_rate_fit_learns_overhead_and_rate():
    rate = UnitRate()
    rate.fit([(c, unit_seconds("forward", c)) for c in (1e5, 5e5, 1e6, 4e6)])

    assert rate.overhead_s == pytest.approx(TRUE_UNITS["forward"][0], rel=1e-6)
    assert rate.seconds_per_cost == pytest.approx(TRUE_UNITS["forward"][1], rel=1e-6)
    assert rate.predict(2e6) == pytest.approx(unit_seconds("forward", 2e6), rel=1e-6)


def test_units_of_varying_sizes_are_learned_online_with_their_overhead():
    """Measured units of random sizes (1% noise): after a few refits, held-out costs are
    predicted within 3%, the fixed overhead included (a pure rate would be 10% off)."""
    rng = random.Random(0)
    predictor = Predictor()
    for _ in range(4 * REFIT_EVERY + 1):
        cost = rng.uniform(1e5, 4e6)
        predictor.observe_unit("backward", cost, noisy(unit_seconds("backward", cost), rng, 0.01))

    for cost in np.linspace(1e5, 4e6, 20):
        assert predictor.unit("backward", cost) == pytest.approx(
            unit_seconds("backward", cost), rel=0.03
        )
    assert predictor.unit("optimizer", 1e6) is None


def test_profile_units_predict_every_kind():
    predictor = fitted_predictor()
    for kind in TRUE_UNITS:
        for cost in (2e5, 3e6):
            assert predictor.unit(kind, cost) == pytest.approx(unit_seconds(kind, cost), rel=1e-6)
    assert predictor.unit("validation", 1e6) is None
    assert set(predictor.to_dict()["unit_seconds_per_gflop"]) == set(TRUE_UNITS)


def test_corun_cpu_is_decode_plus_units_within_10_percent():
    """Held-out co-run iterations (decode + 1..5 units, 2% noise) are predicted within 10%."""
    predictor = fitted_predictor()
    rng = random.Random(11)
    kinds = sorted(TRUE_UNITS)
    for s in random_shapes(seed=12, n=100):
        units = [(rng.choice(kinds), rng.uniform(1e5, 4e6)) for _ in range(rng.randint(1, 5))]
        measured = noisy(linear(s) + sum(unit_seconds(k, c) for k, c in units), rng, 0.02)

        predicted = predictor.corun_cpu(s, units)
        assert predicted == pytest.approx(measured, rel=0.10)
        assert predicted == pytest.approx(
            predictor.decode(s) + sum(predictor.unit(k, c) for k, c in units)
        )
    assert predictor.corun_cpu(HELD_OUT[0], []) == pytest.approx(predictor.decode(HELD_OUT[0]))


def test_corun_cpu_is_none_for_an_unknown_kind_or_an_unready_stage1():
    assert fitted_predictor().corun_cpu(HELD_OUT[0], [("forward", 1e6), ("new", 1e6)]) is None
    learning = Predictor()
    learning.observe_unit("forward", 1e6, 1e-3)
    assert learning.corun_cpu(HELD_OUT[0], [("forward", 1e6)]) is None


# --- stage 2 on a GPU: interference ----------------------------------------------------------

TABLE = {
    "forward": {0.25: 0.1, 0.5: 0.3, 1.0: 0.8},
    "backward": {0.25: 0.2, 0.5: 0.5, 1.0: 1.2},
}


def test_slowdown_is_interpolated_between_measured_shares():
    interference = Interference(TABLE)

    assert interference.slowdown("forward", 0.0) == pytest.approx(0.0)
    assert interference.slowdown("forward", 0.125) == pytest.approx(0.05)  # from 0 at share 0
    assert interference.slowdown("forward", 0.25) == pytest.approx(0.1)
    assert interference.slowdown("forward", 0.375) == pytest.approx(0.2)
    assert interference.slowdown("forward", 0.75) == pytest.approx(0.55)
    assert interference.slowdown("forward", 1.0) == pytest.approx(0.8)
    assert interference.slowdown("unknown", 0.5) is None


def test_interference_factor_takes_the_worst_kind():
    interference = Interference(TABLE)

    assert interference.factor(["forward"], 0.5) == pytest.approx(1.3)
    assert interference.factor(["forward", "backward"], 0.5) == pytest.approx(1.5)
    assert interference.factor(["backward", "forward", "forward"], 0.75) == pytest.approx(1.85)
    assert interference.factor(["forward", "unknown"], 0.5) is None
    assert interference.factor([], 0.5) is None


def test_corun_gpu_multiplies_solo_decode():
    predictor = flat_predictor(0.010)
    predictor.interference = Interference(TABLE)
    s = DecodeStats(4, 400, 100)

    assert predictor.corun_gpu(s, ["forward"], 0.5) == pytest.approx(0.013)
    assert predictor.corun_gpu(s, ["forward", "backward"], 0.25) == pytest.approx(0.012)
    assert predictor.corun_gpu(s, ["unknown"], 0.5) is None
    assert Predictor(interference=Interference(TABLE)).corun_gpu(s, ["forward"], 0.5) is None


def test_interference_from_profile():
    rows = [(k, share, slow) for k, points in TABLE.items() for share, slow in points.items()]
    predictor = Predictor.from_profile(profile(grid(), interference=rows))
    s = DecodeStats(4, 400, 100)

    assert predictor.corun_gpu(s, ["backward"], 0.5) == pytest.approx(1.5 * linear(s))


# --- profiles on disk ------------------------------------------------------------------------


def server_key(**changes) -> ProfileKey:
    return ProfileKey(**{**KEY, **changes})


def write(tmp_path, data, name="profile.json"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def test_a_profile_of_this_server_loads(tmp_path):
    path = write(tmp_path, profile(grid(), units=UNIT_COSTS))
    loaded, reason = load_profile(path, server_key())

    assert loaded is not None
    assert reason == f"loaded profile {path}"
    assert Predictor.from_profile(loaded).decode(HELD_OUT[0]) == pytest.approx(linear(HELD_OUT[0]))


@pytest.mark.parametrize(
    "other",
    [{"model": "other-model"}, {"device": "cuda:H100"}, {"dtype": "bfloat16"}, {"tp_size": 2}],
)
def test_a_profile_of_another_kind_of_server_is_refused(tmp_path, other):
    path = write(tmp_path, profile(grid()))
    loaded, reason = load_profile(path, server_key(**other))

    assert loaded is None
    assert "was measured on" in reason and "learning online" in reason


def test_a_missing_profile_is_refused(tmp_path):
    loaded, reason = load_profile(tmp_path / "nope.json", server_key())
    assert loaded is None
    assert "unreadable" in reason


def test_malformed_json_is_refused(tmp_path):
    loaded, reason = load_profile(write(tmp_path, '{"format": "sglang-harli'), server_key())
    assert loaded is None
    assert "unreadable" in reason


@pytest.mark.parametrize("data", [{**profile(grid()), "format": "other/1"}, [1, 2], "null"])
def test_a_file_of_another_format_is_refused(tmp_path, data):
    loaded, reason = load_profile(write(tmp_path, data), server_key())
    assert loaded is None
    assert f"not a {PROFILE_FORMAT} file" in reason


@pytest.mark.parametrize(
    "changes",
    [
        {"key": None},
        {"key": "tiny"},
        {"key": {"model": "tiny"}},
        {"key": {**KEY, "tp_size": "two"}},
        {"decode": []},
        {"decode": None},
        {"decode": 5},
        {"decode": [{"batch_size": 1, "seq_lens_sum": 10}]},
        {"decode": [{"batch_size": "x", "seq_lens_sum": 1, "seq_len_max": 1, "seconds": 1}]},
        {"units": [{"kind": "forward", "seconds": 1e-3}]},
        {"interference": [{"kind": "forward", "share": "half", "slowdown": 0.1}]},
    ],
    ids=lambda changes: json.dumps(changes)[:40],
)
def test_a_malformed_profile_is_refused_not_raised(tmp_path, changes):
    """Whatever is wrong inside, load_profile answers (None, reason): the server then learns
    online instead of failing in Predictor.from_profile."""
    data = {**profile(grid(), units=UNIT_COSTS), **changes}
    loaded, reason = load_profile(write(tmp_path, data), server_key())

    assert loaded is None
    assert "malformed" in reason
