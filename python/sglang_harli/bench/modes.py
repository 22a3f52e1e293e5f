"""Which co-run modes a benchmark compares, and in what order (the replay and the simulation)."""

from __future__ import annotations

from sglang_harli.config import Mode

CPU_MODES = (Mode.OFF, Mode.IDLE_ONLY, Mode.TIME_SLICED, Mode.HARLI)
GPU_MODES = (*CPU_MODES, Mode.NAIVE, Mode.STATIC)


def parse_modes(text: str | None, has_cuda: bool) -> list[Mode]:
    """``--modes``: comma-separated concrete modes, each once (default: every mode this machine
    runs), ``off`` first."""
    if text is None:
        return list(GPU_MODES if has_cuda else CPU_MODES)
    modes = [Mode(m.strip()) for m in text.split(",") if m.strip()]
    if Mode.AUTO in modes or len(set(modes)) != len(modes):
        raise ValueError("--modes: each concrete mode at most once")
    # off first: the objective is calibrated on plain SGLang, and decode alone is the reference
    return sorted(modes, key=lambda m: m != Mode.OFF)
