"""A short run of ``scripts/bench_memory.py``: the benchmark works end to end (its long runs and
their figures are in docs/benchmarks.md, not in CI)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from test.support.server_process import REPO

pytestmark = pytest.mark.server


def test_bench_memory_smoke(tmp_path):
    out = tmp_path / "bench.json"
    argv = [sys.executable, str(REPO / "scripts" / "bench_memory.py"), "--json", str(out)]
    argv += ["--pool", "4096", "--seconds", "2", "--loads", "0", "2", "--bursts", "1"]
    argv += ["--rounds", "1"]
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    [[lent, plain]] = json.loads(out.read_text())
    assert lent["lend"] == 0.9 and plain["lend"] == 0.0
    assert lent["phases"][0]["lent_mean"] > 0  # a job trains in lent slots...
    assert all(p["lent_mean"] == 0 for p in plain["phases"])  # ...and none are lent without
    assert all(p["retractions"] == 0 for p in lent["phases"] + plain["phases"])
    [burst] = lent["bursts"]
    assert burst["requests"] > 0 and burst["retractions"] == 0
    assert all(p["finetune_tokens_per_s"] > 0 for p in lent["phases"] + plain["phases"])
    assert "| streams |" in done.stdout and "burst 0:" in done.stdout
