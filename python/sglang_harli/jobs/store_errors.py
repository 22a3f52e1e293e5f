"""What the job store's failures mean to a client, decided in one place.

SQLite and the file system fail in a handful of ways that a client can act on differently: the
database is busy (retry soon), the disk is full (free space), the database is unreadable or
read-only (an operator must act). :func:`classify` turns any exception of
:data:`~sglang_harli.jobs.store.STORE_ERRORS` into a :class:`StoreFailure` carrying an HTTP
status and a message naming the cause without the server's paths; the HTTP layer answers with it
instead of a bare 500. Reads answer 503 (the store cannot answer now), writes that need disk
space 507 (Insufficient Storage). Imports nothing from SGLang or HTTP.
"""

from __future__ import annotations

import dataclasses
import enum
import errno
import shutil
import sqlite3
from pathlib import Path

# Below this much free space on the state dir's file system, an I/O error is taken as the disk
# being full: SQLite reports a reader's failure to size its shared-memory index (a full disk)
# only as "disk I/O error".
LOW_SPACE_BYTES = 1 << 20


class AdapterNameTaken(Exception):
    """Another job that has not failed or been cancelled already holds this adapter name."""

    def __init__(self, adapter_name: str):
        super().__init__(f"adapter name {adapter_name!r} is already used by another job")
        self.adapter_name = adapter_name


class StoreUnavailable(Exception):
    """The job store could not be opened (raised by every use of it until it can)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class Kind(enum.StrEnum):
    BUSY = "store_busy"  # another writer holds the lock past the busy timeout
    DISK_FULL = "disk_full"
    READ_ONLY = "store_read_only"
    UNREADABLE = "store_unavailable"  # corrupt, not a database, or an I/O error


@dataclasses.dataclass(frozen=True)
class StoreFailure:
    kind: Kind
    status: int  # the HTTP status to answer with
    message: str


def classify(exc: BaseException, state_dir: Path | None = None) -> StoreFailure:
    """What ``exc`` (a store failure) means; ``state_dir`` lets a vague I/O error be recognised
    as a full disk by looking at the free space."""
    if isinstance(exc, StoreUnavailable):
        return StoreFailure(Kind.UNREADABLE, 503, f"the job store is unavailable: {exc.reason}")
    name = getattr(exc, "sqlite_errorname", "") or ""
    text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)  # no paths
    if name.startswith("SQLITE_FULL") or _errno(exc) in (errno.ENOSPC, errno.EDQUOT):
        return _disk_full(write=True)
    if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")) or "database is locked" in text:
        return StoreFailure(
            Kind.BUSY, 503, "the job store is busy (another writer holds it); retry shortly"
        )
    if name.startswith("SQLITE_READONLY") or _errno(exc) in (errno.EROFS, errno.EACCES):
        return StoreFailure(Kind.READ_ONLY, 503, f"the job store cannot be written ({text})")
    if name.startswith("SQLITE_IOERR"):
        if state_dir is not None and _low_space(state_dir):
            return _disk_full(write=False)
        reason = f"the job store cannot answer now ({text}: is the disk full or failing?)"
        return StoreFailure(Kind.UNREADABLE, 503, reason)
    if isinstance(exc, sqlite3.DatabaseError) and not isinstance(exc, sqlite3.OperationalError):
        reason = f"the job store's database cannot be read ({text})"
        return StoreFailure(Kind.UNREADABLE, 503, reason)
    return StoreFailure(Kind.UNREADABLE, 503, f"the job store cannot answer now ({text})")


def describe_open_failure(exc: BaseException) -> str:
    """Why the store could not be opened, for logs, status and 503s (no traceback, no path)."""
    name = getattr(exc, "sqlite_errorname", None)
    if isinstance(exc, OSError) and exc.strerror:
        return f"{type(exc).__name__}: {exc.strerror}"
    return f"{type(exc).__name__}: {exc}" + (f" ({name})" if name else "")


def _disk_full(write: bool) -> StoreFailure:
    if write:
        message = "the disk holding the job store is full; free space and retry"
        return StoreFailure(Kind.DISK_FULL, 507, message)
    message = "the disk holding the job store is full, so it cannot be read; free space and retry"
    return StoreFailure(Kind.DISK_FULL, 503, message)


def _errno(exc: BaseException) -> int | None:
    return exc.errno if isinstance(exc, OSError) else None


def _low_space(path: Path) -> bool:
    try:
        return shutil.disk_usage(path).free < LOW_SPACE_BYTES
    except OSError:
        return False
