from __future__ import annotations

import time

import pytest

from sglang_harli.corun.stats import DecodeStats, HookStats


def test_decode_iterations_and_hook_time_are_counted():
    stats = HookStats()
    for batch_size in (1, 3):
        with stats.timed("before_decode"):
            stats.record_decode(DecodeStats(batch_size, 10 * batch_size, 12))
    with stats.timed("idle"):
        time.sleep(0.002)

    report = stats.to_dict()
    assert report["decode_iterations"] == 2
    assert report["decode_tokens"] == 4
    assert report["last_decode"] == {"batch_size": 3, "seq_lens_sum": 30, "seq_len_max": 12}
    assert report["hooks"]["before_decode"]["calls"] == 2
    assert report["hooks"]["idle"]["max_us"] >= 2000
    total = sum(h["total_us"] for h in report["hooks"].values())
    assert report["hook_overhead_us"] == pytest.approx(total)


def test_time_is_recorded_when_the_hook_raises():
    stats = HookStats()
    try:
        with stats.timed("reclaim_kv"):
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert stats.hooks["reclaim_kv"].calls == 1
