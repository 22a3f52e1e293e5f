"""One decision for all tensor-parallel ranks.

At TP > 1 every rank trains its shard of the same job, and every work unit of a step holds
collectives (``finetune/parallel.py``): all ranks must run the same units in the same order, or
one waits forever in a collective the others skipped. Yet what decides whether a unit runs is
local: the policy's plan and its admission (clocks, each rank's own predictor), a job claimed
and built on one thread, a cancel flag read from the store, a store that stops answering.

So those are decided once, by rank 0, and every rank acts on the same table. SGLang's TP ranks
already run their event loops in lockstep (each loop pass starts with rank 0's requests
broadcast to all), so the hooks that may train (a decode iteration, an idle pass) are called
the same number of times on every rank, in the same order. On that shared count:

- **which job** (:meth:`RankSync.agree_runner`): while no job is agreed, every ``POLL_EVERY``-th
  hook is a poll: one :meth:`RankSync.table` exchange (an ``all_gather`` of a few integers over
  SGLang's CPU group) of the runner each rank holds (job id, and the step it starts from). A
  follower not holding rank 0's job has its agent build that job's runner (off the scheduler
  thread) meanwhile; once every rank holds it, it is the agreed job, on every rank at once. Other
  hooks cost nothing: the price of waiting for a job is one exchange per ``POLL_EVERY`` hooks.
- **each unit** (:meth:`RankSync.unit`): while a job is agreed, every rank enters the job's
  slice at every hook, and before each unit rank 0 gives its verdict (run, stop: its plan wants
  no finetune now or the slice is spent, pause, cancel, drop the job) and each rank the kind of
  its own next unit. All take rank 0's verdict; if any rank has no unit ready all wait; if the
  kinds differ the job fails on every rank (a bug, said loudly, never a hang). The runner ends
  on the same unit everywhere, and with it the agreement.

Because every rank computes the outcome from the same gathered tables, no rank's local timing
or state can make it enter a collective the others skip. No SGLang here: ``group`` is any
``torch.distributed`` group (SGLang's TP CPU group in a server).
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

import torch
import torch.distributed as dist

ID_WORDS = 6  # a job id of up to 48 bytes, in int64 words


class Verdict(enum.IntEnum):
    """What rank 0 says before a unit (and what a follower reports: RUN or WAIT)."""

    RUN = 0  # the next unit runs
    WAIT = 1  # no unit is ready (paused, or a checkpoint's previous write): the slice ends
    STOP = 2  # the policy admits no more this slice
    PAUSE = 3  # the job store does not answer: the job waits, decode goes on
    CANCEL = 4  # the job is cancelled
    DROP = 5  # the job is no longer this server's (or the agent failed it): drop it


@dataclasses.dataclass(frozen=True)
class JobKey:
    """A runner's job and the optimizer step it started from: ranks train together only if
    all of theirs are equal."""

    job_id: str
    step: int


class RankDivergence(RuntimeError):
    """The ranks' next units differ: a bug; the job fails on every rank."""


class RankSync:
    POLL_EVERY = 16  # hooks between polls while no job is agreed

    def __init__(self, rank: int, size: int, group: Any = None):
        self.rank, self.size, self.group = rank, size, group
        self.exchanges = 0
        self.agreed: JobKey | None = None  # the job every rank holds a runner of
        self.lead_holds = False  # at the last poll, rank 0 held a job
        self._hooks = 0

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def table(self, row: list[int]) -> torch.Tensor:
        """Every rank's ``row`` (equal lengths), as a [size, len] tensor, rank order."""
        mine = torch.tensor(row, dtype=torch.int64)
        rows = [torch.empty_like(mine) for _ in range(self.size)]
        dist.all_gather(rows, mine, group=self.group)
        self.exchanges += 1
        return torch.stack(rows)

    def agree_runner(self, runner: Any, agent: Any) -> tuple[Any, bool]:
        """At a hook that may train, on every rank: ``runner`` is the one this rank holds (a
        ``jobs.runner.JobRunner``), ``agent`` a follower's ``jobs.agent.FollowerAgent``.
        Returns (the runner this rank holds now, whether it enters the job's slice: then rank
        0's verdicts decide each unit, :meth:`unit`)."""
        self._hooks += 1
        held = None if runner is None else JobKey(runner.job.id, runner.started_at_step)
        if self.agreed is not None:
            if held == self.agreed:
                return runner, True
            self.agreed = None  # its runner ended, on the same unit on every rank
        if self._hooks % self.POLL_EVERY:
            return runner, False
        table = self.table(_encode(held)).tolist()
        lead = _decode(table[0])
        self.lead_holds = lead is not None
        if lead is not None and all(_decode(row) == lead for row in table):
            self.agreed = lead
            return runner, True
        if self.leader or held == lead:
            return runner, False
        if lead is None:  # a follower's runner of a job rank 0 no longer trains
            agent.forget()
            return None, False
        return agent.runner_for(lead.job_id, lead.step), False

    def unit(self, verdict: Verdict, kind: str | None) -> Verdict:
        """Before a unit: this rank's verdict and next unit kind -> the verdict all act on."""
        code = _KINDS.setdefault(kind, len(_KINDS)) if kind is not None else -1
        table = self.table([int(verdict), code]).tolist()
        lead = Verdict(table[0][0])
        if lead != Verdict.RUN:
            return lead
        if any(Verdict(v) == Verdict.WAIT for v, _ in table):
            return Verdict.WAIT
        kinds = {k for _, k in table}
        if len(kinds) != 1:
            names = {v: k for k, v in _KINDS.items()}
            raise RankDivergence(
                "tensor-parallel ranks diverged: next units "
                + ", ".join(f"rank {r}: {names.get(k, k)}" for r, (_, k) in enumerate(table))
            )
        return Verdict.RUN


# Unit kinds as integers; every rank registers the same kinds (the trainer's and the runner's,
# listed here so that the codes never depend on the order a rank first met them).
_KINDS: dict[str | None, int] = {
    kind: i
    for i, kind in enumerate(
        (
            "plan",
            "forward",
            "head",
            "recompute",
            "backward",
            "optimizer",
            "validation",
            "checkpoint",
            "encode",
        )
    )
}


def _encode(key: JobKey | None) -> list[int]:
    if key is None:
        return [-1] + [0] * (ID_WORDS + 1)
    raw = key.job_id.encode()
    if len(raw) > 8 * ID_WORDS:
        raise ValueError(f"job id {key.job_id!r} is longer than {8 * ID_WORDS} bytes")
    raw = raw.ljust(8 * ID_WORDS, b"\0")
    words = [int.from_bytes(raw[i : i + 8], "little", signed=True) for i in range(0, len(raw), 8)]
    return [key.step, len(key.job_id.encode()), *words]


def _decode(row: list[int]) -> JobKey | None:
    step, length, *words = row
    if step < 0:
        return None
    raw = b"".join(w.to_bytes(8, "little", signed=True) for w in words)[:length]
    return JobKey(raw.decode(), step)
