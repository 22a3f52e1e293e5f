"""What the scheduler hooks observe, and what the hooks themselves cost.

Kept apart from SGLang so the co-run policy can be tested on plain numbers: ``srt/scheduler.py``
turns SGLang's batches into :class:`DecodeStats` and reports through :class:`HookStats`.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from contextlib import contextmanager


@dataclasses.dataclass(frozen=True)
class DecodeStats:
    """One decode iteration as the latency predictor sees it."""

    batch_size: int
    seq_lens_sum: int
    seq_len_max: int


@dataclasses.dataclass
class HookTimer:
    """Calls of one hook and the time spent in our code inside it (not SGLang's)."""

    calls: int = 0
    total_ns: int = 0
    max_ns: int = 0

    def add(self, elapsed_ns: int) -> None:
        self.calls += 1
        self.total_ns += elapsed_ns
        self.max_ns = max(self.max_ns, elapsed_ns)

    def to_dict(self) -> dict[str, float | int]:
        return {
            "calls": self.calls,
            "total_us": self.total_ns / 1e3,
            "mean_us": self.total_ns / 1e3 / self.calls if self.calls else 0.0,
            "max_us": self.max_ns / 1e3,
        }


@dataclasses.dataclass
class HookStats:
    """Counters the Harli scheduler exposes on ``GET /harli/status``."""

    decode_iterations: int = 0
    decode_tokens: int = 0
    last_decode: DecodeStats | None = None
    hooks: dict[str, HookTimer] = dataclasses.field(default_factory=dict)
    # Time handed to finetune work on purpose: reported, but not counted as hook overhead.
    work: dict[str, HookTimer] = dataclasses.field(default_factory=dict)

    @contextmanager
    def timed(self, name: str, overhead: bool = True) -> Iterator[None]:
        start = time.perf_counter_ns()
        try:
            yield
        finally:
            timers = self.hooks if overhead else self.work
            timers.setdefault(name, HookTimer()).add(time.perf_counter_ns() - start)

    def record_decode(self, stats: DecodeStats) -> None:
        self.decode_iterations += 1
        self.decode_tokens += stats.batch_size
        self.last_decode = stats

    def to_dict(self) -> dict:
        return {
            "decode_iterations": self.decode_iterations,
            "decode_tokens": self.decode_tokens,
            "last_decode": dataclasses.asdict(self.last_decode) if self.last_decode else None,
            "hook_overhead_us": sum(t.total_ns for t in self.hooks.values()) / 1e3,
            "hooks": {name: t.to_dict() for name, t in sorted(self.hooks.items())},
            "finetune": {name: t.to_dict() for name, t in sorted(self.work.items())},
        }
