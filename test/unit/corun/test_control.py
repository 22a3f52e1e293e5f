"""Runtime control (``POST /harli/mode``) on plain values: what a body may ask, each refusal
with its reason and field, the numbers-only form on SGLang's RPC, and the switches' record."""

from __future__ import annotations

import dataclasses

import pytest

from sglang_harli.config import HarliConfig, Mode
from sglang_harli.corun.control import (
    FIELDS,
    Control,
    ControlError,
    Settings,
    from_wire,
    parse_change,
    runtime_modes,
    split_wire,
    to_wire,
)
from sglang_harli.corun.policy import HarliPolicy, IdleOnlyPolicy, TimeSlicedPolicy
from sglang_harli.corun.predictor import Predictor
from sglang_harli.corun.stats import CoRunStats

CONFIG = HarliConfig(mode=Mode.HARLI, state_dir="/tmp/harli-state-unused")


def cpu(body):
    return parse_change(body, CONFIG, has_cuda=False)


def test_the_modes_a_server_may_switch_to_are_those_it_could_start_with():
    cpu_modes = ["harli", "time-sliced", "idle-only", "naive", "static"]
    assert runtime_modes(CONFIG, has_cuda=False) == cpu_modes
    # with harli on the inline executor the spatial baselines still have theirs
    inline = dataclasses.replace(CONFIG, executor="inline")
    assert runtime_modes(inline, has_cuda=False) == cpu_modes
    # on a GPU, harli, naive and static (not built there yet) are refused at start-up, so here
    assert runtime_modes(CONFIG, has_cuda=True) == ["time-sliced", "idle-only"]


def test_a_valid_body_becomes_a_change_of_exactly_its_settings():
    assert cpu({"mode": "idle-only"}) == {"mode": Mode.IDLE_ONLY}
    assert cpu({"tpot_slo_ms": 25, "slo_margin": 0}) == {"tpot_slo_ms": 25.0, "slo_margin": 0.0}
    assert cpu({"tpot_slo_ms": "auto"}) == {"tpot_slo_ms": "auto"}
    change = cpu({"static_share": 1, "finetune_budget_ms": 0.5, "mode": "time-sliced"})
    assert change == {"static_share": 1.0, "finetune_budget_ms": 0.5, "mode": "time-sliced"}


@pytest.mark.parametrize(
    "body, param, message",
    [
        ([], None, "must be a JSON object"),
        ("harli", None, "must be a JSON object"),
        ({}, None, "names no setting to change"),
        ({"mode": "harli", "speed": 2}, "speed", "unknown setting 'speed'; settings: mode, "),
        ({"mode": "turbo"}, "mode", "unknown mode 'turbo'; this server runs: harli, time-sliced"),
        ({"mode": 1}, "mode", "mode must be a string"),
        ({"mode": "off"}, "mode", "off is plain SGLang, without Harli's scheduler"),
        ({"mode": "auto"}, "mode", "auto is resolved when the server starts"),
        ({"mode": "Naive"}, "mode", "unknown mode 'Naive'"),
        ({"tpot_slo_ms": 0}, "tpot_slo_ms", "tpot_slo_ms must be > 0, got 0.0"),
        ({"tpot_slo_ms": -5}, "tpot_slo_ms", "must be > 0"),
        ({"tpot_slo_ms": "fast"}, "tpot_slo_ms", 'must be a number or "auto"'),
        ({"tpot_slo_ms": "50"}, "tpot_slo_ms", 'must be a number or "auto"'),
        ({"tpot_slo_ms": None}, "tpot_slo_ms", "must be a number"),
        ({"tpot_slo_ms": True}, "tpot_slo_ms", "must be a number"),
        ({"tpot_slo_ms": float("inf")}, "tpot_slo_ms", "must be a finite number"),
        ({"tpot_slo_ms": float("nan")}, "tpot_slo_ms", "must be a finite number"),
        ({"slo_margin": 1}, "slo_margin", "slo_margin must be in \\[0, 1\\), got 1.0"),
        ({"slo_margin": -0.1}, "slo_margin", "must be in \\[0, 1\\)"),
        ({"slo_margin": "auto"}, "slo_margin", "slo_margin must be a number, got 'auto'"),
        ({"static_share": 0}, "static_share", "must be in \\(0, 1\\]"),
        ({"static_share": 1.5}, "static_share", "must be in \\(0, 1\\]"),
        ({"finetune_budget_ms": 0}, "finetune_budget_ms", "must be > 0"),
        ({"finetune_budget_ms": [20]}, "finetune_budget_ms", "must be a number"),
        # one bad setting refuses the whole body
        ({"mode": "idle-only", "slo_margin": 2}, "slo_margin", "must be in"),
    ],
)
def test_a_bad_body_is_refused_with_the_field_and_the_reason(body, param, message):
    with pytest.raises(ControlError, match=message) as refused:
        cpu(body)
    assert refused.value.param == param


def test_harli_is_refused_on_a_gpu_with_the_start_up_reason():
    with pytest.raises(ControlError, match="not built yet; on a GPU use time-sliced or idle-only"):
        parse_change({"mode": "harli"}, CONFIG, has_cuda=True)


# --- the scheduler RPC's form ------------------------------------------------------------------


def test_the_wire_form_is_numbers_only_and_reads_back_as_the_same_change():
    change = cpu({"mode": "idle-only", "tpot_slo_ms": "auto", "slo_margin": 0.2})
    wire = to_wire(change)
    assert wire == {"harli.mode=idle-only": 1, "harli.tpot_slo_ms=auto": 1, "harli.slo_margin": 0.2}
    assert all(isinstance(v, int | float) for v in wire.values())  # SGLang's Dict[str, int|float]
    assert from_wire(wire, CONFIG, has_cuda=False) == change


def test_our_keys_are_split_from_sglangs_and_validated_again_on_arrival():
    ours, theirs = split_wire({"harli.slo_margin": 0.5, "pp_max_micro_batch_size": 8})
    assert ours == {"harli.slo_margin": 0.5} and theirs == {"pp_max_micro_batch_size": 8}
    # SGLang's own /set_internal_state reaches the scheduler too: the same checks hold there
    with pytest.raises(ControlError, match="slo_margin must be in"):
        from_wire({"harli.slo_margin": 3.0}, CONFIG, has_cuda=False)
    with pytest.raises(ControlError, match="unknown mode 'fast'"):
        from_wire({"harli.mode=fast": 1}, CONFIG, has_cuda=False)
    with pytest.raises(ControlError, match="unknown setting 'bogus'"):
        from_wire({"harli.bogus": 1}, CONFIG, has_cuda=False)
    with pytest.raises(ControlError, match="given twice"):
        from_wire({"harli.mode=harli": 1, "harli.mode=idle-only": 1}, CONFIG, has_cuda=False)


# --- settings in force, policies and switches -------------------------------------------------


def test_settings_come_from_the_flags_and_make_the_modes_policy_over_the_given_predictor():
    settings = Settings.from_config(CONFIG)
    assert settings.to_dict() == {
        "mode": "harli",
        "tpot_slo_ms": 50.0,
        "slo_margin": 0.05,
        "static_share": 0.5,
        "finetune_budget_ms": 20.0,
    }
    assert list(settings.to_dict()) == list(FIELDS)
    predictor = Predictor()
    harli = settings.policy(predictor, idle_quantum_s=0.1)
    assert isinstance(harli, HarliPolicy) and harli.predictor is predictor
    assert (harli.objective_s, harli.margin) == (0.050, 0.05)
    sliced = settings.with_change({"mode": Mode.TIME_SLICED}).policy(predictor, 0.1)
    assert isinstance(sliced, TimeSlicedPolicy) and sliced.budget_s == 0.020
    idle = settings.with_change({"mode": Mode.IDLE_ONLY}).policy(predictor, 0.1)
    assert isinstance(idle, IdleOnlyPolicy)
    auto = settings.with_change({"tpot_slo_ms": "auto"})
    assert auto.objective_s is None and auto.policy(predictor, 0.1).objective_s == float("inf")


def test_a_switch_is_counted_with_what_changed_and_the_counters_restart_under_it():
    stats = CoRunStats(0.050, iterations=100, within_slo=40, finetune_s=2.0, slack_s=3.0)
    control = Control(Settings.from_config(CONFIG), clock=lambda: 1234.5)
    assert control.to_dict(stats)["since_switch"]["slo_attainment"] == 0.4  # since start

    assert control.apply({"slo_margin": 0.05}, stats) is None  # nothing changes: no switch
    assert control.switches == 0

    new = control.apply({"mode": Mode.IDLE_ONLY, "tpot_slo_ms": 70.0}, stats)
    assert new.mode == "idle-only" and control.settings is new
    stats.iterations, stats.within_slo = 110, 49
    status = control.to_dict(stats)
    assert status["mode"] == "idle-only" and status["tpot_slo_ms"] == 70.0
    assert status["switches"] == 1
    assert status["last_switch"] == {
        "at": 1234.5,
        "changed": {"mode": ["harli", "idle-only"], "tpot_slo_ms": [50.0, 70.0]},
    }
    since = status["since_switch"]
    assert (since["iterations"], since["within_slo"], since["slo_attainment"]) == (10, 9, 0.9)
