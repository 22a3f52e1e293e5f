"""The records the job store hands out: files, jobs, events, checkpoints, and job owners.

Plain frozen dataclasses (the API turns them into OpenAI's JSON shapes); ``store.py`` reads and
writes them.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import socket
from typing import Any


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
    owner: str | None = None
    owner_info: str | None = None
    lease_expires: float | None = None


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
class CheckpointRecord:
    """A written checkpoint as the store records it (one row of ``checkpoints``)."""

    id: str
    job_id: str
    created_at: int
    step: int
    path: str
    metrics: dict[str, Any]


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


@dataclasses.dataclass(frozen=True)
class Owner:
    """Who trains a running job: one scheduler process (a random id, so a restarted process
    on the same host and pid is a different owner), with its host and pid for humans."""

    id: str
    info: str

    @classmethod
    def this_process(cls) -> Owner:
        return cls(new_id("owner"), f"{socket.gethostname()} pid {os.getpid()}")
