"""The co-run policies: what each plans beside a decode iteration, and what it admits."""

from __future__ import annotations

import random

import pytest

from sglang_harli.config import Mode
from sglang_harli.corun.policy import (
    HOLD_DOWN,
    HOLD_UP,
    MAX_HOLD,
    MIN_BACKOFF,
    PROBE_FRACTION,
    RECOVERY_STEP,
    HarliPolicy,
    IdleOnlyPolicy,
    Iteration,
    Plan,
    TimeSlicedPolicy,
    make_policy,
)
from sglang_harli.corun.predictor import MIN_SAMPLES, Interference, Predictor
from sglang_harli.corun.stats import DecodeStats

from .helpers import TRUE_UNITS, fitted_predictor, flat_predictor, linear, random_shapes

S = 0.050  # the TPOT objective of these tests
MARGIN = 0.1
SHAPE = DecodeStats(8, 8000, 1000)  # linear(SHAPE) = 10.8 ms
HUGE = DecodeStats(32, 65536, 2048)  # linear(HUGE) = 70.7 ms, over the objective

TABLE = {
    "forward": {0.25: 0.1, 0.5: 0.3, 1.0: 0.8},
    "backward": {0.25: 0.2, 0.5: 0.5, 1.0: 1.2},
}
LADDER = [66, 132, 33, 99]  # out of order on purpose
TOTAL_SMS = 132


def harli(predictor: Predictor | None = None, objective_s=S, margin=MARGIN) -> HarliPolicy:
    return HarliPolicy(objective_s, 0.1, predictor or fitted_predictor(), margin)


def on_time(policy: HarliPolicy, plan: Plan, stats=SHAPE) -> Iteration:
    """The iteration as planned: predicted decode plus the whole budget."""
    return Iteration(stats, plan, plan.predicted_decode_s + plan.budget_s, plan.budget_s)


def missed(policy: HarliPolicy, plan: Plan, stats=SHAPE) -> Iteration:
    """Decode as predicted, but a finetune unit overran the objective by 20%."""
    total = 1.2 * policy.objective_s
    return Iteration(stats, plan, total, total - plan.predicted_decode_s)


# --- harli: the time slice -------------------------------------------------------------------


def test_harli_budget_is_the_target_minus_predicted_decode():
    """budget = S * (1 - margin) - predicted decode."""
    plan = harli().plan(SHAPE)

    assert plan.predicted_decode_s == pytest.approx(linear(SHAPE))
    assert plan.budget_s == pytest.approx(S * (1 - MARGIN) - linear(SHAPE))
    assert plan.budget_s == pytest.approx(0.0342)
    assert plan.runs_finetune
    assert plan.reason == "slack"


@pytest.mark.parametrize("decode_s", [0.047, 0.050, 0.2])
def test_harli_pauses_when_predicted_decode_leaves_no_slack(decode_s):
    """Decode predicted above S * (1 - margin) (even below S itself): no finetune, 'paused'."""
    plan = harli(flat_predictor(decode_s)).plan(SHAPE)

    assert plan.budget_s == 0.0
    assert not plan.runs_finetune
    assert plan.reason.startswith("paused")
    assert plan.predicted_decode_s == pytest.approx(decode_s)


def test_harli_pauses_for_a_batch_predicted_over_the_objective():
    plan = harli().plan(HUGE)
    assert linear(HUGE) > S
    assert (plan.budget_s, plan.reason.split(":")[0]) == (0.0, "paused")


def test_harli_plans_nothing_while_the_predictor_learns():
    plan = harli(Predictor()).plan(SHAPE)

    assert plan.budget_s == 0.0
    assert plan.predicted_decode_s is None
    assert plan.reason.startswith("learning")


def test_harli_never_admits_a_unit_predicted_not_to_fit():
    """Random (spent, kind, cost): admitted exactly when spent + predicted unit <= budget."""
    policy = harli()
    plan = policy.plan(SHAPE)
    rng = random.Random(0)
    admitted = refused = 0
    for _ in range(2000):
        kind = rng.choice(sorted(TRUE_UNITS))
        cost = rng.uniform(1e5, 2e7)
        spent = rng.choice([0.0, rng.uniform(0.0, plan.budget_s)])
        unit_s = policy.predictor.unit(kind, cost)
        if policy.admit(plan, spent, kind, cost):
            admitted += 1
            assert spent + unit_s <= plan.budget_s
        else:
            refused += 1
            assert spent + unit_s > plan.budget_s
    assert admitted > 100 and refused > 100  # both sides were exercised


def test_harli_slice_filled_greedily_stays_within_budget():
    """Units admitted one after another (as the runner does) never overrun the budget."""
    policy = harli()
    rng = random.Random(1)
    shapes, ran = random_shapes(seed=2, n=50, max_batch=16), 0
    for stats in shapes:
        plan = policy.plan(stats)
        spent = 0.0
        while True:
            kind, cost = rng.choice(sorted(TRUE_UNITS)), rng.uniform(1e5, 8e6)
            if not policy.admit(plan, spent, kind, cost):
                break
            spent += policy.predictor.unit(kind, cost)
            ran += 1
        assert spent <= plan.budget_s
    assert ran > 2 * len(shapes)  # slices were filled, not refused


def test_an_unknown_unit_kind_runs_only_as_the_first_unit_of_a_large_slice():
    """A kind never measured: admitted at spent_s == 0.0 when budget >= PROBE_FRACTION * S."""
    large = harli(flat_predictor(0.010), margin=0.0)  # budget 40 ms >= 25 ms
    plan = large.plan(SHAPE)
    assert plan.budget_s >= PROBE_FRACTION * S

    assert large.admit(plan, 0.0, "validation", 1e6)
    assert not large.admit(plan, 1e-6, "validation", 1e6)
    assert not large.admit(plan, 0.001, "validation", 1.0)

    small = harli(flat_predictor(0.030), margin=0.0)  # budget 20 ms < 25 ms
    small_plan = small.plan(SHAPE)
    assert 0 < small_plan.budget_s < PROBE_FRACTION * S
    assert not small.admit(small_plan, 0.0, "validation", 1.0)


def test_a_measured_miss_halves_the_next_budget():
    policy = harli()
    full = policy.plan(SHAPE)

    policy.feedback(missed(policy, full))
    after_one = policy.plan(SHAPE)
    assert after_one.budget_s <= full.budget_s / 2 + 1e-12
    assert after_one.budget_s == pytest.approx(full.budget_s / 2)
    assert after_one.reason == "backing off"

    policy.feedback(missed(policy, after_one))
    assert policy.plan(SHAPE).budget_s == pytest.approx(full.budget_s / 4)
    assert policy.to_dict()["misses"] == 2


def test_backoff_has_a_floor():
    policy = harli()
    full = policy.plan(SHAPE).budget_s
    for _ in range(20):
        policy.feedback(missed(policy, policy.plan(SHAPE)))

    assert policy.plan(SHAPE).budget_s == pytest.approx(full * MIN_BACKOFF)


def test_after_a_miss_the_budget_recovers_gradually():
    """Not in one on-time iteration; back to full after 1/RECOVERY_STEP on-time iterations."""
    policy = harli()
    full = policy.plan(SHAPE).budget_s
    policy.feedback(missed(policy, policy.plan(SHAPE)))

    budgets = []
    for _ in range(round(1 / RECOVERY_STEP)):
        plan = policy.plan(SHAPE)
        assert policy.within(on_time(policy, plan).total_s)
        policy.feedback(on_time(policy, plan))
        budgets.append(policy.plan(SHAPE).budget_s)

    assert budgets[0] < 0.6 * full  # one step, not all the way
    assert budgets == sorted(budgets)  # never backs off without a miss
    assert budgets[-1] == pytest.approx(full)
    assert policy.plan(SHAPE).reason == "slack"
    assert policy.to_dict()["misses"] == 1


def test_within_is_measured_against_the_objective_itself():
    policy = harli()
    assert policy.within(S)
    assert policy.within(S * (1 - MARGIN) + 0.001)  # the margin is for planning only
    assert not policy.within(S * 1.0001)


# --- harli: SM shares (GPU) ------------------------------------------------------------------


def gpu_harli(objective_s: float, decode_s: float = 0.010) -> HarliPolicy:
    predictor = flat_predictor(decode_s)
    predictor.interference = Interference(TABLE)
    return harli(predictor, objective_s=objective_s, margin=0.0)


@pytest.mark.parametrize(
    ("objective_s", "kinds", "num_sms"),
    [
        (0.020, ["forward"], 132),  # factor 1.8 <= 2.0 at every SM
        (0.015, ["forward"], 66),  # 99 SMs: 1.55 > 1.5; 66 SMs: 1.3
        (0.014, ["forward", "backward"], 33),  # the worst kind decides: backward 1.5 at 66
        (0.0105, ["forward"], None),  # even 33 SMs slow decode by 10%
        (0.020, ["forward", "unknown"], None),  # a kind with no measurements never fits
    ],
)
def test_plan_share_picks_the_largest_share_that_fits(objective_s, kinds, num_sms):
    plan = gpu_harli(objective_s).plan_share(SHAPE, LADDER, TOTAL_SMS, kinds)

    assert plan.num_sms == num_sms
    assert plan.budget_s == 0.0
    assert plan.runs_finetune == (num_sms is not None)
    if num_sms is None:
        assert plan.reason.startswith("paused")
    else:
        assert plan.max_inflight > 0
        predicted = gpu_harli(objective_s).predictor.corun_gpu(SHAPE, kinds, num_sms / TOTAL_SMS)
        assert predicted <= objective_s


def test_plan_share_without_work_or_prediction_plans_nothing():
    assert gpu_harli(0.020).plan_share(SHAPE, LADDER, TOTAL_SMS, []).num_sms is None
    learning = harli(Predictor(interference=Interference(TABLE)), objective_s=0.020)
    plan = learning.plan_share(SHAPE, LADDER, TOTAL_SMS, ["forward"])
    assert plan.num_sms is None
    assert plan.reason.startswith("learning")


def test_plan_share_shrinks_after_a_miss():
    policy = gpu_harli(0.020)
    plan = policy.plan_share(SHAPE, LADDER, TOTAL_SMS, ["forward"])
    assert plan.num_sms == 132

    policy.feedback(Iteration(SHAPE, plan, 0.025, 0.0))  # decode itself took 25 ms
    # the residual now predicts decode slower, and the slack is halved
    assert policy.plan_share(SHAPE, LADDER, TOTAL_SMS, ["forward"]).num_sms < 132


# --- the baselines ---------------------------------------------------------------------------


def test_time_sliced_plans_its_fixed_budget_whatever_decode_costs():
    policy = TimeSlicedPolicy(S, 0.1, fitted_predictor(), budget_s=0.004)
    for stats in (SHAPE, HUGE):
        assert policy.plan(stats).budget_s == 0.004
    assert TimeSlicedPolicy(S, 0.1, Predictor(), 0.004).plan(SHAPE).budget_s == 0.004


def test_time_sliced_admits_while_the_slice_is_not_spent():
    policy = TimeSlicedPolicy(S, 0.1, fitted_predictor(), budget_s=0.004)
    plan = policy.plan(SHAPE)

    assert policy.admit(plan, 0.0, "forward", 1e12)  # at least one unit, however long
    assert policy.admit(plan, 0.0039, "backward", 1e12)
    assert not policy.admit(plan, 0.004, "forward", 1.0)
    assert not policy.admit(plan, 0.01, "unknown", 1.0)


def test_idle_only_never_plans_finetune_beside_decode():
    policy = IdleOnlyPolicy(S, 0.1, fitted_predictor())
    for stats in random_shapes(seed=5, n=20):
        plan = policy.plan(stats)
        assert plan.budget_s == 0.0
        assert not plan.runs_finetune
        assert not policy.admit(plan, 0.0, "forward", 1.0)


def test_every_mode_teaches_the_predictor():
    """Baselines feed measured iterations back too, so their prediction error is reported."""
    policy = TimeSlicedPolicy(S, 0.1, Predictor(), budget_s=0.004)
    for stats in random_shapes(seed=6, n=MIN_SAMPLES):
        plan = policy.plan(stats)
        policy.feedback(Iteration(stats, plan, linear(stats) + 0.004, 0.004))

    assert policy.predictor.decode(SHAPE) == pytest.approx(linear(SHAPE), rel=0.05)


# --- make_policy -----------------------------------------------------------------------------


def make(mode: Mode):
    return make_policy(
        mode,
        objective_s=S,
        margin=MARGIN,
        budget_s=0.004,
        idle_quantum_s=0.1,
        predictor=fitted_predictor(),
    )


def test_make_policy_builds_each_cpu_mode():
    harli_policy = make(Mode.HARLI)
    assert isinstance(harli_policy, HarliPolicy)
    assert harli_policy.target_s == pytest.approx(S * (1 - MARGIN))
    sliced = make(Mode.TIME_SLICED)
    assert isinstance(sliced, TimeSlicedPolicy) and sliced.budget_s == 0.004
    assert isinstance(make(Mode.IDLE_ONLY), IdleOnlyPolicy)
    assert make(Mode.IDLE_ONLY).idle_quantum_s == 0.1


@pytest.mark.parametrize("mode", [Mode.NAIVE, Mode.STATIC])
def test_make_policy_refuses_a_spatial_mode_without_a_concurrent_executor(mode):
    with pytest.raises(ValueError, match=f"{mode} runs beside decode"):
        make(mode)


def test_naive_and_static_plan_their_share_beside_every_decode_without_prediction():
    kw = dict(objective_s=S, margin=MARGIN, budget_s=0.004, idle_quantum_s=0.1)
    naive = make_policy(Mode.NAIVE, predictor=Predictor(), shares=(0.5, 1.0), **kw)
    static = make_policy(
        Mode.STATIC, predictor=Predictor(), shares=(0.5, 1.0), static_share=0.5, **kw
    )
    for shape in (SHAPE, HUGE):  # even a batch over the objective: they do not predict
        assert naive.plan(shape).share == 1.0 and static.plan(shape).share == 0.5
        assert naive.plan(shape).budget_s == 0 and naive.plan(shape).runs_finetune
    assert naive.spatial and static.spatial


# --- harli: a share beside decode (a concurrent executor) -------------------------------------


def spatial_harli(table=None, predictor=None, objective_s=S) -> HarliPolicy:
    predictor = predictor or fitted_predictor()
    predictor.interference = Interference(dict(table or {}))
    return HarliPolicy(objective_s, 0.1, predictor, MARGIN, shares=(0.25, 0.5, 1.0))


def test_spatial_harli_plans_the_largest_share_whose_predicted_decode_fits():
    # decode 10.8 ms, target 45 ms: x(1 + 0.8) fits at 1.0 if the worst kind slows it by 0.8
    assert spatial_harli({"forward": {0.5: 0.3, 1.0: 0.8}}).plan(SHAPE).share == 1.0
    # a 4x slowdown at 1.0 (54 ms) does not fit; half the cores (x2.5 = 27 ms) does
    table = {"forward": {0.25: 0.5, 0.5: 1.5, 1.0: 4.0}}
    assert spatial_harli(table).plan(SHAPE).share == 0.5
    # the worst kind decides: backward's slowdown at 0.5 is too much, so a quarter
    table = {"forward": {0.25: 0.5, 0.5: 1.5, 1.0: 4.0}, "backward": {0.25: 1.0, 0.5: 3.5}}
    plan = spatial_harli(table).plan(SHAPE)
    assert plan.share == 0.25 and plan.budget_s == 0 and plan.runs_finetune
    # nothing fits: no finetune beside this decode
    plan = spatial_harli({"forward": {0.25: 9.0}}).plan(SHAPE)
    assert (plan.share, plan.reason) == (0.0, "paused: no share fits")


def test_spatial_harli_probes_an_unmeasured_share_only_where_decode_has_room():
    plan = spatial_harli().plan(SHAPE)  # 10.8 ms x 1.5 is within 45 ms: try the largest
    assert (plan.share, plan.reason) == (1.0, "probing a share")
    # 10.8 x 1.5 = 16.2 ms is over a 15 ms objective's target: nothing is risked
    assert spatial_harli(objective_s=0.015).plan(SHAPE).share == 0.0
    learning = spatial_harli(predictor=Predictor())
    assert learning.plan(SHAPE).share == 0.0  # no prediction yet: nothing beside decode


def test_a_miss_beside_units_backs_off_to_a_smaller_share():
    policy = spatial_harli({"forward": {0.25: 0.2, 0.5: 0.6, 1.0: 2.0}})
    plan = policy.plan(SHAPE)
    assert plan.share == 1.0  # 10.8 x 3 = 32.4 ms, within 45
    miss = Iteration(SHAPE, plan, 1.2 * S, 0.0, beside=(1.0, frozenset({"forward"})))
    policy.feedback(miss)
    assert policy.backoff == 0.5 and policy.hold == HOLD_UP  # finetune beside it may have caused it
    assert policy.plan(SHAPE).share < 1.0


def test_iterations_beside_units_teach_stage_2_and_leave_stage_1_alone():
    policy = spatial_harli()
    stage1 = dict(policy.predictor.stage1.coef)
    residuals = dict(policy.predictor.stage1.residuals)
    solo = policy.predictor.decode(SHAPE)
    plan = policy.plan(SHAPE)
    for _ in range(30):  # decode beside forward units at share 1.0 takes twice its solo time
        beside = Iteration(SHAPE, plan, 2 * solo, 0.0, beside=(1.0, frozenset({"forward"})))
        policy.feedback(beside)
    assert policy.predictor.interference.slowdown("forward", 1.0) == pytest.approx(1.0, rel=0.01)
    assert policy.predictor.interference.factor_at(1.0) == pytest.approx(2.0, rel=0.01)
    assert policy.predictor.stage1.coef == stage1 and policy.predictor.stage1.residuals == residuals


# --- harli: the attainment controller --------------------------------------------------------


def test_misses_with_finetune_hold_back_more_of_the_objective_and_hits_give_it_back():
    policy = harli()
    plan = policy.plan(SHAPE)
    with_units = Iteration(SHAPE, plan, 1.2 * S, plan.budget_s, units=(("forward", 1e6),))
    policy.feedback(with_units)
    assert policy.hold == pytest.approx(HOLD_UP)
    assert policy.target_s == pytest.approx(S * (1 - MARGIN - HOLD_UP))
    # a miss of decode alone (nothing ran beside it) is not finetune's: the hold stays
    policy.feedback(Iteration(SHAPE, plan, 1.2 * S, 0.0))
    assert policy.hold == pytest.approx(HOLD_UP)
    # 99 planned iterations on time give back what one miss took: misses settle at 1%
    for _ in range(99):
        policy.feedback(on_time(policy, policy.plan(SHAPE)))
    assert policy.hold == pytest.approx(0.0, abs=1e-9)
    assert HOLD_DOWN / (HOLD_UP + HOLD_DOWN) == pytest.approx(0.01)


def test_the_hold_is_capped_so_decode_alone_still_plans():
    policy = harli()
    for _ in range(100):
        plan = policy.plan(SHAPE)
        policy.feedback(Iteration(SHAPE, plan, 1.2 * S, 0.001, units=(("forward", 1e6),)))
    assert policy.hold == pytest.approx(MAX_HOLD)


def test_spatial_harli_plans_for_the_kinds_that_would_run_beside_the_decode():
    # an optimizer step slows decode 5x (54 ms, over 45), a forward 1.5x: forwards still fit
    table = {"forward": {1.0: 0.5}, "optimizer": {1.0: 4.0}}
    assert spatial_harli(table).plan(SHAPE, frozenset({"forward"})).share == 1.0
    # with an optimizer among them, half the cores (interpolated: x3, 32 ms)
    assert spatial_harli(table).plan(SHAPE, frozenset({"forward", "optimizer"})).share == 0.5
    assert spatial_harli(table).plan(SHAPE).share == 0.5  # not known: the worst kind measured
    # a kind never measured at a share: probed where decode has room, as an unmeasured share
    plan = spatial_harli(table).plan(SHAPE, frozenset({"backward"}))
    assert (plan.share, plan.reason) == (1.0, "probing a share")
