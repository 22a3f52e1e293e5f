"""A job's waits for memory, told to whoever watches: its events, the status, the log.

With unified memory a job's checkpointed activations live in KV slots SGLang lends and takes
back (``srt/kv_lender.py``). When none are lent the next unit cannot run and the job waits
while decode goes on. Short waits are routine (a burst takes the slots back for a second or
two); a long one means the pool is full, and a job that sits in ``running`` training nothing
must say so. So a wait that lasts :data:`REPORT_AFTER_S` becomes an event on the job (when it
began, and why), a warning in the log and ``waiting_for_memory`` in ``/harli/status`` and the
metrics; its end is an event with how long it lasted.

Plain bookkeeping on the scheduler thread (a clock read per unit); the runner submits the events.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

from .writes import NewEvent

logger = logging.getLogger(__name__)

REPORT_AFTER_S = 2.0  # shorter waits are routine: a burst took the slots back for a moment


@dataclasses.dataclass
class MemoryWaits:
    job_id: str
    since: float | None = None  # monotonic start of the wait under way
    reason: str = ""
    reported: bool = False  # the wait under way is an event already
    replanned: bool = False  # the wait under way re-planned the step once already
    count: int = 0  # waits reported (each lasted REPORT_AFTER_S or more)
    total_s: float = 0.0  # their time, ended ones

    @property
    def waiting(self) -> bool:
        return self.since is not None

    def wait(self, reason: str, now: float | None = None) -> list[NewEvent]:
        """The next unit found no room: the wait starts, or goes on; its event once it is long."""
        now = time.monotonic() if now is None else now
        if self.since is None:
            self.since, self.reported = now, False
        self.reason = reason
        waited = now - self.since
        if self.reported or waited < REPORT_AFTER_S:
            return []
        self.reported = True
        logger.warning(
            "fine-tuning job %s waits for memory (%.0f s so far): %s", self.job_id, waited, reason
        )
        started = int(time.time() - waited)
        return [
            NewEvent(
                f"Waiting for memory: {reason}",
                level="warning",
                data={"waiting_for_memory": True, "reason": reason},
                created_at=started,
            )
        ]

    def waited_s(self, now: float | None = None) -> float:
        """How long the wait under way has lasted (0 when none is)."""
        if self.since is None:
            return 0.0
        return (time.monotonic() if now is None else now) - self.since

    def resume(self, now: float | None = None) -> list[NewEvent]:
        """A unit ran: the wait under way, if any, ended; an event if it was reported."""
        if self.since is None:
            return []
        now = time.monotonic() if now is None else now
        waited, reported = now - self.since, self.reported
        self.since, self.reported, self.replanned, self.reason = None, False, False, ""
        if not reported:
            return []
        self.count += 1
        self.total_s += waited
        logger.info("fine-tuning job %s: memory again after %.1f s", self.job_id, waited)
        return [
            NewEvent(
                f"Memory available again: waited {waited:.1f} s",
                data={"waiting_for_memory": False, "waited_s": round(waited, 3)},
            )
        ]

    def to_dict(self, now: float | None = None) -> dict[str, Any]:
        now = time.monotonic() if now is None else now
        return {
            "waiting_for_memory": self.waiting,
            "memory_wait": (
                {"reason": self.reason, "waiting_s": round(now - self.since, 3)}
                if self.since is not None
                else None
            ),
            "memory_waits_reported": self.count,
            "memory_wait_s": round(self.total_s, 3),
        }
