"""The job store: files, fine-tuning jobs, their events and checkpoints, in one SQLite file.

The main process (HTTP API, adapter publisher) and the scheduler processes (job execution)
share it; SQLite in WAL mode lets them read while one writes. Every method opens its own short
connection, so the store is safe to use from any thread or process. Records come back as the
dataclasses below; the API turns them into OpenAI's JSON shapes.

Job states and the moves between them are ``lifecycle.py``'s; :meth:`JobStore.set_status` applies
a move only from a state it allows. A job that was running when its server stopped goes back to
queued at the next start and resumes from its last checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sglang_harli import durable

from .lifecycle import ACTIVE_STATES, ALLOWED_FROM, FINAL_STATES, JobStatus, adapter_name

DB_NAME = "harli.db"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY, filename TEXT NOT NULL, purpose TEXT NOT NULL,
    bytes INTEGER NOT NULL, created_at INTEGER NOT NULL, path TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, seq INTEGER NOT NULL, created_at INTEGER NOT NULL,
    model TEXT NOT NULL, training_file TEXT NOT NULL, validation_file TEXT,
    suffix TEXT, adapter_name TEXT NOT NULL, seed INTEGER NOT NULL,
    hyperparameters TEXT NOT NULL, status TEXT NOT NULL,
    started_at INTEGER, finished_at INTEGER, estimated_finish INTEGER,
    fine_tuned_model TEXT, adapter_path TEXT, error TEXT,
    trained_tokens INTEGER, step INTEGER NOT NULL DEFAULT 0, total_steps INTEGER,
    cancel_requested INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, job_id TEXT NOT NULL, created_at INTEGER NOT NULL,
    level TEXT NOT NULL, message TEXT NOT NULL, type TEXT NOT NULL, data TEXT
);
CREATE TABLE IF NOT EXISTS checkpoints (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, job_id TEXT NOT NULL,
    created_at INTEGER NOT NULL, step INTEGER NOT NULL, path TEXT NOT NULL, metrics TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_job ON events (job_id, seq);
CREATE INDEX IF NOT EXISTS checkpoints_by_job ON checkpoints (job_id, seq);
"""


@dataclasses.dataclass(frozen=True)
class FileRecord:
    id: str
    filename: str
    purpose: str
    bytes: int
    created_at: int
    path: str  # absolute; the database stores it relative to the state dir


class FileInUseError(Exception):
    """A file that an active job (validating, queued or running) still needs."""

    def __init__(self, file_id: str, job_ids: list[str]):
        super().__init__(f"file {file_id} is used by {', '.join(job_ids)}")
        self.file_id, self.job_ids = file_id, job_ids


@dataclasses.dataclass(frozen=True)
class Job:
    id: str
    created_at: int
    model: str
    training_file: str
    validation_file: str | None
    suffix: str | None
    adapter_name: str
    seed: int
    hyperparameters: dict[str, Any]
    status: str
    started_at: int | None
    finished_at: int | None
    estimated_finish: int | None
    fine_tuned_model: str | None
    adapter_path: str | None
    error: dict[str, Any] | None
    trained_tokens: int | None
    step: int
    total_steps: int | None
    cancel_requested: bool


@dataclasses.dataclass(frozen=True)
class Event:
    id: str
    job_id: str
    created_at: int
    level: str
    message: str
    type: str
    data: dict[str, Any] | None


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    id: str
    job_id: str
    created_at: int
    step: int
    path: str
    metrics: dict[str, Any]


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


class JobStore:
    def __init__(self, state_dir: str | Path):
        self.state_dir = Path(state_dir)
        self.files_dir = self.state_dir / "files"
        self.jobs_dir = self.state_dir / "jobs"
        for d in (self.files_dir, self.jobs_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.db_path = self.state_dir / DB_NAME
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(_SCHEMA)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.db_path, timeout=30, isolation_level=None)
        db.row_factory = sqlite3.Row
        try:
            yield db
        finally:
            db.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    # --- files -------------------------------------------------------------------------------

    def add_file(self, filename: str, purpose: str, content: bytes | Path) -> FileRecord:
        """Store an upload: ``content`` is its bytes, or a file the caller wrote under
        ``files_dir`` (see :meth:`upload_path`), which is moved into place. Durable: the file
        is on disk (fsynced) before its row exists."""
        file_id = new_id("file")
        path = self.files_dir / file_id
        if isinstance(content, bytes):
            durable.write_bytes(path, content)
        else:
            with open(content, "rb") as f:
                os.fsync(f.fileno())
            os.replace(content, path)
            durable.fsync_dir(self.files_dir)
        record = FileRecord(
            file_id, filename, purpose, path.stat().st_size, int(time.time()), str(path)
        )
        stored = dataclasses.replace(record, path=self.relative(path))
        try:
            with self._connect() as db:
                db.execute(
                    "INSERT INTO files VALUES (?, ?, ?, ?, ?, ?)", dataclasses.astuple(stored)
                )
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return record

    def upload_path(self) -> Path:
        """A temporary name under ``files_dir`` to stream an upload to before :meth:`add_file`
        (the same file system, so the move is a rename); a restart may delete leftovers."""
        return self.files_dir / f"upload{durable.TMP_MARK}{secrets.token_hex(8)}"

    def get_file(self, file_id: str) -> FileRecord | None:
        with self._connect() as db:
            row = db.execute("SELECT * FROM files WHERE id = ?", (file_id,)).fetchone()
        return self._file(row) if row else None

    def list_files(
        self, purpose: str | None = None, after: str | None = None, limit: int | None = None
    ) -> list[FileRecord]:
        """Newest first; ``after`` is the id of the last file of the previous page (an unknown
        id starts from the newest, as for jobs); at most ``limit`` files (all if None)."""
        where, args = ["1"], []
        if purpose is not None:
            where, args = [*where, "purpose = ?"], [*args, purpose]
        with self._connect() as db:
            if after is not None:  # rowids only grow among existing rows: insertion order
                bound = db.execute("SELECT rowid FROM files WHERE id = ?", (after,)).fetchone()
                if bound is not None:
                    where, args = [*where, "rowid < ?"], [*args, bound[0]]
            query = f"SELECT * FROM files WHERE {' AND '.join(where)} ORDER BY rowid DESC"
            if limit is not None:
                query, args = query + " LIMIT ?", [*args, limit]
            rows = db.execute(query, args).fetchall()
        return [self._file(row) for row in rows]

    def delete_file(self, file_id: str) -> bool:
        """Delete a file (False if there is none); raises :class:`FileInUseError`, deleting
        nothing, if a job that is not finished trains or validates on it."""
        active = sorted(str(s) for s in ACTIVE_STATES)
        with self._transaction() as db:  # no job can start using it between check and delete
            record = db.execute("SELECT path FROM files WHERE id = ?", (file_id,)).fetchone()
            if record is None:
                return False
            users = db.execute(
                "SELECT id FROM jobs WHERE (training_file = ? OR validation_file = ?)"
                f" AND status IN ({', '.join('?' * len(active))}) ORDER BY seq",
                (file_id, file_id, *active),
            ).fetchall()
            if users:
                raise FileInUseError(file_id, [u["id"] for u in users])
            db.execute("DELETE FROM files WHERE id = ?", (file_id,))
        self.resolve(record["path"]).unlink(missing_ok=True)
        return True

    def _file(self, row: sqlite3.Row) -> FileRecord:
        # rows written before paths were relative hold absolute paths: resolve() keeps those
        return FileRecord(**{**dict(row), "path": str(self.resolve(row["path"]))})

    # --- jobs --------------------------------------------------------------------------------

    def create_job(
        self,
        model: str,
        training_file: str,
        hyperparameters: dict[str, Any],
        seed: int,
        validation_file: str | None = None,
        suffix: str | None = None,
        status: JobStatus = JobStatus.VALIDATING_FILES,
    ) -> Job:
        """A new job; its adapter is named after its suffix, or else after the job itself."""
        job_id = new_id("ftjob")
        with self._transaction() as db:
            seq = db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM jobs").fetchone()[0]
            db.execute(
                "INSERT INTO jobs (id, seq, created_at, model, training_file, validation_file,"
                " suffix, adapter_name, seed, hyperparameters, status)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    job_id,
                    seq,
                    int(time.time()),
                    model,
                    training_file,
                    validation_file,
                    suffix,
                    adapter_name(suffix, job_id),
                    seed,
                    json.dumps(hyperparameters),
                    str(status),
                ),
            )
        self.add_event(job_id, f"Created fine-tuning job: {job_id}")
        return self.get_job(job_id)

    def get_job(self, job_id: str) -> Job | None:
        with self._connect() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _job(row) if row else None

    def list_jobs(self, after: str | None = None, limit: int = 20) -> tuple[list[Job], bool]:
        """Newest first; ``after`` is the id of the last job of the previous page."""
        rows, more = self._newest_first("jobs", "1", (), self._seq_of("jobs", after), limit)
        return [_job(r) for r in rows], more

    def adapter_name_taken(self, adapter_name: str) -> bool:
        """Whether a job that has not failed or been cancelled already claims this name."""
        with self._connect() as db:
            row = db.execute(
                "SELECT 1 FROM jobs WHERE adapter_name = ?"
                " AND status NOT IN ('failed', 'cancelled')",
                (adapter_name,),
            ).fetchone()
        return row is not None

    def set_status(self, job_id: str, status: JobStatus, **fields: Any) -> bool:
        """Move a job to ``status`` and set other columns (dicts are stored as JSON), if the
        lifecycle allows that move from its current state; False (nothing written) if not."""
        status = JobStatus(status)
        now = int(time.time())
        if status == JobStatus.RUNNING:
            fields.setdefault("started_at", now)
        if status in FINAL_STATES:
            fields.setdefault("finished_at", now)
        columns = {"status": str(status), **{k: _to_db(v) for k, v in fields.items()}}
        assignments = ", ".join(f"{name} = ?" for name in columns)
        sources = sorted(str(s) for s in ALLOWED_FROM[status])
        marks = ", ".join("?" * len(sources))
        with self._connect() as db:
            cursor = db.execute(
                f"UPDATE jobs SET {assignments} WHERE id = ? AND status IN ({marks})",
                (*columns.values(), job_id, *sources),
            )
        return cursor.rowcount == 1

    def update_progress(self, job_id: str, **fields: Any) -> None:
        assignments = ", ".join(f"{name} = ?" for name in fields)
        with self._connect() as db:
            db.execute(
                f"UPDATE jobs SET {assignments} WHERE id = ?",
                (*(_to_db(v) for v in fields.values()), job_id),
            )

    def request_cancel(self, job_id: str) -> Job | None:
        """Cancel a job: a queued one at once, a running one when its trainer next checks."""
        with self._transaction() as db:
            row = db.execute("SELECT status FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                return None
            if row["status"] in ("validating_files", "queued"):
                db.execute(
                    "UPDATE jobs SET status = 'cancelled', finished_at = ?, cancel_requested = 1"
                    " WHERE id = ?",
                    (int(time.time()), job_id),
                )
            elif row["status"] == "running":
                db.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ?", (job_id,))
        return self.get_job(job_id)

    def cancel_requested(self, job_id: str) -> bool:
        with self._connect() as db:
            row = db.execute("SELECT cancel_requested FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return bool(row and row["cancel_requested"])

    def claim_next(self) -> Job | None:
        """The oldest queued job, now marked running; None if there is none (first come first
        served). One scheduler claims a job: the transaction makes the claim exclusive."""
        with self._connect() as db:  # the common answer, "none", needs no write lock
            if db.execute("SELECT 1 FROM jobs WHERE status = 'queued' LIMIT 1").fetchone() is None:
                return None
        with self._transaction() as db:
            row = db.execute(
                "SELECT id FROM jobs WHERE status = 'queued' ORDER BY seq LIMIT 1"
            ).fetchone()
            if row is None:
                return None
            db.execute(
                "UPDATE jobs SET status = 'running', started_at = COALESCE(started_at, ?)"
                " WHERE id = ?",
                (int(time.time()), row["id"]),
            )
        return self.get_job(row["id"])

    def requeue_running(self) -> list[str]:
        """At start-up: jobs left running by a server that stopped go back to the queue."""
        with self._transaction() as db:
            # a job whose adapter is written only waits for the publisher, not for training
            unfinished = "status = 'running' AND adapter_path IS NULL"
            ids = [r["id"] for r in db.execute(f"SELECT id FROM jobs WHERE {unfinished}")]
            db.execute(f"UPDATE jobs SET status = 'queued' WHERE {unfinished}")
        for job_id in ids:
            self.add_event(job_id, "Server restarted; the job resumes from its last checkpoint")
        return ids

    def jobs_with_status(self, status: str) -> list[Job]:
        with self._connect() as db:
            rows = db.execute("SELECT * FROM jobs WHERE status = ? ORDER BY seq", (status,))
            return [_job(r) for r in rows.fetchall()]

    def job_dir(self, job_id: str) -> Path:
        return self.jobs_dir / job_id

    def dataset_path(self, job_id: str, split: str) -> Path:
        """A job's tokenized dataset (``split``: "train" or "validation"), written by the API
        (``finetune.data.save_examples``) before the job is queued, read by the runner."""
        return self.job_dir(job_id) / f"{split}.npz"

    # Paths in the database are relative to the state dir, so that it can be moved.

    def relative(self, path: str | Path) -> str:
        return str(Path(path).resolve().relative_to(self.state_dir.resolve()))

    def resolve(self, stored: str) -> Path:
        return self.state_dir / stored

    # --- events and checkpoints --------------------------------------------------------------

    def add_event(
        self,
        job_id: str,
        message: str,
        level: str = "info",
        data: dict[str, Any] | None = None,
        type: str = "message",
    ) -> None:
        with self._connect() as db:
            db.execute(
                "INSERT INTO events (job_id, created_at, level, message, type, data)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (job_id, int(time.time()), level, message, type, _to_db(data)),
            )

    def list_events(
        self, job_id: str, after: str | None = None, limit: int = 20
    ) -> tuple[list[Event], bool]:
        """Newest first, like OpenAI's; ``after`` is the id of the last event already seen."""
        bound = _event_seq(after)
        rows, more = self._newest_first("events", "job_id = ?", (job_id,), bound, limit)
        events = [
            Event(
                id=f"ftevent-{r['seq']}",
                job_id=r["job_id"],
                created_at=r["created_at"],
                level=r["level"],
                message=r["message"],
                type=r["type"],
                data=json.loads(r["data"]) if r["data"] else None,
            )
            for r in rows
        ]
        return events, more

    def add_checkpoint(self, job_id: str, step: int, path: str, metrics: dict) -> Checkpoint:
        checkpoint_id = new_id("ftckpt")
        with self._connect() as db:
            db.execute(
                "INSERT INTO checkpoints (id, job_id, created_at, step, path, metrics)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (checkpoint_id, job_id, int(time.time()), step, path, json.dumps(metrics)),
            )
        return self.list_checkpoints(job_id, limit=1)[0][0]

    def list_checkpoints(
        self, job_id: str, after: str | None = None, limit: int = 10
    ) -> tuple[list[Checkpoint], bool]:
        """Newest first; ``after`` is the id of the last checkpoint already seen."""
        bound = self._seq_of("checkpoints", after)
        rows, more = self._newest_first("checkpoints", "job_id = ?", (job_id,), bound, limit)
        checkpoints = [
            Checkpoint(
                id=r["id"],
                job_id=r["job_id"],
                created_at=r["created_at"],
                step=r["step"],
                path=r["path"],
                metrics=json.loads(r["metrics"]),
            )
            for r in rows
        ]
        return checkpoints, more

    # --- pages -------------------------------------------------------------------------------

    def _seq_of(self, table: str, record_id: str | None) -> int | None:
        """The position of ``record_id`` in ``table`` (pages continue after it), if it exists."""
        with self._connect() as db:
            row = db.execute(f"SELECT seq FROM {table} WHERE id = ?", (record_id,)).fetchone()
        return row["seq"] if row else None

    def _newest_first(
        self, table: str, where: str, args: tuple, before: int | None, limit: int
    ) -> tuple[list[sqlite3.Row], bool]:
        """Up to ``limit`` rows of ``table`` matching ``where`` with ``seq < before``, newest
        first, and whether more follow."""
        with self._connect() as db:
            rows = db.execute(
                f"SELECT * FROM {table} WHERE {where} AND (? IS NULL OR seq < ?)"
                " ORDER BY seq DESC LIMIT ?",
                (*args, before, before, limit + 1),
            ).fetchall()
        return rows[:limit], len(rows) > limit


def _job(row: sqlite3.Row) -> Job:
    values = dict(row)
    values.pop("seq")
    values["hyperparameters"] = json.loads(values["hyperparameters"])
    values["error"] = json.loads(values["error"]) if values["error"] else None
    values["cancel_requested"] = bool(values["cancel_requested"])
    return Job(**values)


def _to_db(value: Any) -> Any:
    return json.dumps(value) if isinstance(value, dict) else value


def _event_seq(event_id: str | None) -> int | None:
    """Events are numbered, not random: ``ftevent-<seq>``."""
    prefix = "ftevent-"
    if event_id and event_id.startswith(prefix) and event_id[len(prefix) :].isdigit():
        return int(event_id[len(prefix) :])
    return None
