"""The TPOT objective in force, and whether this machine's decode can meet it.

An objective is either a number (``--harli-tpot-slo-ms 50``, or one set at runtime through
``POST /harli/mode``) or ``auto``: :data:`~sglang_harli.config.AUTO_SLO_MULTIPLE` times the solo
decode at the current batch, as stage 1 of the predictor estimates it (its refits and online
residual follow the machine as it changes). An auto objective moves only when that estimate
moves by more than :data:`AUTO_HYSTERESIS` of it, so it does not jitter with the decode's own
noise; until stage 1 predicts at all (no profile, fewer than 16 iterations measured) there is
no objective yet: nothing is planned beside decode (the policy's learning phase) and those
iterations are measured but not judged (``CoRunStats.unjudged``).

Before every plan the controller shows this module stage 1's estimate of the solo decode at the
current batch. When it is above what the mode plans within (``harli``: the objective less
``--harli-slo-margin``; the other modes: the objective itself), no finetune can run beside
decode and every iteration misses anyway: that is said at once, in one log warning and in
``/harli/status`` (``corun.objective``: ``fits`` false and the ``reason``), not per iteration.
It clears (one info line) once :data:`FIT_AGAIN_ITERATIONS` iterations in a row fit, so a batch
size that alternates across the boundary does not repeat the warning; a new objective is a new
situation and is judged at once. Nothing here imports SGLang.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from sglang_harli.config import AUTO_SLO_MULTIPLE

from .stats import DecodeStats

logger = logging.getLogger(__name__)

# an auto objective follows stage 1's estimate when it moves by more than this fraction of it
AUTO_HYSTERESIS = 0.1
# iterations in a row whose solo decode fits before "does not fit" is withdrawn
FIT_AGAIN_ITERATIONS = 32
# where a number came from: the command line, POST /harli/mode, or the measured decode
SOURCES = ("flag", "request", "auto")


class Objective:
    """The objective ``S`` (:attr:`seconds`: ``inf`` while an auto objective has nothing measured
    yet) and the diagnosis of whether the solo decode fits under it."""

    def __init__(self, seconds: float | None, source: str = "flag", log: bool = True):
        """``seconds``: a fixed objective; None: auto. ``log``: say what changes in the log (a
        server; a simulated instance of the fleet does not)."""
        if source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
        self.log = logger if log else None
        self.auto = seconds is None
        self.source = "auto" if self.auto else source
        self.seconds = math.inf if seconds is None else float(seconds)
        self.fits: bool | None = None  # None: nothing measured to judge by yet
        self.solo_s: float | None = None  # stage 1's latest estimate, at batch_size
        self.batch_size: int | None = None
        self.room_s: float | None = None  # what the mode plans within (S less the margin)
        self.last_stats: DecodeStats | None = None
        self._miss: tuple[int, float, float, float] | None = None  # batch, solo, room, S
        self._fit_streak = 0

    @property
    def known(self) -> bool:
        """False while an auto objective waits for stage 1's first estimate."""
        return math.isfinite(self.seconds)

    def observe(self, stats: DecodeStats, solo_s: float | None, margin: float = 0.0) -> bool:
        """Stage 1's estimate ``solo_s`` of the decode of ``stats`` (None while it learns), for
        a mode that plans within ``S (1 - margin)``. Returns whether :attr:`seconds` changed."""
        self.last_stats = stats
        if solo_s is None:
            return False
        changed = False
        if self.auto:
            wanted = AUTO_SLO_MULTIPLE * solo_s
            if not self.known or abs(wanted - self.seconds) > AUTO_HYSTERESIS * self.seconds:
                if not self.known and self.log:
                    self.log.info(
                        "Harli objective (auto): %g x the solo decode at batch %d (%.4g ms) = "
                        "%.4g ms; it follows the measured decode",
                        AUTO_SLO_MULTIPLE,
                        stats.batch_size,
                        solo_s * 1e3,
                        wanted * 1e3,
                    )
                self.seconds, changed = wanted, True
        self.solo_s, self.batch_size = solo_s, stats.batch_size
        self.room_s = self.seconds * (1.0 - margin)
        if solo_s > self.room_s:
            self._miss = (stats.batch_size, solo_s, self.room_s, self.seconds)
            self._fit_streak = 0
            if self.fits is not False:
                self.fits = False
                if self.log:
                    self.log.warning("Harli objective: %s", self.reason)
        elif self.fits is False:
            self._fit_streak += 1
            if self._fit_streak >= FIT_AGAIN_ITERATIONS:
                self.fits, self._miss = True, None
                if self.log:
                    self.log.info(
                        "Harli objective: the solo decode fits the %.4g ms objective again "
                        "(%.4g ms at batch %d for the last %d iterations)",
                        self.seconds * 1e3,
                        solo_s * 1e3,
                        stats.batch_size,
                        FIT_AGAIN_ITERATIONS,
                    )
        else:
            self.fits = True
        return changed

    def reset(self, seconds: float | None, source: str) -> None:
        """A new objective (``None``: auto), judged afresh: an auto one keeps what it measured
        if it was auto already; the diagnosis starts over (the caller observes again)."""
        kept = self.seconds if self.auto and seconds is None else None
        last_stats = self.last_stats
        self.__init__(seconds, source, log=self.log is not None)
        self.last_stats = last_stats
        if kept is not None:
            self.seconds = kept

    @property
    def reason(self) -> str | None:
        """Why the solo decode does not fit, in words for the log and the status; else None."""
        if self._miss is None:
            return None
        batch, solo_s, room_s, seconds = self._miss
        if room_s < seconds:
            within = (
                f"the {room_s * 1e3:.4g} ms harli plans within (the {seconds * 1e3:.4g} ms "
                f"objective less its {1 - room_s / seconds:.0%} margin): harli cannot train "
                "beside decode"
            )
        else:
            within = (
                f"the {seconds * 1e3:.4g} ms objective: decode alone misses it, whatever runs "
                "beside it"
            )
        if self.auto:
            fix = (
                f"lower --harli-slo-margin (auto sets the objective to {AUTO_SLO_MULTIPLE:g}x the "
                "solo decode)"
            )
        elif self.source == "request":
            fix = "raise tpot_slo_ms (POST /harli/mode) or set it to auto"
        else:
            fix = "raise --harli-tpot-slo-ms or use auto"
        return (
            f"the solo decode at batch {batch} takes {solo_s * 1e3:.4g} ms, above {within}; {fix}"
        )

    def to_dict(self) -> dict[str, Any]:
        """``corun.objective`` in ``/harli/status``."""

        def ms(seconds: float | None) -> float | None:
            if seconds is None or not math.isfinite(seconds):
                return None
            return round(seconds * 1e3, 4)

        out: dict[str, Any] = {
            "tpot_slo_ms": ms(self.seconds),
            "source": self.source,
            "solo_decode_ms": ms(self.solo_s),
            "batch_size": self.batch_size,
            "fits": self.fits,
            "reason": self.reason,
        }
        if self.auto:
            out["multiple"] = AUTO_SLO_MULTIPLE
            if not self.known:
                out["reason"] = (
                    f"auto: the objective will be {AUTO_SLO_MULTIPLE:g}x the solo decode once "
                    "the predictor estimates it; nothing is planned beside decode until then"
                )
        return out
