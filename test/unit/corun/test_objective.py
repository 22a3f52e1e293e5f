"""The objective in force: whether the solo decode fits under it (said once, cleared once), and
``auto`` following the measured decode; driven through the co-run loop on a fake clock."""

from __future__ import annotations

import logging
import math

import pytest

from sglang_harli.config import AUTO_SLO_MULTIPLE
from sglang_harli.corun.controller import CoRun
from sglang_harli.corun.objective import AUTO_HYSTERESIS, FIT_AGAIN_ITERATIONS, Objective
from sglang_harli.corun.policy import HarliPolicy, IdleOnlyPolicy, TimeSlicedPolicy
from sglang_harli.corun.predictor import MIN_SAMPLES, Predictor
from sglang_harli.corun.stats import DecodeStats

from .helpers import flat_predictor
from .test_controller import Clock, FakeRunner, forever

ONE, EIGHT = DecodeStats(1, 100, 100), DecodeStats(8, 800, 100)
LOGGER = "sglang_harli.corun.objective"


def warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def loop(corun: CoRun, clock: Clock, decode_s, n: int, stats: DecodeStats = ONE) -> None:
    """``n`` decode iterations of ``decode_s`` seconds (a number or a function of the index)."""
    for i in range(n):
        corun.before_decode(stats)
        clock.advance(decode_s(i) if callable(decode_s) else decode_s)
        corun.after_decode(None)


# --- does the solo decode fit? -----------------------------------------------------------------


def test_a_decode_slower_than_the_objective_is_said_once_with_the_reason(caplog):
    """The README's server: SmolLM2 decodes at ~70 ms on 2 cores against the 50 ms default."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    clock = Clock()
    corun = CoRun(HarliPolicy(0.050, 0.1, flat_predictor(0.070), margin=0.05), clock=clock)
    loop(corun, clock, 0.070, 200)

    objective = corun.to_dict()["objective"]
    assert objective["fits"] is False
    assert objective["tpot_slo_ms"] == 50.0 and objective["source"] == "flag"
    assert objective["solo_decode_ms"] == pytest.approx(70.0)
    reason = objective["reason"]
    assert "the solo decode at batch 1 takes 70 ms" in reason
    assert "above the 47.5 ms harli plans within (the 50 ms objective less its 5% margin)" in (
        reason
    )
    assert "harli cannot train beside decode" in reason
    assert reason.endswith("raise --harli-tpot-slo-ms or use auto")
    assert warnings(caplog) == [f"Harli objective: {reason}"]  # once, not per iteration
    # and what it explains: nothing planned, every iteration a miss
    assert corun.stats.planned_finetune == 0 and corun.stats.within_slo == 0


def test_the_diagnosis_clears_after_iterations_that_fit_and_returns_with_one_new_warning(caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    clock = Clock()
    predictor = flat_predictor(0.070)
    corun = CoRun(HarliPolicy(0.050, 0.1, predictor, margin=0.0), clock=clock)
    loop(corun, clock, 0.070, 5)
    assert corun.objective.fits is False

    predictor.stage1.coef[-1][0] = 0.020  # the machine got faster (e.g. a hog ended)
    loop(corun, clock, 0.020, FIT_AGAIN_ITERATIONS - 1)
    assert corun.objective.fits is False  # not yet: a streak of fitting iterations clears it
    loop(corun, clock, 0.020, 1)
    assert corun.objective.fits is True and corun.to_dict()["objective"]["reason"] is None
    assert "fits the 50 ms objective again" in caplog.records[-1].getMessage()

    predictor.stage1.coef[-1][0] = 0.070
    loop(corun, clock, 0.070, 50)
    assert corun.objective.fits is False
    assert len(warnings(caplog)) == 2


def test_a_batch_that_alternates_across_the_boundary_warns_once(caplog):
    """Batch 1 fits, batch 8 does not: the warning comes at the first batch 8 and stays, not
    once per change of batch."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    clock = Clock()
    predictor = Predictor()
    predictor.stage1.coef = {-1: [0.010, 0.005, 0.0, 0.0]}  # 15 ms at batch 1, 50 at batch 8
    predictor.stage1.learn = False
    corun = CoRun(IdleOnlyPolicy(0.040, 0.1, predictor), clock=clock)
    for i in range(100):
        stats = ONE if i % 2 else EIGHT
        loop(corun, clock, 0.010 + 0.005 * stats.batch_size, 1, stats)
    assert corun.objective.fits is False
    assert "at batch 8 takes 50 ms" in corun.objective.reason
    assert "decode alone misses it" in corun.objective.reason  # no margin outside harli
    assert len(warnings(caplog)) == 1


def test_nothing_is_judged_while_the_predictor_learns():
    clock = Clock()
    corun = CoRun(HarliPolicy(0.050, 0.1, Predictor(), margin=0.05), clock=clock)
    loop(corun, clock, 0.070, 3)
    assert corun.to_dict()["objective"]["fits"] is None


# --- auto ----------------------------------------------------------------------------------------


def auto_loop(policy_class=HarliPolicy, **kwargs):
    clock = Clock()
    policy = policy_class(math.inf, 0.1, Predictor(), **kwargs)
    return CoRun(policy, clock=clock, objective=Objective(None)), clock


def test_auto_has_no_objective_until_stage_1_predicts_then_a_multiple_of_it(caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    corun, clock = auto_loop(margin=0.05)
    runner = FakeRunner(clock, forever(seconds=0.001))
    corun.idle(runner)  # an idle quantum: the unit's duration is learned

    loop(corun, clock, 0.070, MIN_SAMPLES)  # the learning phase: plans nothing, judges nothing
    status = corun.to_dict()
    assert status["objective_ms"] is None and status["objective"]["tpot_slo_ms"] is None
    assert status["objective"]["reason"].startswith("auto: the objective will be 1.5x")
    assert status["iterations"] == 0 and status["unjudged"] == MIN_SAMPLES - 1
    assert status["planned_finetune"] == 0 and status["slack_s"] == 0
    assert status["policy"]["target_ms"] is None

    for _ in range(20):  # stage 1 predicts: S = 1.5 x 70 ms, and finetune fits beside decode
        corun.before_decode(ONE)
        clock.advance(0.070)
        corun.after_decode(runner)
    status = corun.to_dict()
    assert status["objective"]["tpot_slo_ms"] == pytest.approx(AUTO_SLO_MULTIPLE * 70.0)
    assert status["objective"]["source"] == "auto" and status["objective"]["fits"] is True
    assert corun.policy.objective_s == corun.stats.objective_s == corun.objective.seconds
    assert status["objective_ms"] == pytest.approx(105.0)
    # the 16th iteration, measured before stage 1's first fit, is not judged either
    assert status["unjudged"] == MIN_SAMPLES
    assert status["iterations"] == 19 and status["within_slo"] == 19
    assert status["planned_finetune"] > 0 and status["finetune_s"] > 0
    assert [m for m in caplog.messages if "(auto)" in m] == [
        "Harli objective (auto): 1.5 x the solo decode at batch 1 (70 ms) = 105 ms; it "
        "follows the measured decode"
    ]


def test_auto_follows_the_machine_beyond_its_hysteresis_only():
    predictor = flat_predictor(0.020)
    corun = CoRun(
        TimeSlicedPolicy(math.inf, 0.1, predictor, 0.005), clock=Clock(), objective=Objective(None)
    )
    corun.before_decode(ONE)
    assert corun.objective.seconds == pytest.approx(0.030)

    predictor.stage1.coef[-1][0] = 0.020 * (1 + AUTO_HYSTERESIS / 2)  # noise: S stays
    corun.before_decode(ONE)
    assert corun.policy.objective_s == pytest.approx(0.030)

    predictor.stage1.coef[-1][0] = 0.030  # the machine slowed by half: S follows
    corun.before_decode(ONE)
    assert corun.policy.objective_s == corun.stats.objective_s == pytest.approx(0.045)


def test_auto_with_a_margin_that_leaves_no_room_says_so():
    corun, clock = auto_loop(margin=0.5)  # plans within 0.75 x the solo decode
    corun.policy.predictor = flat_predictor(0.010)
    loop(corun, clock, 0.010, 2)
    reason = corun.to_dict()["objective"]["reason"]
    assert corun.objective.fits is False
    assert reason.endswith(
        "lower --harli-slo-margin (auto sets the objective to 1.5x the solo decode)"
    )


# --- at runtime --------------------------------------------------------------------------------


def test_a_new_objective_is_judged_at_once_against_the_last_decode():
    clock = Clock()
    corun = CoRun(HarliPolicy(0.050, 0.1, flat_predictor(0.010), margin=0.05), clock=clock)
    loop(corun, clock, 0.010, 3)
    assert corun.objective.fits is True

    corun.set_objective(0.001e-3)  # a tiny objective: no decode fits, said without a decode
    objective = corun.to_dict()["objective"]
    assert objective["fits"] is False and objective["source"] == "request"
    assert objective["tpot_slo_ms"] == 0.001
    assert objective["reason"].endswith("raise tpot_slo_ms (POST /harli/mode) or set it to auto")
    assert corun.policy.objective_s == corun.stats.objective_s == 1e-6

    corun.set_objective(None, "auto")  # auto: at once from stage 1, which has measured
    assert corun.objective.fits is True
    assert corun.policy.objective_s == pytest.approx(0.015)


def test_set_policy_keeps_the_objective_and_the_predictor_and_drops_the_open_iteration():
    clock = Clock()
    predictor = flat_predictor(0.010)
    corun = CoRun(TimeSlicedPolicy(0.020, 0.1, predictor, 0.005), clock=clock)
    loop(corun, clock, 0.010, 3)
    assert corun.stats.iterations == 2  # the third is still open

    corun.set_policy(HarliPolicy(0.999, 0.1, predictor, margin=0.1))
    corun.before_decode(ONE)  # the open one was planned by the old policy: not measured
    assert corun.stats.iterations == 2
    assert corun.policy.objective_s == 0.020 and corun.policy.predictor is predictor
    assert corun.to_dict()["policy"]["target_ms"] == pytest.approx(18.0)


def test_a_simulated_instance_keeps_the_diagnosis_out_of_the_log(caplog):
    """The fleet simulation runs many instances: each says it in its status, not in the log."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    clock = Clock()
    policy = HarliPolicy(0.050, 0.1, flat_predictor(0.070), margin=0.05)
    corun = CoRun(policy, clock=clock, objective=Objective(0.050, log=False))
    loop(corun, clock, 0.070, 10)
    corun.set_objective(None, "auto")
    assert corun.objective.fits is True and corun.objective.log is None
    assert corun.to_dict()["objective"]["source"] == "auto"
    assert caplog.records == []
