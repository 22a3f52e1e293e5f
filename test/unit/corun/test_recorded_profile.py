"""The predictor on a profile recorded from the real server (CPU, tiny model): points held out
of the fit are predicted within 5% (stage 1) and 10% (stage 2, decode plus finetune units).

``test/data/cpu_profile.json`` was written by ``python -m sglang_harli.profile --train`` against
a Harli server on the 2-core dev machine (see ``docs/benchmarks.md``). Its points are medians of
what the server measured: decode shapes (batch size, context in 32-token steps) and unit sizes.
Co-run iterations are single measurements, so stage 2 is judged on the median of each group of
iterations that ran the same units beside the same batch size.
"""

from __future__ import annotations

import collections
import json
import statistics
from pathlib import Path

import pytest

from sglang_harli.corun.predictor import Predictor, decode_stats

PROFILE = Path(__file__).resolve().parents[2] / "data" / "cpu_profile.json"


@pytest.fixture(scope="module")
def profile() -> dict:
    return json.loads(PROFILE.read_text())


def mape(pairs) -> float:
    return statistics.fmean(abs(p - m) / m for p, m in pairs)


def test_stage1_predicts_held_out_decode_shapes_within_5_percent(profile):
    rows = sorted(profile["decode"], key=lambda r: (r["batch_size"], r["seq_lens_sum"]))
    assert len({r["batch_size"] for r in rows}) >= 3, "the grid should span batch sizes"
    fit, held_out = rows[0::2], rows[1::2]
    predictor = Predictor.from_profile({**profile, "decode": fit})
    error = mape((predictor.decode(decode_stats(r)), r["seconds"]) for r in held_out)
    print(f"stage 1: {len(fit)} points fitted, {len(held_out)} held out, MAPE {error:.2%}")
    assert error <= 0.05


def test_stage2_predicts_held_out_co_run_iterations_within_10_percent(profile):
    predictor = Predictor.from_profile(profile)
    groups = collections.defaultdict(list)
    for row in profile["corun"]:
        kinds = tuple(sorted(kind for kind, _ in row["units"]))
        groups[row["batch_size"], kinds].append(row)
    pairs = []
    for rows in groups.values():
        if len(rows) < 3:
            continue
        predicted = [predictor.corun_cpu(decode_stats(r), r["units"]) for r in rows]
        pairs.append((statistics.median(predicted), statistics.median(r["seconds"] for r in rows)))
    assert len(pairs) >= 5
    error = mape(pairs)
    print(f"stage 2: {len(pairs)} groups of co-run iterations, MAPE {error:.2%}")
    assert error <= 0.10


def test_the_recorded_profile_is_keyed_to_what_it_measured(profile):
    assert profile["format"] == "sglang-harli-profile/1"
    assert profile["key"]["device"] == "cpu" and profile["key"]["tp_size"] == 1
    assert {u["kind"] for u in profile["units"]} >= {"forward", "backward", "optimizer"}
