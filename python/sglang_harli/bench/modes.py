"""Which co-run modes a benchmark compares, and in what order (the replay and the simulation).

The modes a machine runs come from the one table of modes (``corun/modes.py``); the fleet
simulation models the time-slice modes only (``bench/instance.py``: its units run after each
simulated decode), so it has its own, shorter list.
"""

from __future__ import annotations

from collections.abc import Sequence

from sglang_harli.corun.modes import Mode, device_of, runnable

# what bench simulate models: decode alone and the modes whose units run after the decode
SIMULATED = (Mode.OFF, Mode.IDLE_ONLY, Mode.TIME_SLICED, Mode.HARLI)


def replay_modes(has_cuda: bool) -> list[Mode]:
    """Every mode this machine runs, ``off`` first (the reference)."""
    return [Mode.OFF, *runnable(device_of(has_cuda))]


def parse_modes(text: str | None, allowed: Sequence[Mode]) -> list[Mode]:
    """``--modes``: comma-separated concrete modes of ``allowed``, each once (default: all of
    them), ``off`` first."""
    if text is None:
        return list(allowed)
    modes = [Mode(m.strip()) for m in text.split(",") if m.strip()]
    if Mode.AUTO in modes or len(set(modes)) != len(modes):
        raise ValueError("--modes: each concrete mode at most once")
    unknown = [str(m) for m in modes if m not in allowed]
    if unknown:
        raise ValueError(
            f"--modes: {', '.join(unknown)} not here; this runs {', '.join(map(str, allowed))}"
        )
    # off first: the objective is calibrated on plain SGLang, and decode alone is the reference
    return sorted(modes, key=lambda m: m != Mode.OFF)
