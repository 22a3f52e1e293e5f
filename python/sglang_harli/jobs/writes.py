"""What a job's runner writes, as values: :meth:`JobStore.apply` applies a list of them in one
transaction that holds only while the writer still owns the job (``jobs/agent.py`` queues them,
retries them while the store is locked or the disk fails).

A write sees only the open transaction, the job's id and how the store spells a path (relative
to its state directory): ``JobWrite.apply(db, job_id, relative)``, nothing else of the store.

Also how values are stored, for these writes and the store's own alike: JSON with every
non-finite number (a diverged loss) as null, so every reader gets valid JSON
(:func:`job_columns`); and the one status change the lifecycle allows (:func:`change_status`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .lifecycle import ALLOWED_FROM, JobStatus
from .records import new_id

# how the store spells a path in the database: relative to its state directory
Relative = Callable[[str | Path], str]


class JobWrite:
    """One change to a job's records; ``apply`` returns stored paths of directories it took
    out of the database, for the store to delete once the transaction commits."""

    def apply(self, db: sqlite3.Connection, job_id: str, relative: Relative) -> list[str]:
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class NewEvent(JobWrite):
    message: str
    level: str = "info"
    type: str = "message"
    data: dict[str, Any] | None = None
    created_at: int = dataclasses.field(default_factory=lambda: int(time.time()))

    def apply(self, db: sqlite3.Connection, job_id: str, relative: Relative) -> list[str]:
        insert_event(db, job_id, self)
        return []


@dataclasses.dataclass(frozen=True)
class Progress(JobWrite):
    """Columns of the job's row (step, trained_tokens, total_steps, adapter_path...)."""

    fields: dict[str, Any]

    def apply(self, db: sqlite3.Connection, job_id: str, relative: Relative) -> list[str]:
        update_job(db, job_id, job_columns(self.fields, relative))
        return []


@dataclasses.dataclass(frozen=True)
class AddCheckpointRecord(JobWrite):
    """Record a checkpoint whose files are written (the row the API lists and resume reads)."""

    step: int
    path: str  # a directory (absolute, or relative to the state dir)
    metrics: dict[str, Any]
    created_at: int = dataclasses.field(default_factory=lambda: int(time.time()))

    def apply(self, db: sqlite3.Connection, job_id: str, relative: Relative) -> list[str]:
        db.execute(
            "INSERT INTO checkpoints (id, job_id, created_at, step, path, metrics)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (
                new_id("ftckpt"),
                job_id,
                self.created_at,
                self.step,
                relative(self.path),
                json_text(self.metrics),
            ),
        )
        return []


@dataclasses.dataclass(frozen=True)
class Prune(JobWrite):
    """Keep the newest ``keep`` checkpoints (by step); the others go, rows and directories."""

    keep: int

    def apply(self, db: sqlite3.Connection, job_id: str, relative: Relative) -> list[str]:
        rows = db.execute(
            "SELECT seq, path FROM checkpoints WHERE job_id = ? ORDER BY step DESC, seq DESC"
            " LIMIT -1 OFFSET ?",
            (job_id, self.keep),
        ).fetchall()
        db.executemany("DELETE FROM checkpoints WHERE seq = ?", [(r["seq"],) for r in rows])
        return [r["path"] for r in rows]


@dataclasses.dataclass(frozen=True)
class Rewind(JobWrite):
    """A job resumes from its checkpoint at ``step``: what the lost run recorded after it (its
    metric events, later checkpoints) goes, so no step is listed twice."""

    step: int

    def apply(self, db: sqlite3.Connection, job_id: str, relative: Relative) -> list[str]:
        db.execute(
            "DELETE FROM events WHERE job_id = ? AND type = 'metrics'"
            " AND json_extract(data, '$.step') > ?",
            (job_id, self.step),
        )
        rows = db.execute(
            "SELECT seq, path FROM checkpoints WHERE job_id = ? AND step > ?", (job_id, self.step)
        ).fetchall()
        db.executemany("DELETE FROM checkpoints WHERE seq = ?", [(r["seq"],) for r in rows])
        db.execute("UPDATE jobs SET step = ? WHERE id = ?", (self.step, job_id))
        return [r["path"] for r in rows]


@dataclasses.dataclass(frozen=True)
class Outcome(JobWrite):
    """The job ends (failed or cancelled), if the lifecycle allows it from where it is."""

    status: JobStatus
    error: dict[str, Any] | None = None

    def apply(self, db: sqlite3.Connection, job_id: str, relative: Relative) -> list[str]:
        fields = {"error": self.error, "finished_at": int(time.time()), "lease_expires": None}
        change_status(db, job_id, JobStatus(self.status), job_columns(fields, relative))
        return []


def change_status(
    db: sqlite3.Connection, job_id: str, status: JobStatus, columns: dict[str, Any]
) -> bool:
    """Move a job to ``status``, setting ``columns`` (as :func:`job_columns` encodes them), if
    the lifecycle allows that move from its current state; False (nothing written) if not. The
    one status change: ``JobStore.set_status`` and :class:`Outcome` both make it."""
    columns = {"status": str(status), **columns}
    assignments = ", ".join(f"{name} = ?" for name in columns)
    sources = sorted(str(s) for s in ALLOWED_FROM[status])
    marks = ", ".join("?" * len(sources))
    cursor = db.execute(
        f"UPDATE jobs SET {assignments} WHERE id = ? AND status IN ({marks})",
        (*columns.values(), job_id, *sources),
    )
    return cursor.rowcount == 1


def job_columns(fields: dict[str, Any], relative: Relative) -> dict[str, Any]:
    """Column values of a job's row as stored: dicts as JSON (non-finite numbers null), the
    adapter's path relative to the state directory."""
    columns = {k: to_db(v) for k, v in fields.items()}
    if columns.get("adapter_path") is not None:
        columns["adapter_path"] = relative(columns["adapter_path"])
    return columns


def insert_event(db: sqlite3.Connection, job_id: str, event: NewEvent) -> None:
    db.execute(
        "INSERT INTO events (job_id, created_at, level, message, type, data)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        (job_id, event.created_at, event.level, event.message, event.type, to_db(event.data)),
    )


def update_job(db: sqlite3.Connection, job_id: str, columns: dict[str, Any]) -> None:
    if columns:
        assignments = ", ".join(f"{name} = ?" for name in columns)
        db.execute(f"UPDATE jobs SET {assignments} WHERE id = ?", (*columns.values(), job_id))


def finite(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, +-inf) replaced by None, recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


def json_text(value: Any) -> str:
    return json.dumps(finite(value), allow_nan=False)


def to_db(value: Any) -> Any:
    if isinstance(value, dict):
        return json_text(value)
    return finite(value)


def from_db(text: str | None) -> Any:
    """Stored JSON; NaN and Infinity written before they were nulled read as None too."""
    return json.loads(text, parse_constant=lambda _: None) if text else None
