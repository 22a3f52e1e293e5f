"""Synthetic latency surfaces with a known truth, and profiles measured on them."""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Iterable

from sglang_harli.corun.predictor import PROFILE_FORMAT, Predictor, Stage1
from sglang_harli.corun.stats import DecodeStats

KEY = {"model": "tiny", "device": "cpu", "dtype": "float32", "tp_size": 1}

# the truth of most tests: 2 ms + 0.1 ms per request + 1 us per 1000 context tokens, nothing
# per longest sequence (a zero coefficient the fit must not make negative)
TRUE_COEF = [2e-3, 1e-4, 1e-6, 0.0]

# finetune units: seconds = overhead + cost * seconds_per_cost, per kind
TRUE_UNITS = {"forward": (2e-4, 1e-9), "backward": (3e-4, 2e-9), "optimizer": (0.0, 5e-10)}

Truth = Callable[[DecodeStats], float]


def linear(stats: DecodeStats, coef: Iterable[float] = TRUE_COEF) -> float:
    fixed, per_seq, per_token, per_max = coef
    return (
        fixed
        + per_seq * stats.batch_size
        + per_token * stats.seq_lens_sum
        + (per_max * stats.seq_len_max)
    )


def piecewise(stats: DecodeStats) -> float:
    """A CUDA-graph-like regime change above batch 8: more fixed cost, less per request."""
    if stats.batch_size <= 8:
        return linear(stats)
    return linear(stats, [3e-3, 5e-5, 1e-6, 0.0])


def unit_seconds(kind: str, cost: float) -> float:
    overhead, per_cost = TRUE_UNITS[kind]
    return overhead + per_cost * cost


def grid(
    batches: Iterable[int] = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32),
    contexts: Iterable[int] = (64, 256, 1024, 2048),
) -> list[DecodeStats]:
    """What a profiler measures: every batch size at a few context lengths."""
    return [DecodeStats(b, b * ctx, ctx) for b, ctx in itertools.product(batches, contexts)]


def random_shapes(seed: int, n: int, max_batch: int = 32, max_len: int = 2048) -> list[DecodeStats]:
    """Held-out iterations: requests of unequal lengths, so sum and max vary apart."""
    rng = random.Random(seed)
    shapes = []
    for _ in range(n):
        batch = rng.randint(1, max_batch)
        lengths = [rng.randint(16, max_len) for _ in range(batch)]
        shapes.append(DecodeStats(batch, sum(lengths), max(lengths)))
    return shapes


def noisy(seconds: float, rng: random.Random, sigma: float) -> float:
    return seconds * (1.0 + rng.gauss(0.0, sigma)) if sigma else seconds


def samples(
    shapes: Iterable[DecodeStats], truth: Truth = linear, sigma: float = 0.0, seed: int = 0
) -> list[tuple[DecodeStats, float]]:
    rng = random.Random(seed)
    return [(s, noisy(truth(s), rng, sigma)) for s in shapes]


def mape(predict: Callable[[DecodeStats], float | None], measured) -> float:
    """Mean absolute percentage error (as a fraction) over (stats, seconds) pairs."""
    errors = [abs(predict(s) - t) / t for s, t in measured]
    return sum(errors) / len(errors)


def profile(
    shapes: Iterable[DecodeStats] | None = None,
    truth: Truth = linear,
    *,
    key: dict | None = None,
    units: Iterable[tuple[str, float]] = (),
    interference: Iterable[tuple[str, float, float]] = (),
    buckets: tuple[int, ...] | None = None,
) -> dict:
    """A profile as ``python -m sglang_harli.profile`` writes it."""
    shapes = grid() if shapes is None else shapes
    data = {
        "format": PROFILE_FORMAT,
        "key": dict(KEY if key is None else key),
        "decode": [
            {
                "batch_size": s.batch_size,
                "seq_lens_sum": s.seq_lens_sum,
                "seq_len_max": s.seq_len_max,
                "seconds": truth(s),
            }
            for s in shapes
        ],
        "units": [
            {"kind": kind, "cost": cost, "seconds": unit_seconds(kind, cost)}
            for kind, cost in units
        ],
        "interference": [
            {"kind": kind, "share": share, "slowdown": slowdown}
            for kind, share, slowdown in interference
        ],
    }
    if buckets is not None:
        data["buckets"] = list(buckets)
    return data


UNIT_COSTS = [(kind, cost) for kind in TRUE_UNITS for cost in (1e5, 4e5, 1e6, 2e6, 4e6)]


def fitted_predictor(truth: Truth = linear) -> Predictor:
    """A predictor from a profile of ``truth`` and of every kind in TRUE_UNITS."""
    return Predictor.from_profile(profile(truth=truth, units=UNIT_COSTS))


def flat_predictor(decode_s: float) -> Predictor:
    """A predictor that says every decode iteration takes ``decode_s``."""
    return Predictor(stage1=Stage1(coef={-1: [decode_s, 0.0, 0.0, 0.0]}, learn=False))
