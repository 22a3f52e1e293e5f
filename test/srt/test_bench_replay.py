"""A short trace replay (``python -m sglang_harli.bench replay``), three modes on the tiny model:
the harness works end to end and writes what it promises, and one Harli server serves both of
its modes, switched at runtime (the long runs and their figures are in docs/benchmarks.md, not
in CI)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from sglang_harli.bench.trace import TraceScaling, load_trace
from test.support.server_process import REPO

pytestmark = pytest.mark.server

SCALING = ["--trace", "conv", "--rate-scale", "0.5", "--duration-s", "15"]
SCALING += ["--max-context-tokens", "128", "--max-output-tokens", "32"]
SCALING += ["--shared-prefix-tokens", "32"]  # a system prompt: the radix cache's to reuse


def test_replay_three_modes_on_two_server_starts(tmp_path, tiny_model_dir):
    out = tmp_path / "replay"
    argv = [sys.executable, "-m", "sglang_harli.bench", "replay", "--out", str(out)]
    argv += ["--modes", "harli,off,naive", "--model-path", str(tiny_model_dir), *SCALING]
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]

    report = json.loads((out / "report.json").read_text())
    expected = load_trace(
        TraceScaling(rate_scale=0.5, duration_s=15, max_context_tokens=128, max_output_tokens=32)
    )
    assert report["requests"] == len(expected) > 5
    assert list(report["modes"]) == ["off", "harli", "naive"]  # off first: S is calibrated on it
    # plain SGLang, then one Harli server for harli and naive: switched, not restarted
    assert done.stderr.count("starting the") == 2, done.stderr[-3000:]
    assert "switching the Harli server to naive" in done.stderr
    assert report["modes"]["naive"]["finetune_tokens_per_s"] > 0
    assert report["objective_ms"] == pytest.approx(2 * report["solo_gap_ms"])
    # the given rate, judged on the off server: the tiny model sustains it (else exit 3)
    load = report["load"]
    assert load["measured"] and not load["calibrated"] and load["overloaded"] is False
    assert load["rate_scale"] == 0.5 and load["capacity_rps"] >= load["offered_rps"] > 0
    for name, mode in report["modes"].items():
        assert mode["requests_completed"] == len(expected) and mode["requests_failed"] == 0, name
        for key in ("tpot_p50_ms", "tpot_p99_ms", "ttft_p50_ms", "ttft_p99_ms"):
            assert mode[key] > 0, (name, key)
        assert mode["tpot_p50_ms"] <= mode["tpot_p99_ms"]
        assert 0 <= mode["slo_attainment"]["requests"] <= 1
        # every prompt after the first finds (most of) the shared head cached
        assert 0 < mode["prefix_cache_hit_rate"] < 1, name
    assert report["modes"]["off"]["finetune_tokens_per_s"] == 0  # plain SGLang trains nothing
    harli = report["modes"]["harli"]
    assert harli["finetune_tokens_per_s"] > 0  # the job trained beside the replay
    assert harli["slo_attainment"]["source"] == "server"
    assert harli["slo_attainment"]["iterations_measured"] > 100

    raw = json.loads((out / "raw.json").read_text())
    sent = sorted(r["context_tokens"] for r in raw["off"]["run"]["requests"])
    assert sent == sorted(r.context_tokens for r in expected)  # the trace's lengths, capped
    assert all(r["tokens"] == r["output_tokens"] for r in raw["harli"]["run"]["requests"])

    table = (out / "report.md").read_text()
    assert "| off |" in table and "| harli |" in table and "prefix cache hits" in table
    # what the harli server measured, as a profile the fleet simulation takes
    profile = json.loads((out / "profile.json").read_text())
    assert profile["key"]["model"] and profile["decode"] and profile["units"]
    # unified memory is on by default: the job trained in lent KV slots, plotted over time
    for png in ("tpot_cdf.png", "timeline.png", "finetune_progress.png", "lent_memory.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png


def test_replay_refuses_bad_input(tmp_path):
    base = [sys.executable, "-m", "sglang_harli.bench", "replay", "--out", str(tmp_path / "x")]
    for extra, message in (
        (["--modes", "harli"], "--objective-ms"),
        (["--modes", "harli", "--objective-ms", "10"], "--rate-scale"),  # no off: no load probe
        (["--modes", "bogus"], "bogus"),
        (["--trace", "nope"], "unknown trace"),
        (["--rate-scale", "0"], "rate_scale"),
        (["--start-s", "999999"], "no request"),
    ):
        done = subprocess.run(base + extra, cwd=REPO, capture_output=True, text=True, timeout=120)
        assert done.returncode == 2, (extra, done.stderr)
        assert message in done.stderr, (extra, done.stderr)
    assert not (tmp_path / "x").exists()  # nothing written
