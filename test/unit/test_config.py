from __future__ import annotations

from pathlib import Path

import pytest

from sglang_harli.config import HarliConfig, HarliConfigError, Mode, parse_harli_args


def test_harli_flags_are_split_off_and_sglang_flags_kept_in_order():
    config, rest = parse_harli_args(
        ["--model-path", "m", "--harli-mode", "idle-only", "--tp-size", "1", "--enable-lora"]
    )
    assert config == HarliConfig(mode="idle-only")
    assert rest == ["--model-path", "m", "--tp-size", "1", "--enable-lora"]


def test_equals_form_and_default():
    assert parse_harli_args(["--harli-mode=off"])[0].mode == "off"
    assert parse_harli_args([])[0] == HarliConfig()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--harli-mode", "nonsense"], "invalid choice: 'nonsense'"),
        (["--harli-mode", "spatial"], "invalid choice: 'spatial'"),
        (["--harli-slo-margin", "1"], "must be in \\[0, 1\\)"),
        (["--harli-static-share", "0"], "must be in \\(0, 1\\]"),
        (["--harli-tpot-slo-ms", "0"], "must be > 0"),
        (["--harli-mode"], "expected one argument"),
        (["--harli-typo", "1"], "unknown flag --harli-typo"),
        (["--harli-mod=off"], "unknown flag --harli-mod"),
        (["--harli-lend-evict-cache"], "is gone: cached prefixes are lent by default"),
        (["--harli-reserve-mb", "lots"], "not a number"),
        (["--harli-lend-cache-floor", "1.5"], "must be in \\[0, 1\\]"),
    ],
)
def test_bad_harli_flags_raise(argv, message):
    with pytest.raises(HarliConfigError, match=message):
        parse_harli_args(argv)


def test_auto_mode_and_state_dir_resolve(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    auto = HarliConfig().resolved(has_cuda=False)
    # auto is harli on a CPU; time-sliced on a GPU until harli's GPU execution exists
    assert auto.mode == "harli"
    assert HarliConfig().resolved(has_cuda=True).mode == "time-sliced"
    assert auto.state_dir == str(tmp_path / "sglang_harli" / "state")
    idle = HarliConfig(mode="idle-only", state_dir="rel").resolved(has_cuda=False)
    assert idle.mode == "idle-only" and idle.state_dir == str(Path("rel").resolve())
    assert not HarliConfig(mode="off").enabled and HarliConfig().enabled


def test_reserve_is_per_job_on_a_cpu_and_none_on_a_gpu_unless_stated():
    cpu, gpu = HarliConfig().resolved(has_cuda=False), HarliConfig().resolved(has_cuda=True)
    assert cpu.job_reserve and cpu.fixed_reserve_mb == 0
    assert not gpu.job_reserve and gpu.fixed_reserve_mb == 0
    stated = parse_harli_args(["--harli-reserve-mb", "64"])[0].resolved(has_cuda=True)
    assert not stated.job_reserve and stated.fixed_reserve_mb == 64
    assert parse_harli_args(["--harli-reserve-mb", "auto"])[0].reserve_mb == "auto"


@pytest.mark.parametrize("flag", ["--harli-finetune-budget-ms", "--harli-checkpoint-every"])
@pytest.mark.parametrize("value", ["0", "-3", "x"])
def test_budgets_must_be_positive_numbers(flag, value):
    with pytest.raises(HarliConfigError, match=flag):
        parse_harli_args([flag, value])


def test_numeric_flags_parse():
    config, _ = parse_harli_args(["--harli-finetune-budget-ms", "5.5", "--harli-idle-quantum-ms=7"])
    assert (config.finetune_budget_ms, config.idle_quantum_ms) == (5.5, 7.0)


def test_kernels_follow_the_device():
    assert HarliConfig().resolved(has_cuda=True).kernels == "triton"
    assert HarliConfig().resolved(has_cuda=False).kernels == "torch"
    assert HarliConfig(kernels="torch").resolved(has_cuda=True).kernels == "torch"
    with pytest.raises(HarliConfigError, match="needs a CUDA GPU"):
        HarliConfig(kernels="triton").resolved(has_cuda=False)


def test_every_config_field_is_one_flag_with_help():
    import argparse
    import dataclasses

    from sglang_harli.config import add_harli_args

    parser = argparse.ArgumentParser()
    add_harli_args(parser)
    help_text = parser.format_help()
    for field in dataclasses.fields(HarliConfig):
        flag = "--harli-" + field.name.replace("_", "-")
        assert flag in help_text
    # choices come from the enums: the help lists exactly the modes the code knows
    assert "{auto,harli,time-sliced,idle-only,naive,static,off}" in help_text
    assert "{auto,torch,triton}" in help_text


def test_new_service_flags_parse_and_are_checked():
    config, _ = parse_harli_args(["--harli-keep-checkpoints", "2", "--harli-max-upload-mb=0.5"])
    assert (config.keep_checkpoints, config.max_upload_mb) == (2, 0.5)
    with pytest.raises(HarliConfigError, match="--harli-keep-checkpoints"):
        parse_harli_args(["--harli-keep-checkpoints", "0"])


def test_modes_are_enums_shared_with_the_code():
    from sglang_harli.config import Kernels, Mode

    config, _ = parse_harli_args(["--harli-mode", "idle-only", "--harli-kernels", "torch"])
    assert config.mode is Mode.IDLE_ONLY and config.kernels is Kernels.TORCH


def test_the_readme_documents_every_flag():
    import dataclasses

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    missing = [
        f.name
        for f in dataclasses.fields(HarliConfig)
        if f"--harli-{f.name.replace('_', '-')}" not in readme
    ]
    assert not missing, f"README.md does not document: {missing}"


@pytest.mark.parametrize("mode", ["naive", "static"])
def test_spatial_baselines_run_beside_decode_on_a_cpu(mode):
    config = HarliConfig(mode=mode).resolved(has_cuda=False)
    assert (config.mode, config.executor) == (mode, "cpu-concurrent")
    with pytest.raises(HarliConfigError, match="runs with --harli-executor cpu-concurrent"):
        HarliConfig(mode=mode, executor="inline").resolved(has_cuda=False)


@pytest.mark.parametrize(
    ("mode", "executor", "runs"),
    [
        ("time-sliced", "auto", "inline"),
        ("idle-only", "auto", "inline"),
        ("harli", "inline", "inline"),
        ("harli", "cpu-concurrent", "cpu-concurrent"),
        ("off", "auto", "auto"),
    ],
)
def test_each_mode_runs_on_its_executor(mode, executor, runs):
    assert HarliConfig(mode=mode, executor=executor).resolved(has_cuda=False).executor == runs


def test_the_modes_table_covers_every_mode_and_policy():
    from sglang_harli.corun.modes import MODES, runnable
    from sglang_harli.corun.policy import make_policy
    from sglang_harli.corun.predictor import Predictor

    assert set(MODES) == set(Mode) - {Mode.AUTO, Mode.OFF}
    for mode, facts in MODES.items():
        spatial = facts.cpu_executors[0] == "cpu-concurrent"
        policy = make_policy(
            mode,
            objective_s=0.05,
            margin=0.05,
            budget_s=0.02,
            idle_quantum_s=0.1,
            predictor=Predictor(),
            shares=(1.0,) if spatial else (),
        )
        assert policy.mode == mode and policy.spatial == spatial
    assert runnable("cpu") == ["harli", "time-sliced", "idle-only", "naive", "static"]
    assert runnable("cuda") == ["time-sliced", "idle-only"]


def test_the_cuda_executor_is_refused_until_built():
    with pytest.raises(HarliConfigError, match="not built yet"):
        HarliConfig(executor="cuda").resolved(has_cuda=True)


@pytest.mark.parametrize("mode", ["harli", "naive", "static"])
def test_gpu_co_run_modes_are_refused_on_a_gpu_until_built(mode):
    with pytest.raises(HarliConfigError, match="is not built yet"):
        HarliConfig(mode=mode).resolved(has_cuda=True)


def test_slo_flags_parse():
    config, _ = parse_harli_args(
        ["--harli-tpot-slo-ms", "12.5", "--harli-slo-margin=0.2", "--harli-profile", "p.json"]
    )
    assert (config.tpot_slo_ms, config.slo_margin, config.profile) == (12.5, 0.2, "p.json")
    assert HarliConfig().tpot_slo_ms == 50.0 and HarliConfig().slo_margin == 0.05


def test_the_objective_may_be_auto():
    config, _ = parse_harli_args(["--harli-tpot-slo-ms", "auto"])
    assert config.tpot_slo_ms == "auto" and config.objective_auto
    assert not HarliConfig().objective_auto
    with pytest.raises(HarliConfigError, match="not a number: 'fast'"):
        parse_harli_args(["--harli-tpot-slo-ms", "fast"])


@pytest.mark.parametrize(
    "given, embedded_on_cpu, objective",
    [
        (False, True, "auto"),  # the embedded model on a CPU: the objective fits the machine
        (False, False, 50.0),  # a model of one's own, or a GPU: the flag's default
        (True, True, 30.0),  # an explicit number is kept as it is
        (True, False, 30.0),
    ],
)
def test_the_objective_default_is_auto_only_for_the_embedded_model_on_a_cpu(
    given, embedded_on_cpu, objective
):
    argv = ["--harli-tpot-slo-ms", "30"] if given else []
    config = parse_harli_args(argv)[0].with_objective_default(given, embedded_on_cpu)
    assert config.tpot_slo_ms == objective


def test_the_help_says_what_auto_is_and_when_it_is_the_default():
    import argparse

    from sglang_harli.config import add_harli_args

    parser = argparse.ArgumentParser()
    add_harli_args(parser)
    text = " ".join(parser.format_help().split())
    assert "or 'auto': 1.5x the solo decode the server measures at its current batch" in text
    assert "'auto' when the server serves its embedded default model on a CPU" in text
