"""The fleet simulation against a real replay on the machine it ran on.

``test/data/replay_cpu`` holds a replay's ``report.json`` (``python -m sglang_harli.bench replay``,
one server per mode on the CPU dev machine) and ``profile.json`` (what its harli server measured,
which replay writes next to it). Simulating the replay's window on that profile must give, for
every mode the replay ran, its finetune throughput within 15% (relative; a mode that trained
nothing must simulate nothing) and its per-iteration SLO attainment within 15 points of share.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sglang_harli.bench.__main__ import main
from sglang_harli.bench.simulate import TOLERANCE

RECORDED = Path(__file__).parents[2] / "data" / "replay_cpu"
REPORT, PROFILE = RECORDED / "report.json", RECORDED / "profile.json"
MODES = list(json.loads(REPORT.read_text())["modes"]) if REPORT.exists() else []

pytestmark = pytest.mark.skipif(not MODES, reason=f"no recorded replay in {RECORDED}")


@pytest.fixture(scope="module")
def validation(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("simulation")
    argv = ["simulate", "--profile", str(PROFILE), "--replay", str(REPORT), "--out", str(out)]
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    print(json.dumps(report["validation"], indent=1))  # shown with -s: the figures compared
    return report["validation"]


def test_the_simulation_runs_every_mode_the_replay_ran(validation):
    assert sorted(validation) == sorted(MODES)


@pytest.mark.parametrize("mode", MODES)
def test_finetune_throughput_within_15_percent(validation, mode):
    tokens = validation[mode]["finetune_tokens_per_s"]
    if tokens["measured"] == 0:  # off (plain SGLang) trains nothing: neither may the simulation
        assert tokens["simulated"] == 0
    else:
        assert abs(tokens["relative_error"]) <= TOLERANCE, tokens


@pytest.mark.parametrize("mode", MODES)
def test_iteration_attainment_within_15_points(validation, mode):
    attainment = validation[mode]["attainment_iterations"]
    assert attainment["error"] is not None, attainment
    assert abs(attainment["error"]) <= TOLERANCE, attainment
