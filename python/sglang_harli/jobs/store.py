"""The job store: files, fine-tuning jobs, their events and checkpoints, in one SQLite file.

The main process (HTTP API, adapter publisher) and the scheduler processes (job execution)
share it; SQLite in WAL mode lets them read while one writes. Every method opens its own short
connection, so the store is safe to use from any thread or process. Records come back as the
dataclasses below; the API turns them into OpenAI's JSON shapes.

A writer waits at most ``busy_timeout_ms`` for another one's lock, then gets
``sqlite3.OperationalError`` (one of :data:`STORE_ERRORS`, with a full disk or a read-only file
system): the scheduler processes' callers catch those and try again later (``jobs/agent.py``).
Opening a store whose schema is current takes no lock; an older database gets its missing
columns (``ALTER TABLE ... ADD COLUMN``) when it is opened.

Job states and the moves between them are ``lifecycle.py``'s; :meth:`JobStore.set_status` applies
a move only from a state it allows. A running job has an owner (one scheduler process, see
:class:`Owner`) and a lease that its owner renews; the scheduler's writes for a job go through
:meth:`JobStore.apply`, which writes only while the caller still owns the job. A job whose lease
expired (its server stopped, or lost the store for longer than the lease) goes back to queued
and resumes from its last checkpoint on whichever server claims it next.

Adapter names are unique among the jobs that hold one (every job but failed and cancelled
ones): :meth:`JobStore.create_job` checks and inserts in one ``BEGIN IMMEDIATE`` transaction and
raises :class:`AdapterNameTaken` for a name held already, and a partial unique index
(``jobs_adapter_name_held``) backs it. A database written before the index, in which concurrent
creates already left two held jobs with one name, opens without it (the transaction alone keeps
new names unique) and gets it at the first open after those jobs end.

A full disk must not hide the jobs: SQLite's readers need the WAL's shared-memory index, and a
reader that has to create or grow it on a full disk gets "disk I/O error". Each store keeps one
idle connection open for its lifetime, so the index exists (sized) while the process lives and
reads keep working when the disk fills. What a failure means to a client is
``store_errors.classify``'s; :func:`open_store` stands in for a store that cannot be opened (a
corrupt ``harli.db``, a read-only state dir), so that serving starts without it.

Non-finite numbers (a diverged loss) are stored and returned as null: JSON has no NaN, and every
reader (the API, the CLI) gets valid JSON. Paths are stored relative to the state dir.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import secrets
import shutil
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sglang_harli import durable

from .lifecycle import ACTIVE_STATES, FINAL_STATES, JobStatus, adapter_name
from .records import CheckpointRecord, Event, FileInUseError, FileRecord, Job, Owner, new_id
from .store_errors import AdapterNameTaken, StoreUnavailable, describe_open_failure
from .writes import (
    AddCheckpointRecord,
    JobWrite,
    NewEvent,
    Outcome,
    Progress,
    Prune,
    Rewind,
    change_status,
    from_db,
    insert_event,
    job_columns,
    update_job,
)

__all__ = [  # the records and writes are imported from here by the service's users
    "AdapterNameTaken",
    "AddCheckpointRecord",
    "CheckpointRecord",
    "Event",
    "FileInUseError",
    "FileRecord",
    "Job",
    "JobStore",
    "JobWrite",
    "NewEvent",
    "Outcome",
    "Owner",
    "Progress",
    "Prune",
    "ReopeningStore",
    "Rewind",
    "StoreUnavailable",
    "new_id",
    "open_store",
    "store_status",
]

logger = logging.getLogger(__name__)

DB_NAME = "harli.db"
CHECKPOINTS_DIR = "checkpoints"  # a job's checkpoints: jobs/<id>/checkpoints/step-<n>
DEFAULT_BUSY_TIMEOUT_MS = 30_000  # the API's writes wait this long for another writer
LEASE_S = 30.0  # a running job's owner renews its lease well within this (see jobs/agent.py)
# A job is `validating_files` only while its create request runs (seconds, minutes for a huge
# file); one older than this was left by a server that stopped mid-request.
ABANDONED_VALIDATION_S = 3600.0

# What "the store cannot answer now" looks like: a lock held too long, a full disk, a read-only
# or vanished file system. Callers on the serving path catch these and try again later.
STORE_ERRORS: tuple[type[BaseException], ...] = (sqlite3.Error, OSError)

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

# Adapter names held by jobs are unique (see the module docstring); created apart from _SCHEMA
# because a database may hold duplicates from before it (then it waits until they end).
_HELD = "status NOT IN ('failed', 'cancelled')"
_NAME_INDEX = "jobs_adapter_name_held"
_NAME_INDEX_SQL = (
    f"CREATE UNIQUE INDEX IF NOT EXISTS {_NAME_INDEX} ON jobs (adapter_name) WHERE {_HELD}"
)
# a store that could not be opened is tried again at most this often (open_store)
REOPEN_S = 5.0

# Columns added to a table after databases were first written: (table, column, declaration). An
# older database gets them when it is opened; new ones go at the end of this list.
_ADDED_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("jobs", "owner", "TEXT"),  # Owner.id of the scheduler process training it
    ("jobs", "owner_info", "TEXT"),  # host and pid of that process, for humans
    ("jobs", "lease_expires", "REAL"),  # unix time; past it, any server may re-queue the job
)


class JobStore:
    def __init__(self, state_dir: str | Path, busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS):
        self.state_dir = Path(state_dir)
        self.busy_timeout_s = busy_timeout_ms / 1000
        self.files_dir = self.state_dir / "files"
        self.jobs_dir = self.state_dir / "jobs"
        for d in (self.files_dir, self.jobs_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.db_path = self.state_dir / DB_NAME
        self._migrate()
        # Never used again: it keeps the WAL index in place, so reads work on a full disk.
        self._keeper = sqlite3.connect(self.db_path, check_same_thread=False)
        self._keeper.execute("SELECT 1 FROM jobs LIMIT 1").fetchall()

    def _migrate(self) -> None:
        """Create the tables, or add what an older database lacks. A current database is only
        read: opening the store then never waits for another process's write lock."""
        with self._connect() as db:
            if _schema_is_current(db):
                return
            db.execute("PRAGMA journal_mode=WAL")  # persistent: set once, when the file is new
        with self._transaction() as db:  # two processes may open a new database at once
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            for table, column, declaration in _ADDED_COLUMNS:
                if column not in _columns(db, table):
                    db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")
            duplicate = _held_duplicate(db)
            if duplicate is None:
                db.execute(_NAME_INDEX_SQL)
            else:
                logger.warning(
                    "job store: jobs that share adapter name %r are active; adapter names are "
                    "kept unique by transaction alone until they end",
                    duplicate,
                )

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.db_path, timeout=self.busy_timeout_s, isolation_level=None)
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
        """A new job; its adapter is named after its suffix, or else after the job itself.
        Raises :class:`AdapterNameTaken`, writing nothing, if a job that has not failed or been
        cancelled holds that name: the check and the insert are one transaction."""
        job_id = new_id("ftjob")
        name = adapter_name(suffix, job_id)
        with self._transaction() as db:
            if _name_held(db, name):
                raise AdapterNameTaken(name)
            seq = db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM jobs").fetchone()[0]
            row = (
                job_id,
                seq,
                int(time.time()),
                model,
                training_file,
                validation_file,
                suffix,
                name,
                seed,
                json.dumps(hyperparameters),
                str(status),
            )
            try:
                db.execute(
                    "INSERT INTO jobs (id, seq, created_at, model, training_file,"
                    " validation_file, suffix, adapter_name, seed, hyperparameters, status)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    row,
                )
            except sqlite3.IntegrityError:  # the unique index: a held name (belt and braces)
                raise AdapterNameTaken(name) from None
        self.add_event(job_id, f"Created fine-tuning job: {job_id}")
        return self.get_job(job_id)

    def get_job(self, job_id: str) -> Job | None:
        with self._connect() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return self._job(row) if row else None

    def list_jobs(self, after: str | None = None, limit: int = 20) -> tuple[list[Job], bool]:
        """Newest first; ``after`` is the id of the last job of the previous page."""
        rows, more = self._newest_first("jobs", "1", (), self._seq_of("jobs", after), limit)
        return [self._job(r) for r in rows], more

    def adapter_name_taken(self, adapter_name: str) -> bool:
        """Whether a job that has not failed or been cancelled already claims this name."""
        with self._connect() as db:
            return _name_held(db, adapter_name)

    def set_status(self, job_id: str, status: JobStatus, **fields: Any) -> bool:
        """Move a job to ``status`` and set other columns (dicts are stored as JSON), if the
        lifecycle allows that move from its current state; False (nothing written) if not."""
        status = JobStatus(status)
        now = int(time.time())
        if status == JobStatus.RUNNING:
            fields.setdefault("started_at", now)
        if status in FINAL_STATES:
            fields.setdefault("finished_at", now)
        columns = job_columns(fields, self.relative)
        with self._connect() as db:
            return change_status(db, job_id, status, columns)

    def update_progress(self, job_id: str, **fields: Any) -> None:
        with self._connect() as db:
            update_job(db, job_id, job_columns(fields, self.relative))

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

    def claim_next(
        self, model: str | None = None, owner: Owner | None = None, lease_s: float = LEASE_S
    ) -> Job | None:
        """The oldest queued job for ``model`` (any model if None), now running under
        ``owner``'s lease; None if there is none (first come first served). One scheduler
        claims a job: the transaction makes the claim exclusive."""
        queued = "status = 'queued' AND (? IS NULL OR model = ?)"
        with self._connect() as db:  # the common answer, "none", needs no write lock
            args = (model, model)
            if db.execute(f"SELECT 1 FROM jobs WHERE {queued} LIMIT 1", args).fetchone() is None:
                return None
        now = time.time()
        with self._transaction() as db:
            row = db.execute(
                f"SELECT id FROM jobs WHERE {queued} ORDER BY seq LIMIT 1", (model, model)
            ).fetchone()
            if row is None:
                return None
            db.execute(
                "UPDATE jobs SET status = 'running', started_at = COALESCE(started_at, ?),"
                " owner = ?, owner_info = ?, lease_expires = ? WHERE id = ?",
                (
                    int(now),
                    owner.id if owner else None,
                    owner.info if owner else None,
                    now + lease_s if owner else None,
                    row["id"],
                ),
            )
        return self.get_job(row["id"])

    def requeue_expired(self, now: float | None = None) -> list[str]:
        """Jobs whose owner stopped renewing their lease (its server stopped or crashed) go
        back to the queue, to resume from their last checkpoint; their ids. A job whose adapter
        is written is not re-queued: it waits only for the publisher. Cheap when there is none
        (no write lock), so every server calls it whenever it looks for work."""
        now = time.time() if now is None else now
        expired = (
            "status = 'running' AND adapter_path IS NULL"
            " AND (lease_expires IS NULL OR lease_expires < ?)"
        )
        with self._connect() as db:
            if db.execute(f"SELECT 1 FROM jobs WHERE {expired} LIMIT 1", (now,)).fetchone() is None:
                return []
        with self._transaction() as db:
            rows = db.execute(f"SELECT id, owner_info FROM jobs WHERE {expired}", (now,)).fetchall()
            db.execute(
                f"UPDATE jobs SET status = 'queued', owner = NULL, lease_expires = NULL"
                f" WHERE {expired}",
                (now,),
            )
            for row in rows:
                who = f" ({row['owner_info']})" if row["owner_info"] else ""
                insert_event(
                    db,
                    row["id"],
                    NewEvent(
                        f"The server training this job{who} stopped renewing its lease; the job"
                        " is queued again and resumes from its last checkpoint",
                        level="warning",
                    ),
                )
        return [row["id"] for row in rows]

    def fail_abandoned_validations(
        self, now: float | None = None, max_age_s: float = ABANDONED_VALIDATION_S
    ) -> list[str]:
        """Jobs left in ``validating_files`` by a server that stopped during their create
        request fail, saying so (their files can then be deleted); their ids. Cheap when there
        is none, like :meth:`requeue_expired`, and safe when servers share the state dir: no
        live request is that old."""
        cutoff = (time.time() if now is None else now) - max_age_s
        stale = "status = 'validating_files' AND created_at < ?"
        with self._connect() as db:
            if (
                db.execute(f"SELECT 1 FROM jobs WHERE {stale} LIMIT 1", (cutoff,)).fetchone()
                is None
            ):
                return []
        failed = []
        error = {
            "code": "validation_interrupted",
            "message": "The server stopped while it was validating this job's files; "
            "create the job again",
        }
        for row in self.jobs_with_status(JobStatus.VALIDATING_FILES):
            if row.created_at < cutoff and self.set_status(row.id, JobStatus.FAILED, error=error):
                self.add_event(row.id, f"Job failed: {error['message']}", level="error")
                failed.append(row.id)
        return failed

    def renew_lease(self, job_id: str, owner: Owner, lease_s: float = LEASE_S) -> bool:
        """Extend ``owner``'s lease on a running job; False if it no longer owns it."""
        with self._connect() as db:
            cursor = db.execute(
                "UPDATE jobs SET lease_expires = ?"
                " WHERE id = ? AND owner = ? AND status = 'running'",
                (time.time() + lease_s, job_id, owner.id),
            )
        return cursor.rowcount == 1

    def owns(self, job_id: str, owner: Owner) -> bool:
        """Whether ``owner`` trains the job now (a read: no lock)."""
        with self._connect() as db:
            row = db.execute(
                "SELECT 1 FROM jobs WHERE id = ? AND owner = ? AND status = 'running'",
                (job_id, owner.id),
            ).fetchone()
        return row is not None

    def apply(self, job_id: str, writes: list[JobWrite], owner: Owner | None = None) -> bool:
        """Apply ``writes`` in one transaction, in order; with ``owner``, only if it still owns
        the job (running under its id): False, nothing written, if not. Directories that the
        writes took out of the database (pruned or abandoned checkpoints) are deleted after
        the commit."""
        with self._transaction() as db:
            if owner is not None:
                row = db.execute(
                    "SELECT 1 FROM jobs WHERE id = ? AND owner = ? AND status = 'running'",
                    (job_id, owner.id),
                ).fetchone()
                if row is None:
                    return False
            removed = [path for write in writes for path in write.apply(db, job_id, self.relative)]
        for path in removed:
            _remove_tree(self.resolve(path))
        return True

    def jobs_by_id(self, job_ids: list[str]) -> list[Job]:
        marks = ", ".join("?" * len(job_ids))
        with self._connect() as db:
            rows = db.execute(f"SELECT * FROM jobs WHERE id IN ({marks})", job_ids).fetchall()
        return [self._job(r) for r in rows]

    def jobs_with_status(self, status: str) -> list[Job]:
        with self._connect() as db:
            rows = db.execute("SELECT * FROM jobs WHERE status = ? ORDER BY seq", (status,))
            return [self._job(r) for r in rows.fetchall()]

    def job_dir(self, job_id: str) -> Path:
        return self.jobs_dir / job_id

    def clean_job_dir(self, job_id: str) -> None:
        """Delete what a crash left in a job's directory: temporary files and directories
        (``durable``'s), and checkpoint directories no row names (pruned, or written but never
        recorded). Called by the job's owner when it claims the job, and at a server's start
        for finished jobs: never while another process may be writing there."""
        job_dir = self.job_dir(job_id)
        if not job_dir.is_dir():
            return
        durable.remove_leftovers(job_dir)
        checkpoints_dir = job_dir / CHECKPOINTS_DIR
        if not checkpoints_dir.is_dir():
            return
        durable.remove_leftovers(checkpoints_dir)
        with self._connect() as db:
            rows = db.execute("SELECT path FROM checkpoints WHERE job_id = ?", (job_id,))
            named = {self.resolve(r["path"]).resolve() for r in rows.fetchall()}
        for child in checkpoints_dir.iterdir():
            if child.is_dir() and child.resolve() not in named:
                _remove_tree(child)

    def dataset_path(self, job_id: str, split: str) -> Path:
        """A job's tokenized dataset (``split``: "train" or "validation"), written by the API
        (``finetune.data.save_examples``) before the job is queued, read by the runner."""
        return self.job_dir(job_id) / f"{split}.npz"

    # Paths in the database are relative to the state dir, so that it can be moved.

    def relative(self, path: str | Path) -> str:
        """``path`` as the database stores it: relative to the state dir (a path outside it,
        or one already relative, is kept as it is)."""
        path = Path(path)
        if not path.is_absolute():
            return str(path)
        try:
            return str(path.resolve().relative_to(self.state_dir.resolve()))
        except ValueError:
            return str(path)

    def resolve(self, stored: str) -> Path:
        """A stored path, usable: rows written before paths were relative are absolute."""
        return self.state_dir / stored

    def _job(self, row: sqlite3.Row) -> Job:
        values = dict(row)
        values.pop("seq")
        values["hyperparameters"] = json.loads(values["hyperparameters"])
        values["error"] = from_db(values["error"])
        values["cancel_requested"] = bool(values["cancel_requested"])
        if values["adapter_path"] is not None:
            values["adapter_path"] = str(self.resolve(values["adapter_path"]))
        known = {f.name for f in dataclasses.fields(Job)}
        return Job(**{k: v for k, v in values.items() if k in known})

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
            insert_event(db, job_id, NewEvent(message, level, type, data))

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
                data=from_db(r["data"]),
            )
            for r in rows
        ]
        return events, more

    def add_checkpoint(self, job_id: str, step: int, path: str, metrics: dict) -> CheckpointRecord:
        self.apply(job_id, [AddCheckpointRecord(step, str(path), metrics)])
        return self.list_checkpoints(job_id, limit=1)[0][0]

    def list_checkpoints(
        self, job_id: str, after: str | None = None, limit: int = 10
    ) -> tuple[list[CheckpointRecord], bool]:
        """Newest first; ``after`` is the id of the last checkpoint already seen."""
        bound = self._seq_of("checkpoints", after)
        rows, more = self._newest_first("checkpoints", "job_id = ?", (job_id,), bound, limit)
        checkpoints = [
            CheckpointRecord(
                id=r["id"],
                job_id=r["job_id"],
                created_at=r["created_at"],
                step=r["step"],
                path=str(self.resolve(r["path"])),
                metrics=from_db(r["metrics"]) or {},
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


class ReopeningStore:
    """Stands in for a :class:`JobStore` that could not be opened (a corrupt ``harli.db``, a
    read-only or vanished state dir): serving goes on without it. Every use tries to open the
    store again, at most every :data:`REOPEN_S` seconds, and delegates to it once it opens; until
    then every use raises :class:`StoreUnavailable` with the reason (the API answers 503)."""

    def __init__(self, state_dir: str | Path, reason: str, busy_timeout_ms: int):
        self.state_dir = Path(state_dir)
        self.files_dir, self.jobs_dir = self.state_dir / "files", self.state_dir / "jobs"
        self.reason = reason
        self._busy_timeout_ms = busy_timeout_ms
        self._store: JobStore | None = None
        self._next_try = time.monotonic() + REOPEN_S
        self._lock = threading.Lock()

    def opened(self) -> JobStore | None:
        """The store, if it opens now (tried at most every :data:`REOPEN_S` seconds)."""
        with self._lock:
            if self._store is None and time.monotonic() >= self._next_try:
                self._next_try = time.monotonic() + REOPEN_S
                try:
                    self._store = JobStore(self.state_dir, self._busy_timeout_ms)
                    logger.warning("job store %s opens again", self.state_dir)
                except STORE_ERRORS as exc:
                    self.reason = describe_open_failure(exc)
            return self._store

    def __getattr__(self, name: str) -> Any:
        store = self.opened()
        if store is None:
            raise StoreUnavailable(self.reason)
        return getattr(store, name)


def open_store(
    state_dir: str | Path, busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS
) -> JobStore | ReopeningStore:
    """The store, or, if it cannot be opened, a stand-in that says why (logged once, no
    traceback) and opens it once it can."""
    try:
        return JobStore(state_dir, busy_timeout_ms)
    except STORE_ERRORS as exc:
        reason = describe_open_failure(exc)
        logger.error(
            "job store %s cannot be opened (%s): serving goes on; fine-tuning is unavailable "
            "until it can be",
            state_dir,
            reason,
        )
        return ReopeningStore(state_dir, reason, busy_timeout_ms)


def store_status(store: JobStore | ReopeningStore) -> dict[str, Any]:
    """For ``/harli/status``: whether the store is open, and why not."""
    if isinstance(store, ReopeningStore) and store.opened() is None:
        return {"available": False, "error": store.reason}
    return {"available": True, "error": None}


_SCHEMA_NAMES = re.compile(r"CREATE (TABLE|INDEX) IF NOT EXISTS (\w+)")


def _columns(db: sqlite3.Connection, table: str) -> set[str]:
    return {row[1] for row in db.execute(f"PRAGMA table_info({table})")}


def _schema_is_current(db: sqlite3.Connection) -> bool:
    """Whether the database has every table, index and column (read-only: takes no lock). The
    adapter-name index may be missing while duplicates from before it are active."""
    if db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
        return False
    existing = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
    if any(name not in existing for _, name in _SCHEMA_NAMES.findall(_SCHEMA)):
        return False
    if not all(column in _columns(db, table) for table, column, _ in _ADDED_COLUMNS):
        return False
    return _NAME_INDEX in existing or _held_duplicate(db) is not None


def _name_held(db: sqlite3.Connection, adapter_name: str) -> bool:
    query = f"SELECT 1 FROM jobs WHERE adapter_name = ? AND {_HELD} LIMIT 1"
    return db.execute(query, (adapter_name,)).fetchone() is not None


def _held_duplicate(db: sqlite3.Connection) -> str | None:
    """An adapter name that two jobs holding names share (left by concurrent creates before
    names were unique), if any."""
    row = db.execute(
        f"SELECT adapter_name FROM jobs WHERE {_HELD} GROUP BY adapter_name"
        " HAVING COUNT(*) > 1 LIMIT 1"
    ).fetchone()
    return row[0] if row else None


def _remove_tree(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)


def _event_seq(event_id: str | None) -> int | None:
    """Events are numbered, not random: ``ftevent-<seq>``; anything else (``ftevent-²``: a
    digit to ``isdigit`` that ``int`` refuses) pages from the newest."""
    prefix = "ftevent-"
    number = (event_id or "").removeprefix(prefix)
    if event_id and event_id.startswith(prefix) and number.isascii() and number.isdigit():
        return int(number)
    return None
