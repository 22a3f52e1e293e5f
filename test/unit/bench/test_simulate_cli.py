"""``python -m sglang_harli.bench simulate`` as a user runs it: reports, modes, seeds, errors."""

from __future__ import annotations

import json

import pytest

from sglang_harli.bench.__main__ import main
from sglang_harli.bench.simulate import instance_arrivals, trace_period_s
from sglang_harli.bench.trace import TraceScaling

from .helpers import profile

JOB = ["--job-seq-tokens", "40", "--job-target-tokens", "16"]
TRACE = ["--rate-scale", "0.5", "--duration-s", "60", "--max-context-tokens", "128"]


@pytest.fixture
def profile_path(tmp_path):
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(profile()))
    return path


def simulate(profile_path, out, *more: str) -> dict:
    argv = ["simulate", "--profile", str(profile_path), "--out", str(out), *JOB, *TRACE]
    argv += ["--objective-ms", "15", "--finetune-budget-ms", "10", *more]
    assert main(argv) == 0
    return json.loads((out / "report.json").read_text())


def test_every_mode_serves_the_same_requests(profile_path, tmp_path):
    report = simulate(profile_path, tmp_path / "out", "--instances", "2")
    modes = report["modes"]
    assert list(modes) == ["off", "idle-only", "time-sliced", "harli"]
    scaling = TraceScaling(**report["trace"])
    period = trace_period_s(scaling.trace)
    expected = sum(len(instance_arrivals(scaling, i * period / 2)) for i in range(2))
    for figures in modes.values():
        assert figures["requests"] == figures["requests_completed"] == expected
    assert modes["off"]["finetune_tokens"] == 0
    assert all(modes[m]["finetune_tokens"] > 0 for m in ("idle-only", "time-sliced", "harli"))
    assert (tmp_path / "out" / "report.md").read_text().startswith("# Fleet simulation")
    speed = report["speed"]
    assert speed["instance_hours"] == pytest.approx(4 * 2 * 60 / 3600, rel=0.05)
    assert speed["instance_hours_per_s"] > 0


def test_the_same_seed_gives_the_same_report(profile_path, tmp_path):
    runs = [
        simulate(profile_path, tmp_path / name, "--modes", "harli", "--seed", seed)
        for name, seed in (("a", "3"), ("b", "3"), ("c", "4"))
    ]
    assert runs[0]["modes"] == runs[1]["modes"]
    assert runs[0]["modes"] != runs[2]["modes"]


def test_workers_give_the_same_figures_as_one_process(profile_path, tmp_path):
    one = simulate(profile_path, tmp_path / "one", "--modes", "harli", "--instances", "2")
    two = simulate(
        profile_path, tmp_path / "two", "--modes", "harli", "--instances", "2", "--workers", "2"
    )
    assert one["modes"] == two["modes"]


@pytest.mark.parametrize(
    "change",
    [
        {"--modes": "naive"},  # a GPU mode the simulation does not model
        {"--modes": "harli,harli"},
        {"--instances": "0"},
        {"--rate-scale": "-1"},
        {"--trace": "chat"},
        {"--profile": "missing.json"},
        {"--profile": "no-units.json"},
        {"--profile": "not-json.json"},
        {"--replay": "not-json.json"},
        {"--job-target-tokens": "40"},  # as many targets as tokens
    ],
)
def test_bad_input_exits_2_and_writes_nothing(profile_path, tmp_path, capsys, change):
    bare = profile()
    bare["units"] = []
    (tmp_path / "no-units.json").write_text(json.dumps(bare))
    (tmp_path / "not-json.json").write_text("{")
    args = {
        "--profile": str(profile_path),
        "--objective-ms": "15",
        **dict(zip(JOB[::2], JOB[1::2], strict=True)),
    }
    for flag, value in change.items():
        args[flag] = str(tmp_path / value) if value.endswith(".json") else value
    out = tmp_path / "out"
    argv = ["simulate", "--out", str(out), *TRACE]
    for flag, value in args.items():
        argv += [flag, value]
    assert main(argv) == 2
    assert "error" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize(
    "change",
    [
        ["--hours", "inf"],  # looped forever
        ["--duration-s", "inf"],
        ["--rate-scale", "1e12"],  # looped, 2 GB
        ["--hours", "1e7"],  # finite, but years of requests
        ["--idle-quantum-ms", "0"],  # hung
        ["--idle-quantum-ms", "nan"],
        ["--objective-ms", "nan"],
        ["--start-s", "nan"],  # was accepted
        ["--profile", "list.json"],  # a traceback
        ["--replay", "list.json"],
        ["--replay", "bad-trace.json"],
    ],
)
def test_unbounded_or_malformed_input_exits_2_at_once(profile_path, tmp_path, change):
    """Each exits 2 with one clear line, in seconds: no traceback, no endless loop. Run in a
    process of its own with a deadline, since the old code hung on some of them."""
    import subprocess
    import sys

    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "bad-trace.json").write_text(json.dumps({"trace": [1], "modes": {}}))
    argv = ["simulate", "--profile", str(profile_path), "--out", str(tmp_path / "out"), *JOB]
    argv += [*TRACE, "--objective-ms", "15", "--finetune-budget-ms", "10"]
    flag, value = change
    argv += [flag, str(tmp_path / value) if value.endswith(".json") else value]
    try:
        done = subprocess.run(
            [sys.executable, "-m", "sglang_harli.bench", *argv],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"{flag} {value}: still running after 60 s")
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.startswith("simulate: error:") and "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()
