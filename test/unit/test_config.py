from __future__ import annotations

import pytest

from sglang_harli.config import HarliConfig, HarliConfigError, parse_harli_args


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
        (["--harli-mode"], "expected one argument"),
        (["--harli-typo", "1"], "unknown flag --harli-typo"),
        (["--harli-mod=off"], "unknown flag --harli-mod"),
    ],
)
def test_bad_harli_flags_raise(argv, message):
    with pytest.raises(HarliConfigError, match=message):
        parse_harli_args(argv)


def test_auto_mode_resolves_by_device():
    auto = HarliConfig()
    assert auto.resolved(has_cuda=True).mode == "harli"
    assert auto.resolved(has_cuda=False).mode == "time-sliced"
    assert HarliConfig(mode="static").resolved(has_cuda=False).mode == "static"
    assert not HarliConfig(mode="off").enabled and auto.enabled
