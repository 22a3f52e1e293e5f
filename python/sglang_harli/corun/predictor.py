"""The two-stage decode-latency predictor, on plain numbers.

**Stage 1: a decode iteration alone.** The latency of one iteration (from its ``run_batch`` to
the next one: the time per output token its requests see) is fitted as::

    t = fixed + per_seq * batch_size + per_token * seq_lens_sum + per_max * seq_len_max

Decode is memory-bound, so the form follows the bytes an iteration reads: ``fixed`` is the
weights (read once whatever the batch) plus launch and scheduling overhead; ``per_token`` the KV
cache (every context token's K and V of every layer); ``per_seq`` what each request costs apart
from its context (sampling, bookkeeping, the LoRA path); ``per_max`` the padding of attention
backends that work on the longest sequence. The device changes regime where the batch crosses a
CUDA-graph bucket (on a CPU there is one regime), so the model is piecewise: one set of
coefficients per batch-size regime, fitted by non-negative least squares (a negative cost would
extrapolate to negative latencies).

**Stage 2: the same iteration beside a finetune plan.**

- CPU (time slices): the iteration takes its decode plus the finetune units run after it, so
  stage 2 predicts each unit's duration from its FLOP cost and the rate measured for its kind
  (``seconds = overhead + cost / rate``, per unit kind: forward, head, backward, optimizer, and
  the runner's own validation and snapshot units).
- GPU (SM shares): decode slows down while finetune kernels run beside it on ``share`` of the
  SMs (they compete for memory bandwidth and L2); stage 2 multiplies stage 1 by ``1 + slowdown``,
  interpolated in a table measured per share and unit kind.

**Online correction.** Every measured iteration updates a multiplicative residual per regime
(and per unit kind, and per share): ``r <- r + alpha * (measured / predicted - r)``. A profile
that is wrong by a factor ``k`` is corrected to within 5% after
``ceil(log(0.05 / |1/k - 1|) / log(1 - alpha))`` iterations of that regime (at the default alpha
0.25: 9 when the truth is twice the profile, 11 when it is half); :func:`iterations_to_heal`
computes it. Without a profile, stage 1 refits itself from its recent iterations, so the form's
coefficients are learned, not assumed.

Nothing here imports SGLang or torch; ``srt/scheduler.py`` feeds it.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .stats import DecodeStats

PROFILE_FORMAT = "sglang-harli-profile/1"
DEFAULT_ALPHA = 0.25
MIN_SAMPLES = 16  # solo iterations before a predictor with no profile predicts at all
MIN_REGIME_SAMPLES = 8  # a regime with fewer samples of its own uses the fit of all regimes
REFIT_EVERY = 32  # without a profile: refit stage 1 this often (a 4x4 solve)
FORGET = 0.995  # per sample: the learned fit weighs about the last 200 iterations
WINDOW = 512  # recent samples kept per unit kind for refits
# Admission bounds: the mean plus this many smoothed absolute deviations (as TCP's RTO is), so
# a unit or SGLang's tail that varies from one run to the next is budgeted near its worst case
SPREAD_K = 1.0


def features(stats: DecodeStats) -> list[float]:
    """Stage 1's regressors, in the order of its coefficients."""
    return [1.0, float(stats.batch_size), float(stats.seq_lens_sum), float(stats.seq_len_max)]


def nnls(rows: Sequence[Sequence[float]], targets: Sequence[float]) -> list[float]:
    """Least squares with every coefficient >= 0 (see :func:`nnls_normal`)."""
    a = np.asarray(rows, dtype=np.float64)
    y = np.asarray(targets, dtype=np.float64)
    return nnls_normal(a.T @ a, a.T @ y)


def nnls_normal(gram: np.ndarray, moment: np.ndarray) -> list[float]:
    """Non-negative least squares from the normal equations (``A^T A``, ``A^T y``): an active
    set that drops the most negative coefficient and solves again. A few 4x4 solves, so the
    scheduler can refit online in microseconds.

    Columns are scaled to unit norm first, so token counts in the thousands and a constant
    column weigh alike; columns that do not vary apart get the minimum-norm share (lstsq).
    """
    scale = np.sqrt(np.diag(gram)).copy()
    scale[scale == 0] = 1.0
    g = gram / np.outer(scale, scale)
    m = moment / scale
    active = list(range(len(m)))
    coef = np.zeros(len(m))
    while active:
        idx = np.ix_(active, active)
        sol = np.linalg.lstsq(g[idx], m[active], rcond=1e-10)[0]
        if (sol >= 0).all():
            coef[active] = sol
            break
        active.pop(int(np.argmin(sol)))
    return (coef / scale).tolist()


def iterations_to_heal(error_factor: float, alpha: float = DEFAULT_ALPHA, within: float = 0.05):
    """Iterations of one regime until a prediction off by ``error_factor`` is within ``within``."""
    start = abs(1.0 / error_factor - 1.0)  # the residual's distance from its target, relative
    if start <= within:
        return 0
    return math.ceil(math.log(within / start) / math.log(1.0 - alpha))


@dataclasses.dataclass
class Residual:
    """A multiplicative correction learned online: measured / predicted, smoothed."""

    alpha: float = DEFAULT_ALPHA
    factor: float = 1.0

    def update(self, measured: float, predicted: float) -> None:
        if predicted > 0 and measured > 0:
            self.factor += self.alpha * (measured / predicted - self.factor)


@dataclasses.dataclass
class Stage1:
    """Solo decode latency, piecewise linear by batch-size regime (see the module docstring)."""

    # upper batch-size bound of each regime but the last (CUDA-graph buckets; none on a CPU)
    buckets: tuple[int, ...] = ()
    coef: dict[int, list[float]] = dataclasses.field(default_factory=dict)
    alpha: float = DEFAULT_ALPHA
    learn: bool = True  # refit from recent iterations (no profile, or the profile is stale)
    residuals: dict[int, Residual] = dataclasses.field(default_factory=dict)
    # learning: exponentially forgotten normal equations per regime (-1: all regimes), so a
    # refit costs a 4x4 solve, not a pass over a window of samples
    _normal: dict[int, tuple] = dataclasses.field(default_factory=dict)
    _since_fit: int = 0

    def regime(self, stats: DecodeStats) -> int:
        return bisect.bisect_left(self.buckets, stats.batch_size)

    def fit(self, samples: Iterable[tuple[DecodeStats, float]]) -> None:
        """Coefficients per regime from (iteration, seconds) samples, all weighed alike; a
        regime with too few samples of its own uses the fit of all of them."""
        normal: dict[int, tuple] = {}
        for stats, seconds in samples:
            self._accumulate(normal, stats, seconds, forget=1.0)
        if normal:
            self._solve(normal)

    def _accumulate(self, normal: dict, stats: DecodeStats, seconds: float, forget: float):
        """Add one sample to the normal equations of its regime and of all (-1), the older
        samples weighed down by ``forget``. Plain Python: for 4x4 numbers it is faster than
        numpy's per-call overhead, and this runs on every decode iteration."""
        x = features(stats)
        for regime in (-1, self.regime(stats)):
            gram, moment, n = normal.get(regime) or ([[0.0] * 4 for _ in range(4)], [0.0] * 4, 0)
            for i, xi in enumerate(x):
                row = gram[i]
                for j, xj in enumerate(x):
                    row[j] = forget * row[j] + xi * xj
                moment[i] = forget * moment[i] + seconds * xi
            normal[regime] = (gram, moment, n + 1)

    def _solve(self, normal: dict) -> None:
        self.coef = {
            regime: nnls_normal(np.asarray(gram), np.asarray(moment))
            for regime, (gram, moment, n) in normal.items()
            if regime == -1 or n >= MIN_REGIME_SAMPLES
        }
        self.residuals.clear()  # a new fit absorbs what they corrected

    def base(self, stats: DecodeStats) -> float | None:
        coef = self.coef.get(self.regime(stats), self.coef.get(-1))
        if coef is None:
            return None
        return sum(c * x for c, x in zip(coef, features(stats), strict=True))

    def predict(self, stats: DecodeStats) -> float | None:
        """Seconds, or None while it knows nothing (no profile and too few iterations)."""
        base = self.base(stats)
        if base is None:
            return None
        residual = self.residuals.get(self.regime(stats))
        return base * (residual.factor if residual else 1.0)

    def observe(self, stats: DecodeStats, seconds: float) -> None:
        """A measured solo iteration: correct the residual, and (learning) refit now and then."""
        base = self.base(stats)
        if base is not None:
            self.residuals.setdefault(self.regime(stats), Residual(self.alpha)).update(
                seconds, base
            )
        if not self.learn:
            return
        self._accumulate(self._normal, stats, seconds, forget=FORGET)
        self._since_fit += 1
        seen = self._normal[-1][2]
        if (not self.coef and seen >= MIN_SAMPLES) or self._since_fit >= REFIT_EVERY:
            self._solve(self._normal)
            self._since_fit = 0

    @property
    def ready(self) -> bool:
        return bool(self.coef)


@dataclasses.dataclass
class UnitRate:
    """One unit kind's duration from its cost: ``overhead + cost / rate``, fitted on recent
    units, corrected online."""

    alpha: float = DEFAULT_ALPHA
    overhead_s: float = 0.0
    seconds_per_cost: float | None = None
    residual: Residual = dataclasses.field(default_factory=Residual)
    spread: float = 0.0  # smoothed |measured - predicted| / predicted
    _recent: collections.deque = dataclasses.field(
        default_factory=lambda: collections.deque(maxlen=WINDOW)
    )
    _since_fit: int = 0

    def bound(self, cost: float) -> float | None:
        """A duration this unit rarely exceeds: the prediction plus ``SPREAD_K`` deviations."""
        predicted = self.predict(cost)
        return None if predicted is None else predicted * (1.0 + SPREAD_K * self.spread)

    def fit(self, samples: Iterable[tuple[float, float]]) -> None:
        samples = [(c, t) for c, t in samples if t > 0]
        if not samples:
            return
        costs = [c for c, _ in samples]
        if max(costs) > 1.2 * min(costs) and len(samples) >= 4:
            self.overhead_s, self.seconds_per_cost = nnls(
                [[1.0, c] for c in costs], [t for _, t in samples]
            )
        else:  # one size of unit: its duration is all there is to learn
            self.overhead_s = 0.0
            ratios = sorted(t / max(c, 1.0) for c, t in samples)
            self.seconds_per_cost = ratios[len(ratios) // 2]
        self.residual = Residual(self.alpha)

    def predict(self, cost: float) -> float | None:
        if self.seconds_per_cost is None:
            return None
        return (self.overhead_s + self.seconds_per_cost * max(cost, 1.0)) * self.residual.factor

    def observe(self, cost: float, seconds: float) -> None:
        self._recent.append((cost, seconds))
        predicted = self.predict(cost)
        if predicted is None:
            self.fit(self._recent)
            return
        self.spread += self.alpha * (abs(seconds - predicted) / predicted - self.spread)
        self.residual.update(seconds, predicted)
        self._since_fit += 1
        if self._since_fit >= REFIT_EVERY:
            self.fit(self._recent)
            self._since_fit = 0


@dataclasses.dataclass
class Interference:
    """GPU stage 2: decode's slowdown beside finetune kernels on ``share`` of the SMs, per unit
    kind, linear between measured shares (0 at share 0), corrected online per share."""

    table: dict[str, dict[float, float]] = dataclasses.field(default_factory=dict)
    alpha: float = DEFAULT_ALPHA
    residuals: dict[float, Residual] = dataclasses.field(default_factory=dict)

    def slowdown(self, kind: str, share: float) -> float | None:
        points = self.table.get(kind)
        if not points:
            return None
        xs = [0.0, *sorted(points)]
        ys = [0.0, *(points[x] for x in xs[1:])]
        if share >= xs[-1]:
            return ys[-1]
        i = bisect.bisect_right(xs, share)
        x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
        return y0 + (y1 - y0) * (share - x0) / (x1 - x0)

    def factor(self, kinds: Iterable[str], share: float) -> float | None:
        """Decode's latency multiplier with these kinds in flight (the worst of them)."""
        slow = [self.slowdown(k, share) for k in set(kinds)]
        if not slow or any(s is None for s in slow):
            return None
        residual = self.residuals.get(share)
        return (1.0 + max(slow)) * (residual.factor if residual else 1.0)

    def observe(self, share: float, measured_factor: float, predicted_factor: float) -> None:
        self.residuals.setdefault(share, Residual(self.alpha)).update(
            measured_factor, predicted_factor
        )

    def factor_at(self, share: float) -> float | None:
        """Decode's latency multiplier beside units of any kind measured at ``share`` (the
        worst kind: the plan is made before it is known which units will be in flight)."""
        kinds = [kind for kind, points in self.table.items() if points]
        return self.factor(kinds, share) if kinds else None

    def learn(self, kinds: Iterable[str], share: float, slowdown: float) -> None:
        """A measured iteration beside ``kinds`` at ``share``: decode took ``1 + slowdown``
        times its solo prediction. Each kind's point at that share moves toward it (online, as
        stage 1 does); a kind never measured at that share starts there."""
        for kind in set(kinds):
            points = self.table.setdefault(kind, {})
            old = points.get(share)
            points[share] = slowdown if old is None else old + self.alpha * (slowdown - old)


@dataclasses.dataclass(frozen=True)
class ProfileKey:
    """What a profile was measured on; a server loads only a profile of its own kind."""

    model: str
    device: str
    dtype: str
    tp_size: int = 1

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ProfileKey:
        return cls(
            str(data["model"]), str(data["device"]), str(data["dtype"]), int(data["tp_size"])
        )


@dataclasses.dataclass
class Predictor:
    """Stage 1, the unit rates and the interference table, with where they came from."""

    stage1: Stage1 = dataclasses.field(default_factory=Stage1)
    units: dict[str, UnitRate] = dataclasses.field(default_factory=dict)
    interference: Interference = dataclasses.field(default_factory=Interference)
    source: str = "learning online (no profile)"
    # CPU: SGLang's work between a decode's forward and the next run_batch (sending results,
    # taking requests, scheduling), smoothed; part of stage 1's latency, after the slice
    tail_s: float = 0.0
    tail_spread_s: float = 0.0  # its smoothed absolute deviation

    # --- stage 1 -----------------------------------------------------------------------------

    def decode(self, stats: DecodeStats) -> float | None:
        return self.stage1.predict(stats)

    def observe_decode(
        self, stats: DecodeStats, seconds: float, tail_s: float | None = None
    ) -> None:
        """A measured solo iteration (``seconds``), of which ``tail_s`` came after the forward."""
        self.stage1.observe(stats, seconds)
        if tail_s is not None:
            error = tail_s - self.tail_s
            self.tail_s += DEFAULT_ALPHA * error
            self.tail_spread_s += DEFAULT_ALPHA * (abs(error) - self.tail_spread_s)

    @property
    def tail_bound_s(self) -> float:
        """SGLang's work after a slice, budgeted near its worst case (``SPREAD_K`` deviations)."""
        return self.tail_s + SPREAD_K * self.tail_spread_s

    # --- stage 2 -----------------------------------------------------------------------------

    def unit(self, kind: str, cost: float) -> float | None:
        """A finetune unit's seconds on a CPU (None: this kind never ran here yet)."""
        rate = self.units.get(kind)
        return rate.predict(cost) if rate is not None else None

    def unit_bound(self, kind: str, cost: float) -> float | None:
        """What admission budgets for a unit: its prediction plus its usual deviation."""
        rate = self.units.get(kind)
        return rate.bound(cost) if rate is not None else None

    def observe_unit(self, kind: str, cost: float, seconds: float) -> None:
        self.units.setdefault(kind, UnitRate()).observe(cost, seconds)

    def corun_cpu(self, stats: DecodeStats, units: Iterable[tuple[str, float]]) -> float | None:
        """CPU stage 2: the iteration with these (kind, cost) units run in its slice."""
        total = self.decode(stats)
        for kind, cost in units:
            seconds = self.unit(kind, cost)
            if total is None or seconds is None:
                return None
            total += seconds
        return total

    def observe_corun(
        self, stats: DecodeStats, seconds: float, beside: tuple[float, frozenset[str]]
    ) -> None:
        """A measured iteration with units of ``beside`` = (share, kinds) in flight: stage 2's
        table learns decode's slowdown there (stage 1 learns only from solo iterations)."""
        solo = self.decode(stats)
        share, kinds = beside
        if solo is not None and solo > 0 and kinds:
            self.interference.learn(kinds, share, max(seconds / solo - 1.0, 0.0))

    def corun_gpu(self, stats: DecodeStats, kinds: Iterable[str], share: float) -> float | None:
        """GPU stage 2: the iteration with finetune kernels of ``kinds`` on ``share`` of SMs."""
        solo, factor = self.decode(stats), self.interference.factor(kinds, share)
        return None if solo is None or factor is None else solo * factor

    # --- profiles ----------------------------------------------------------------------------

    @classmethod
    def from_profile(cls, profile: dict[str, Any], buckets: tuple[int, ...] = ()) -> Predictor:
        """A predictor fitted on a profile (see :func:`load_profile`); it still corrects itself
        online, but keeps the profile's form rather than refitting it."""
        stage1 = Stage1(buckets=tuple(profile.get("buckets", buckets)), learn=False)
        stage1.fit((decode_stats(row), row["seconds"]) for row in profile["decode"])
        units: dict[str, UnitRate] = {}
        by_kind: dict[str, list[tuple[float, float]]] = collections.defaultdict(list)
        for row in profile.get("units", []):
            by_kind[row["kind"]].append((row["cost"], row["seconds"]))
        for kind, rows in by_kind.items():
            units[kind] = UnitRate()
            units[kind].fit(rows)
        table: dict[str, dict[float, float]] = collections.defaultdict(dict)
        for row in profile.get("interference", []):
            table[row["kind"]][float(row["share"])] = float(row["slowdown"])
        key = profile["key"]
        return cls(
            stage1,
            units,
            Interference(dict(table)),
            source=f"profile of {key['model']} on {key['device']} ({len(profile['decode'])} "
            "decode points)",
        )

    def to_dict(self) -> dict[str, Any]:
        """What /harli/status shows of the predictor."""
        return {
            "source": self.source,
            "ready": self.stage1.ready,
            "tail_ms": round(self.tail_s * 1e3, 4),
            "stage1_coefficients": {
                str(k): [round(c, 12) for c in v] for k, v in self.stage1.coef.items()
            },
            "stage1_residuals": {
                str(k): round(r.factor, 4) for k, r in self.stage1.residuals.items()
            },
            "interference": {
                kind: {str(share): round(slow, 4) for share, slow in sorted(points.items())}
                for kind, points in sorted(self.interference.table.items())
            },
            "unit_seconds_per_gflop": {
                kind: round(rate.seconds_per_cost * 1e9 * rate.residual.factor, 6)
                for kind, rate in sorted(self.units.items())
                if rate.seconds_per_cost is not None
            },
        }


def decode_stats(row: dict[str, Any]) -> DecodeStats:
    return DecodeStats(int(row["batch_size"]), int(row["seq_lens_sum"]), int(row["seq_len_max"]))


def load_profile(path: str | Path, key: ProfileKey) -> tuple[dict[str, Any] | None, str]:
    """The profile at ``path`` if it was measured on ``key``'s kind of server, else None, with
    the reason in words (for the log and /harli/status)."""
    try:
        profile = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        return None, f"profile {path} unreadable ({exc}): learning online"
    if not isinstance(profile, dict) or profile.get("format") != PROFILE_FORMAT:
        return None, f"profile {path} is not a {PROFILE_FORMAT} file: learning online"
    try:
        theirs = ProfileKey.from_dict(profile["key"])
        if not profile["decode"]:
            raise ValueError("no decode points")
        Predictor.from_profile(profile)  # a bad row is refused here, not raised at start-up
    except (KeyError, TypeError, ValueError) as exc:
        return None, f"profile {path} is malformed ({exc}): learning online"
    if theirs != key:
        return None, f"profile {path} was measured on {theirs}, not {key}: learning online"
    return profile, f"loaded profile {path}"
