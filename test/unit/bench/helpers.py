"""Profiles written out by hand for the simulation's tests: a machine whose truth is known.

Rows are what ``python -m sglang_harli.profile`` writes (``corun.CoRun.samples``), on a decode
latency and unit rates chosen here, so a test can say what the simulation must find.
"""

from __future__ import annotations

from typing import Any

from sglang_harli.bench.job_shape import JobShape, embedded_model_path, job_from_numbers
from sglang_harli.corun.controller import QUANTILE_LEVELS
from sglang_harli.corun.predictor import PROFILE_FORMAT
from sglang_harli.corun.stats import DecodeStats

# decode: 4 ms fixed, 0.2 ms per sequence, 2 us per context token
FIXED_S, PER_SEQ_S, PER_TOKEN_S = 4e-3, 2e-4, 2e-6
SECONDS_PER_FLOP = 2e-11  # every unit kind: 50 GFLOP/s
UNIT_OVERHEAD_S = 1e-4
# ratios to the median at QUANTILE_LEVELS (0, .1, .25, .5, .75, .9, .95, 1): a right tail
RATIOS = (0.9, 0.95, 0.98, 1.0, 1.05, 1.2, 1.5, 3.0)


def decode_truth_s(stats: DecodeStats) -> float:
    return FIXED_S + PER_SEQ_S * stats.batch_size + PER_TOKEN_S * stats.seq_lens_sum


def unit_truth_s(cost: float) -> float:
    return UNIT_OVERHEAD_S + SECONDS_PER_FLOP * cost


def tiny_job(batch_size: int = 1) -> JobShape:
    """The tiny model's job of identical 40-token sequences (16 target tokens each)."""
    return job_from_numbers(40, 16, batch_size, embedded_model_path("tiny-llama"))


def profile(
    spread: bool = True, job: JobShape | None = None, idle_gap_s: float | None = None
) -> dict[str, Any]:
    """A profile of the machine above: decode shapes of 1..8 sequences at two contexts, every
    unit kind of ``job`` at its costs and at up to three times them; quantiles when ``spread``;
    the scheduler's time between idle quanta when ``idle_gap_s``."""
    job = job or tiny_job()

    def row(seconds: float) -> dict[str, Any]:
        out: dict[str, Any] = {"seconds": seconds, "n": 64}
        if spread:
            out["quantiles"] = [seconds * r for r in RATIOS]
        return out

    decode = []
    for batch in (1, 2, 4, 8):
        for context in (32, 256):
            stats = DecodeStats(batch, batch * context, context)
            decode.append({**vars(stats), **row(decode_truth_s(stats))})
    units = []
    steps = job.steps(0)
    kinds = {unit for _ in range(job.checkpoint_every) for unit in next(steps)[0]}
    for kind, cost in sorted(kinds):
        for scale in (1.0, 1.5, 2.0, 3.0):
            units.append({"kind": kind, "cost": cost * scale, **row(unit_truth_s(cost * scale))})
    out: dict[str, Any] = {
        "format": PROFILE_FORMAT,
        "key": {"model": "tiny-llama", "device": "cpu", "dtype": "bfloat16", "tp_size": 1},
        "decode": decode,
        "units": units,
        "corun": [],
        "tail": {"seconds": 5e-4, "spread_s": 1e-4},
    }
    if spread:
        out["quantile_levels"] = list(QUANTILE_LEVELS)
    if idle_gap_s is not None:
        out["idle_gap"] = row(idle_gap_s)
    return out
