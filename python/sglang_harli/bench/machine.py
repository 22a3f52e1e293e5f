"""The simulated machine: how long a decode iteration, a finetune unit and a prefill take on it,
drawn from a latency profile (``python -m sglang_harli.profile``) with the spread measured there.

Medians come from the project's predictor fitted on the profile (:meth:`Predictor.from_profile`:
stage 1 for a decode iteration, the per-kind unit rates for finetune units), frozen: it is the
machine's truth, not a server's belief. Each draw multiplies a median by a ratio drawn from the
profile's spread: every row of a profile recorded by this version carries the quantiles of its
recent samples (``quantile_levels``), and a ratio is drawn from the mixture of the rows' quantile
functions (each divided by its row's median, rows weighed by their samples): decode rows for a
decode iteration (and a prefill), a kind's rows for its units. A profile recorded before the
quantiles existed has only medians: its co-run iterations (measured total over the stage-2
prediction) give one spread for everything instead, which the report names.

A prefill comes from the profile's ``prefill`` rows (prefills of requests that found the server
idle, from the prefill's ``run_batch`` to the first decode: SGLang's loop included), fitted as
``fixed + per_request * requests + per_token * prompt tokens`` with their spread. A profile
without enough of them (older ones) has it modelled as a forward of the base model over the
prompt tokens at the rate its ``forward`` units were measured at, plus the logits of each
sequence's last token and stage 1's fixed cost: a finetune forward over a few dozen tokens
runs its matrix products far less efficiently than a prefill over hundreds (3x on SmolLM2 on
the CPU dev machine), so this overestimates long prefills.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from sglang_harli.corun.predictor import Predictor, decode_stats, nnls
from sglang_harli.corun.stats import DecodeStats
from sglang_harli.finetune import graph
from sglang_harli.finetune.base_model import ModelConfig

BLOCK = 4096  # ratios drawn per numpy call: one vector draw serves thousands of iterations
MIN_PREFILLS = 8  # measured prefills needed to fit them (else: from the forward units)


@dataclasses.dataclass(frozen=True)
class Spread:
    """Ratios of a duration to its median: a mixture of quantile functions at shared levels."""

    levels: np.ndarray  # (L,) increasing, from 0 to 1
    rows: np.ndarray  # (k, L) ratios at each level, per row
    weights: np.ndarray  # (k,) summing to 1

    @classmethod
    def constant(cls) -> Spread:
        return cls(np.array([0.0, 1.0]), np.ones((1, 2)), np.ones(1))

    @classmethod
    def of_rows(cls, rows: Sequence[dict[str, Any]], levels: Sequence[float]) -> Spread | None:
        """From profile rows with ``quantiles`` (None if none has them)."""
        kept = [r for r in rows if r.get("quantiles") and r.get("seconds")]
        if not kept:
            return None
        ratios = np.array([np.asarray(r["quantiles"]) / r["seconds"] for r in kept])
        weights = np.array([float(r.get("n", 1)) for r in kept])
        return cls(np.asarray(levels, dtype=float), ratios, weights / weights.sum())

    @classmethod
    def of_samples(cls, ratios: Sequence[float]) -> Spread:
        """The empirical distribution of ``ratios``, scaled to median 1."""
        ordered = np.sort(np.asarray(ratios, dtype=float))
        ordered /= np.median(ordered)
        levels = np.linspace(0.0, 1.0, len(ordered))
        return cls(levels, ordered[None, :], np.ones(1))

    def draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        rows = (
            rng.choice(len(self.weights), size=n, p=self.weights)
            if len(self.weights) > 1
            else np.zeros(n, dtype=int)
        )
        u = rng.random(n)
        hi = np.clip(np.searchsorted(self.levels, u, side="right"), 1, len(self.levels) - 1)
        lo = hi - 1
        span = self.levels[hi] - self.levels[lo]
        w = np.where(span > 0, (u - self.levels[lo]) / np.where(span > 0, span, 1.0), 0.0)
        left, right = self.rows[rows, lo], self.rows[rows, hi]
        return left + (right - left) * w


class Draws:
    """A stream of ratios from one spread, drawn ``BLOCK`` at a time (Python floats)."""

    def __init__(self, spread: Spread, rng: np.random.Generator):
        self.spread, self.rng = spread, rng
        self._values: list[float] = []
        self._next = 0

    def __call__(self) -> float:
        if self._next == len(self._values):
            self._values, self._next = self.spread.draw(self.rng, BLOCK).tolist(), 0
        value = self._values[self._next]
        self._next += 1
        return value


@dataclasses.dataclass
class Machine:
    """Medians and spreads of one machine (see the module docstring)."""

    truth: Predictor
    model: ModelConfig
    decode_spread: Spread
    unit_spreads: dict[str, Spread]
    tail_s: float = 0.0  # of a decode iteration's time, SGLang's work after the forward
    spread_source: str = "profile quantiles"
    # the scheduler's own time between two idle quanta (the job does not train then)
    idle_gap_s: float = 0.0
    idle_gap_spread: Spread = dataclasses.field(default_factory=Spread.constant)
    # measured prefills: seconds = fixed + per_request * requests + per_token * tokens
    prefill_coef: tuple[float, float, float] | None = None
    prefill_spread: Spread = dataclasses.field(default_factory=Spread.constant)

    @classmethod
    def from_profile(cls, profile: dict[str, Any], model: ModelConfig) -> Machine:
        truth = Predictor.from_profile(profile)
        levels = profile.get("quantile_levels")
        decode = Spread.of_rows(profile["decode"], levels) if levels else None
        units: dict[str, Spread] = {}
        if decode is not None:
            source = "profile quantiles"
            for kind in truth.units:
                rows = [r for r in profile.get("units", []) if r["kind"] == kind]
                units[kind] = Spread.of_rows(rows, levels) or Spread.constant()
        else:
            decode, source = _corun_spread(profile, truth)
            units = {kind: decode for kind in truth.units}
        tail = (profile.get("tail") or {}).get("seconds") or 0.0
        gap = profile.get("idle_gap") or {}
        gap_spread = (Spread.of_rows([gap], levels) if levels else None) or Spread.constant()
        machine = cls(
            truth, model, decode, units, float(tail), source, gap.get("seconds") or 0.0, gap_spread
        )
        machine.prefill_spread = decode
        prefills = profile.get("prefill") or []
        if len(prefills) >= MIN_PREFILLS:
            rows = [[1.0, float(r["batch_size"]), float(r["tokens"])] for r in prefills]
            coef = nnls(rows, [r["seconds"] for r in prefills])
            machine.prefill_coef = (coef[0], coef[1], coef[2])
            fitted = [sum(c * x for c, x in zip(coef, row, strict=True)) for row in rows]
            ratios = [r["seconds"] / f for r, f in zip(prefills, fitted, strict=True) if f > 0]
            machine.prefill_spread = Spread.of_samples(ratios)
        return machine

    def decode_s(self, stats: DecodeStats) -> float:
        """The median decode iteration (forward and SGLang's tail, no finetune)."""
        return self.truth.decode(stats)

    def unit_s(self, kind: str, cost: float) -> float:
        seconds = self.truth.unit(kind, cost)
        if seconds is None:
            raise ValueError(
                f"the profile has no {kind!r} units: record it with --train (a job running)"
            )
        return seconds

    def prefill_s(self, lengths: Sequence[int]) -> float:
        """The median prefill of sequences of ``lengths`` prompt tokens (one batch)."""
        if self.prefill_coef is not None:
            fixed, per_request, per_token = self.prefill_coef
            return fixed + per_request * len(lengths) + per_token * sum(lengths)
        per_layer = self.unit_s("forward", graph.layer_forward_flops(self.model, None, lengths))
        head = self.unit_s("head", graph.head_forward_flops(self.model, len(lengths)))
        fixed = self.decode_s(DecodeStats(0, 0, 0))
        return self.model.num_layers * per_layer + head + fixed

    def unit_draws(self, kind: str, rng: np.random.Generator) -> Draws:
        return Draws(self.unit_spreads.get(kind, Spread.constant()), rng)


def _corun_spread(profile: dict[str, Any], truth: Predictor) -> tuple[Spread, str]:
    """Old profiles (medians only): measured co-run iterations over their stage-2 prediction."""
    ratios = []
    for row in profile.get("corun", []):
        predicted = truth.corun_cpu(decode_stats(row), [tuple(u) for u in row["units"]])
        if predicted:
            ratios.append(row["seconds"] / predicted)
    if len(ratios) < 8:
        return Spread.constant(), "none (the profile has no spread: every draw is its median)"
    return Spread.of_samples(ratios), f"{len(ratios)} co-run iterations (profile without quantiles)"
